"""Rollout workers on Ray vs their number, on a fixed-cost environment (each step sleeps `--step-ms`,
standing for a heavy simulator: training/envs/fixed_cost.py), so the scaling shows beyond this machine's
cores: sleeping workers need no CPU.

    python -m benchmarks.ray_scaling                              # a private local Ray; 1, 2, 4, 8, 16 workers
    python -m benchmarks.ray_scaling --ray auto --workers 1,4,16 --out ray_scaling.json

For each worker count K it trains a PS actor (MAPPO) for `--updates` updates with `--env.backend ray
--env.workers K` over `--envs` envs, and reports env steps/s, the learner's share of the wall time (the
PPO update; the rest is the rollout: env steps, acting, the object store round trip) and the bytes sent per
update. `local` is the in-process backend over the same envs (stepped one after another) for reference.
The first update (worker start, warm-up) is left out. Prints a table and writes JSON.

    python -m benchmarks.ray_scaling --presets halfcheetah_2x3,humanoid_9_8 --workers 2

`--presets` instead compares, on real MuJoCo envs at equal worker counts, the Ray backend with the
subprocess backend (`--env.workers K`) on this machine: Ray's overhead where both have the same cores.
Runs alternate backend by backend, `--repeats` times, so load changes hit both alike.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, run_cli
from training.config import TrainConfig
from training.envs import EnvConfig
from training.envs.fixed_cost import FixedCost
from training.plots import read_metrics


def measure(workers: int | None, args) -> dict:
    """One training run: workers None = the local backend, else K Ray rollout workers."""
    from training.trainer import Trainer
    env = EnvConfig(n_envs=args.envs, workers=0, episode_limit=args.episode_limit)
    if workers is not None:
        env = replace(env, backend="ray", workers=workers, ray_address=args.ray, ray_exact=not args.inexact)
    factory = FixedCost(step_s=args.step_ms / 1e3, episode_limit=args.episode_limit)
    with tempfile.TemporaryDirectory() as d:
        cfg = replace(TrainConfig(env=env), mode="ps", out=d, total_steps=(args.updates + 1) * args.envs * args.rollout,
                      eval_every=0, eval_episodes=0, final_eval_episodes=0, save_every=0, tensorboard=False)
        cfg = replace(cfg, ppo=replace(cfg.ppo, rollout=args.rollout))
        trainer = Trainer(cfg, env_factory=factory)
        summary = trainer.train(progress=False)
        rows = read_metrics(Path(d) / "metrics.csv")[1:]
    roll = sum(float(r["rollout_s"]) for r in rows)
    upd = sum(float(r["update_s"]) for r in rows)
    return {"backend": "local" if workers is None else "ray", "workers": workers or 0,
            "steps_per_s": round(len(rows) * args.rollout * args.envs / (roll + upd), 1),
            "learner_share": round(upd / (roll + upd), 4), "rollout_s_per_update": round(roll / len(rows), 4),
            "update_s_per_update": round(upd / len(rows), 4),
            "bytes_per_update": summary.get("ray_traffic_bytes", {}).get("ps", {}).get("weights_per_update")}


def measure_preset(name: str, backend: str, workers: int, args) -> dict:
    """lorasa-train's PS run of preset `name` for `--updates` + 1 updates, rollouts on `backend`."""
    from training.config import preset
    from training.trainer import Trainer
    base = preset(name)
    env = replace(base.env, workers=workers, backend=backend,
                  **({"ray_address": args.ray} if backend == "ray" else {}))
    per_update = base.ppo.rollout * env.n_envs
    with tempfile.TemporaryDirectory() as d:
        cfg = replace(base, env=env, mode="ps", out=d, total_steps=(args.updates + 1) * per_update, eval_every=0,
                      eval_episodes=0, final_eval_episodes=0, save_every=0, tensorboard=False)
        summary = Trainer(cfg).train(progress=False)
        rows = read_metrics(Path(d) / "metrics.csv")[1:]
    roll = sum(float(r["rollout_s"]) for r in rows)
    upd = sum(float(r["update_s"]) for r in rows)
    return {"preset": name, "backend": backend, "workers": workers,
            "steps_per_s": round(len(rows) * per_update / (roll + upd), 1),
            "rollout_s_per_update": round(roll / len(rows), 4), "update_s_per_update": round(upd / len(rows), 4),
            "bytes_per_update": summary.get("ray_traffic_bytes", {}).get("ps", {}).get("weights_per_update")}


