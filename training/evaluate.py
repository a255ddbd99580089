"""`lorasa-eval POLICY_DIR`: run a policy directory's episodes in the environment it was trained on,
acting through `lorasa_serve.Engine.act` in-process (the serving code path: mixed batch of every env's
agents, recurrent state and reset flags passed back each step) or through the HTTP service (`--url`).

    lorasa-eval policies/halfcheetah_2x3 --episodes 5 --compare-random
    lorasa-eval runs/smax_3s5z --episodes 32 --json out.json
    lorasa-eval policies/halfcheetah_2x3 --url http://127.0.0.1:3000
    lorasa-eval exports/halfcheetah --episodes 5        # a lorasa-export --merge directory
    lorasa-eval my_policy --env.kind mamujoco --env.scenario HalfCheetah --env.agent-conf 2x3

The task comes from the directory's env.json (an export: its source's); --env.* flags override it.
A user error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from lorasa_serve.backend import ActBackend

from .actor import param_counts
from . import eval_targets as targets
from .envs import EnvConfig, EnvInfo, make_vec_env
from .episodes import ActFn, EpisodeStats, random_act, run_episodes
from .errors import OneLineParser, UsageError, exit_on_usage_error


def engine_act_fn(engine: ActBackend, info: EnvInfo, n_envs: int) -> ActFn:
    """Every env's team in one mixed `engine.act` batch of E*N rows (env-major); any backend
    (`Engine`, `OnnxEngine`) implementing `lorasa_serve.backend.ActBackend`."""
    import torch
    ids = np.tile(engine.agent_index(list(info.agent_ids)), n_envs)  # [E*N]
    N, categorical = info.n_agents, info.action == "categorical"

    def act(obs, avail, state, reset):
        E = obs.shape[0]
        out = engine.act(ids, torch.from_numpy(obs.reshape(E * N, -1)), state, torch.from_numpy(np.repeat(reset, N)),
                         torch.from_numpy(avail.reshape(E * N, -1)) if categorical else None,
                         deterministic=True)
        actions = out.actions.numpy()
        return (actions.reshape(E, N) if categorical else actions.reshape(E, N, -1)), out.state

    return act


def http_act_fn(url: str, info: EnvInfo, timeout: float = 30.0) -> ActFn:
    """Act through the HTTP service (services/, README "HTTP service") with `lorasa_serve.client`:
    one binary Open Inference Protocol request per step with every env's agents as rows, each row
    carrying its recurrent state and reset flag (the stateless form; the next state comes back)."""
    from lorasa_serve.client import PolicyClient
    client = PolicyClient(url, timeout=timeout)
    N, categorical = info.n_agents, info.action == "categorical"
    obs_max, act_max = max(info.obs_dims), max(info.act_dims)
    own_obs = np.arange(obs_max) < np.asarray(info.obs_dims)[:, None]  # [N, obs_max]
    own_act = np.arange(act_max) < np.asarray(info.act_dims)[:, None]  # [N, act_max]

    def act(obs, avail, state, reset):
        E = obs.shape[0]
        obs = np.where(own_obs, obs[:, :, :obs_max], 0).reshape(E * N, obs_max)
        mask = (avail[:, :, :act_max].astype(bool) & own_act).reshape(E * N, act_max) if categorical else None
        out = client.act(np.tile(np.asarray(info.agent_ids, dtype=object), E), obs.astype(np.float32),
                         None if state is None else np.asarray(state, np.float32), np.repeat(reset, N), mask)
        actions = out.actions.reshape(E, N) if categorical else out.actions.reshape(E, N, -1)
        return actions, out.state

    return act


def actor_only_run(directory: Path) -> bool:
    """A run directory lorasa-train wrote for an actor without one shared backbone (NPS, SePS, MTL,
    SePS+LoRA): train_state only, no policy.json."""
    from .checkpoint import STATE_DIR
    return not (Path(directory) / "policy.json").exists() and \
        (Path(directory) / STATE_DIR / "state.json").is_file()


def run_act_fn(directory: Path, info: EnvInfo, target: targets.Target):
    """-> (spec, ActFn, kind) acting with a run's training actor (the training forward)."""
    from . import checkpoint
    from .mappo import Policy
    from .trainer import actor_from_state, torch_act_fn
    actor = actor_from_state(Path(directory), checkpoint.load_meta(directory))
    targets.check_policy_fits_env(actor.spec, info, target)
    return actor.spec, torch_act_fn(Policy.build(actor, info)), actor.kind


def summarise(stats: EpisodeStats) -> str:
    s = f"return {stats.mean_return:9.2f} +- {stats.std_return:7.2f}  (len {stats.mean_length:.0f})"
    if not math.isnan(stats.win_rate):
        s += f"  win rate {stats.win_rate:.3f}"
    return s


