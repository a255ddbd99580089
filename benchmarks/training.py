"""Training throughput vs. stepping the same vector env with random actions, measured side by side.

    python -m benchmarks.training --preset humanoid_9_8 --steps 32000
    python -m benchmarks.training --preset halfcheetah_2x3 --steps 64000 --workers 0,2

Prints env-steps/s of (a) random actions in the preset's vector env for each worker count (subprocess
vs in-process stepping), (b) MAPPO training (PS actor) in the preset's env, and the ratio random/train
(the training overhead; 1.0 = training is free). Random stepping is measured before and after training
and averaged, so a change in machine load during the run shows as a spread.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lorasa_serve.cli import ArgumentParser, run_cli
from training.config import preset, with_overrides
from training.envs import make_vec_env
from training.episodes import random_act
from training.plots import read_metrics


def random_sps(env_cfg, workers: int, steps: int, seed: int = 0) -> float:
    venv = make_vec_env(env_cfg, workers=workers)
    act = random_act(venv.info, seed)
    step = venv.reset(seed)
    for _ in range(5):  # warm-up (worker start, JIT)
        step = venv.step(act(step.obs, step.avail, None, step.done)[0])
    n = max(1, steps // venv.n_envs)
    t0 = time.perf_counter()
    for _ in range(n):
        step = venv.step(act(step.obs, step.avail, None, step.done)[0])
    sps = n * venv.n_envs / (time.perf_counter() - t0)
    venv.close()
    return sps


def train_sps(cfg, steps: int) -> tuple[float, float]:
    """-> (env steps/s of training, fraction of time in the PPO update)."""
    from training.trainer import Trainer
    with tempfile.TemporaryDirectory() as d:
        cfg = replace(cfg, mode="ps", out=d, total_steps=steps, eval_every=0, eval_episodes=0,
                      save_every=0, tensorboard=False)
        Trainer(cfg).train(progress=False)
        rows = read_metrics(Path(d) / "metrics.csv")[1:]  # the first update includes warm-up
        roll = sum(float(r["rollout_s"]) for r in rows)
        upd = sum(float(r["update_s"]) for r in rows)
        return len(rows) * cfg.ppo.rollout * cfg.env.n_envs / (roll + upd), upd / (roll + upd)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.training", description=__doc__)
    p.add_argument("--preset", default="halfcheetah_2x3", help="the lorasa-train preset to measure")
    p.add_argument("--steps", type=int, default=32_000, help="env steps per measurement")
    p.add_argument("--workers", default="0,2", help="worker counts to compare for random stepping")
    p.add_argument("--n-envs", type=int, default=0, help="override the preset's n_envs (0: keep it)")
    p.add_argument("--train-workers", type=int, default=-1, help="override the preset's env.workers (-1: keep it)")
    return p


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    cfg = preset(args.preset)
    if args.n_envs:
        cfg = with_overrides(cfg, {"env.n_envs": args.n_envs})
    if args.train_workers >= 0:
        cfg = with_overrides(cfg, {"env.workers": args.train_workers})
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{args.preset}: {cfg.env.n_envs} envs, training with workers={cfg.env.workers}, "
          f"rollout {cfg.ppo.rollout}, {args.steps} env steps per measurement")
    before = {w: random_sps(cfg.env, w, args.steps) for w in workers}
    tsps, upd_frac = train_sps(cfg, args.steps)
    after = {w: random_sps(cfg.env, w, args.steps) for w in workers}
    for w in workers:
        print(f"random actions, workers={w}: {before[w]:9.0f} / {after[w]:9.0f} steps/s (before / after)")
    if len(workers) > 1:
        base = np.mean([before[workers[0]], after[workers[0]]])
        for w in workers[1:]:
            print(f"  workers={w} vs workers={workers[0]}: x{np.mean([before[w], after[w]]) / base:.2f}")
    ref = np.mean([before.get(cfg.env.workers, before[workers[0]]), after.get(cfg.env.workers, after[workers[0]])])
    print(f"training (PS MAPPO): {tsps:9.0f} steps/s ({100 * upd_frac:.0f}% of the time in the PPO update)")
    print(f"training overhead: random-action stepping / training = x{ref / tsps:.2f} (target <= 2)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m benchmarks.training", run, argv)


if __name__ == "__main__":
    sys.exit(main())