def compare_backends(presets: list[str], workers: int, args) -> list[dict]:
    """Per preset: local (K env subprocesses) vs Ray (K actors) at `workers` rollout workers, alternating, `--repeats` pairs."""
    out = []
    for name in presets:
        runs = {"local": [], "ray": []}  # local: K env subprocesses, acting in this process
        for _ in range(args.repeats):
            for backend in runs:
                runs[backend].append(measure_preset(name, backend, workers, args))
        for backend, rs in runs.items():
            sps = sorted(r["steps_per_s"] for r in rs)
            out.append({**rs[0], "steps_per_s": sps[len(sps) // 2], "steps_per_s_all": sps})
        out[-1]["ray_over_local"] = round(out[-1]["steps_per_s"] / out[-2]["steps_per_s"], 3)
    return out


PROG = "python -m benchmarks.ray_scaling"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--workers", default="1,2,4,8,16", help="rollout worker counts")
    p.add_argument("--envs", type=int, default=16, help="envs in the vector env (>= the largest worker count)")
    p.add_argument("--step-ms", type=float, default=2.0, help="wall time of one env step")
    p.add_argument("--rollout", type=int, default=100, help="steps per env per update")
    p.add_argument("--updates", type=int, default=4, help="measured updates per worker count")
    p.add_argument("--episode-limit", type=int, default=100, help="steps per episode of the fixed-cost env")
    p.add_argument("--ray", default="local", help="Ray cluster: local (a private one here), auto, host:port")
    p.add_argument("--inexact", action="store_true", help="--no-env.ray-exact: workers act on their own rows")
    p.add_argument("--no-local", action="store_true", help="skip the in-process reference")
    p.add_argument("--presets", default="", help="compare Ray vs subprocess rollouts on these presets instead")
    p.add_argument("--repeats", type=int, default=3, help="--presets: alternating runs per backend")
    p.add_argument("--out", type=Path, default=Path("ray_scaling.json"), help="JSON results (a PNG beside it)")
    p.add_argument("--plot", default="", help="only redraw: comma-separated JSON files of earlier runs -> --out's PNG")
    return p


def run(argv: list[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot:
        plot([json.loads(Path(f).read_text()) for f in args.plot.split(",") if f], args.out.with_suffix(".png"))
        return 0
    if args.presets:
        return _main_presets(args, p)
    counts = [int(x) for x in args.workers.split(",") if x]
    if not counts or min(counts) < 1 or max(counts) > args.envs:
        p.error(f"--workers must be counts between 1 and --envs {args.envs}")
    from training.ray_support import connect
    connect(args.ray, local_cpus=max(counts) + 1)  # sleeping workers: more of them than cores
    results = ([] if args.no_local else [measure(None, args)]) + [measure(k, args) for k in counts]
    print(f"fixed-cost env: {args.step_ms:g} ms/step, {args.envs} envs x {args.rollout} steps per update")
    print(f"{'backend':8} {'workers':>7} {'steps/s':>10} {'learner share':>14} {'bytes/update':>13}")
    for r in results:
        print(f"{r['backend']:8} {r['workers']:>7} {r['steps_per_s']:>10,.0f} {r['learner_share']:>14.1%} "
              f"{r['bytes_per_update'] or 0:>13,}")
    args.out.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "results": results}, indent=2))
    plot([json.loads(args.out.read_text())], args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, run, argv)


def plot(reports: list[dict], path: Path) -> None:
    """Env steps/s against rollout workers, one line per fixed-cost report, with ideal linear scaling
    from 1 worker dotted; the learner's share of the wall time in a second panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for rep in reports:
        rows = [r for r in rep["results"] if r["backend"] == "ray"]
        if not rows:
            continue
        k = [r["workers"] for r in rows]
        sps = [r["steps_per_s"] for r in rows]
        label = f"{rep['settings']['step_ms']:g} ms/step" + (" (inexact)" if rep["settings"].get("inexact") else "")
        line, = ax.plot(k, sps, "o-", label=label)
        ax.plot(k, [sps[0] * w / k[0] for w in k], ":", color=line.get_color())
        bx.plot(k, [100 * r["learner_share"] for r in rows], "o-", color=line.get_color(), label=label)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("Ray rollout workers")
        a.legend()
    ax.set_yscale("log")
    ax.set_ylabel("env steps/s (dotted: linear from 1 worker)")
    bx.set_ylabel("learner share of wall time (%)")
    fig.suptitle("Fixed-cost env, 16 envs, MAPPO PS (benchmarks/ray_scaling.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main_presets(args, p: ArgumentParser) -> int:
    counts = [int(x) for x in args.workers.split(",") if x]
    if len(counts) != 1 or counts[0] < 1:
        p.error("--presets takes one --workers count (rollout workers for both backends)")
    from training.ray_support import connect
    connect(args.ray, local_cpus=counts[0] + 1)
    results = compare_backends([x for x in args.presets.split(",") if x], counts[0], args)
    print(f"{'preset':16} {'backend':10} {'workers':>7} {'steps/s (median)':>17} {'runs':>24}")
    for r in results:
        print(f"{r['preset']:16} {r['backend']:10} {r['workers']:>7} {r['steps_per_s']:>17,.0f} "
              f"{str(r['steps_per_s_all']):>24} {r.get('ray_over_local', '')}")
    args.out.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