def resolve_actor(args, info: EnvInfo, target: targets.Target):
    """-> (spec, ActFn, description): the Engine in-process, the HTTP service, an export's merged
    per-agent policies, or an NPS run's actor."""
    from lorasa_serve import Engine
    if target.kind == "export":
        spec, engines = targets.load_merged_team(target.path)
        targets.check_policy_fits_env(spec, info, target)
        if args.url:
            return spec, http_act_fn(args.url, info), f"HTTP {args.url}"
        return spec, targets.merged_team_act_fn(engines, info), \
            "merged per-agent policies (merged/<agent>), Engine.act in-process"
    if actor_only_run(args.policy_dir):
        if args.url:
            raise UsageError("this run has no servable policy directory (no single shared backbone: NPS / "
                             "SePS / MTL), so --url cannot serve it: drop --url to evaluate it in-process")
        spec, act, kind = run_act_fn(args.policy_dir, info, target)
        name = {"nps": "NPS", "seps": "SePS", "mtl": "MTL", "lora": "SePS+LoRA"}.get(kind, kind)
        return spec, act, f"the {name} training actor (no single backbone, so no policy directory)"
    engine = Engine.from_dir(args.policy_dir, device="cpu", mode=args.mode)
    targets.check_policy_fits_env(engine.spec, info, target)
    kind = "PS+LoRA" if engine.adapter(engine.agent_ids[0]) is not None else "PS"
    if args.url:
        return engine.spec, http_act_fn(args.url, info), f"{kind}, HTTP {args.url}"
    return engine.spec, engine_act_fn(engine, info, args.episodes), f"{kind}, Engine.act in-process"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="lorasa-eval", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy_dir", type=Path, help="policy / run directory, or a lorasa-export --merge directory")
    p.add_argument("--episodes", type=int, default=10, help="episodes (one per parallel env)")
    p.add_argument("--compare-random", action="store_true", help="also run a uniform random policy")
    p.add_argument("--url", help="act through the HTTP service at this base URL instead of in-process")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--mode", choices=["auto", "lora", "merged"], default="auto", help="engine adapter mode")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small batches: 1 is fastest)")
    env = p.add_argument_group("task (default: the directory's env.json)")
    env.add_argument("--env.kind", dest="env.kind", choices=["mamujoco", "smax", "smac"])
    env.add_argument("--env.scenario", dest="env.scenario", help="MaMuJoCo scenario or SMAX / SMAC map")
    env.add_argument("--env.agent-conf", dest="env.agent_conf", help="MaMuJoCo agent partition, e.g. 2x3")
    env.add_argument("--env.agent-obsk", dest="env.agent_obsk", type=int)
    env.add_argument("--env.episode-limit", dest="env.episode_limit", type=int)
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes {args.episodes} must be >= 1")
    if args.threads < 1:
        p.error(f"--threads {args.threads} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    with exit_on_usage_error("lorasa-eval"):
        target = targets.classify(args.policy_dir)
        overrides = {k: v for k, v in targets.env_overrides(vars(args)).items() if v is not None}
        env_cfg, env_from = targets.resolve_env(target, overrides)
        if args.json and not args.json.parent.is_dir():
            raise UsageError(f"--json {args.json}: directory {args.json.parent} does not exist; create it "
                             "or pass another path")
        venv = make_vec_env(env_cfg, n_envs=args.episodes, workers=0)
        try:
            info = venv.info
            spec, act, via = resolve_actor(args, info, target)  # checks that the policy fits the env
        except BaseException:
            venv.close()
            raise
    _run(args, venv, info, spec, act, via, env_cfg, env_from)


def _run(args, venv, info: EnvInfo, spec, act: ActFn, via: str, env_cfg: EnvConfig, env_from: str) -> None:
    counts = param_counts(spec)
    print(f"policy {args.policy_dir}  env {info.name} (from {env_from})  agents {list(info.agent_ids)}")
    print("actor parameters: PS {ps_total} shared | NPS {nps_per_agent}/agent ({nps_total} total) | "
          "LoRASA {backbone} shared + {lorasa_adapter_per_agent}/agent ({lorasa_total} total)".format(**counts))

    t0 = time.perf_counter()
    stats = run_episodes(venv, act, args.seed)
    print(f"policy  ({via}, {args.episodes} episodes, {time.perf_counter() - t0:.1f}s): {summarise(stats)}")
    result = {"policy_dir": str(args.policy_dir), "env": env_cfg.env_block(), "env_from": env_from, "via": via,
              "policy": stats.to_dict(), "param_counts": counts}
    if args.compare_random:
        rnd = run_episodes(venv, random_act(info, args.seed), args.seed)
        print(f"random  ({args.episodes} episodes): {summarise(rnd)}")
        result["random"] = rnd.to_dict()
    venv.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
