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
from lorasa_serve.cli import ArgumentParser, UsageError, run_cli
from lorasa_serve.files import check_output_file

from .actor import param_counts
from . import eval_targets as targets
from .envs import EnvConfig, EnvInfo, make_vec_env
from .episodes import ActFn, EpisodeStats, random_act, run_episodes


def team_act_fn(backend, info: EnvInfo, n_envs: int) -> ActFn:
    """Every env's team in one `lorasa_serve.envloop.TeamPolicy` batch (the env-loop adapter users
    call with PettingZoo dicts): rows in the policy's agent order, obs padded per agent, recurrent state
    kept per (env, agent) and zeroed where `reset`, actions split back at each agent's size. Any backend:
    `Engine`, `OnnxEngine`, `PolicyClient` (HTTP). The vector env clips actions to the box itself."""
    from lorasa_serve.envloop import TeamPolicy
    ids, categorical = list(info.agent_ids), info.action == "categorical"
    team = [TeamPolicy(backend, n_envs=n_envs, agent_map={a: a for a in ids})]

    def act(obs, avail, state, reset):
        E = obs.shape[0]  # obs [E, N, obs_max], avail [E, N, act_max]
        for e in np.flatnonzero(reset):
            team[0].reset(int(e))
        dicts = [{a: obs[e, n, :info.obs_dims[n]] for n, a in enumerate(ids)} for e in range(E)]
        masks = [{a: avail[e, n, :info.act_dims[n]] for n, a in enumerate(ids)} for e in range(E)] \
            if categorical else None
        out = team[0].act(dicts, masks)
        width = 0 if categorical else info.act_max
        actions = np.zeros((E, len(ids)) if categorical else (E, len(ids), width),
                           np.int64 if categorical else np.float32)
        for e in range(E):
            for n, a in enumerate(ids):
                if categorical:
                    actions[e, n] = out[e][a]
                else:
                    actions[e, n, :info.act_dims[n]] = out[e][a]
        return actions, None  # the state lives in the TeamPolicy

    return act


def engine_act_fn(engine: ActBackend, info: EnvInfo, n_envs: int) -> ActFn:
    """In-process: `engine.act` (`Engine`, `OnnxEngine`) through the env-loop adapter (team_act_fn)."""
    return team_act_fn(engine, info, n_envs)


def http_act_fn(url: str, info: EnvInfo, n_envs: int, timeout: float = 30.0) -> ActFn:
    """Act through the HTTP service (services/, README "HTTP service") with `lorasa_serve.client`:
    one binary Open Inference Protocol request per step with every env's agents as rows, each row
    carrying its recurrent state and reset flag (the stateless form; the next state comes back).
    A service that cannot be reached (or answers no policy) is a UsageError: one line, exit 2."""
    from lorasa_serve.client import ClientError, PolicyClient
    try:
        return team_act_fn(PolicyClient(url, timeout=timeout), info, n_envs)
    except (ClientError, ValueError) as e:
        raise UsageError(f"--url {url}: cannot use the service ({e}); start it (make serve) or fix --url") from None


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
            return spec, http_act_fn(args.url, info, args.episodes), f"HTTP {args.url}"
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
        return engine.spec, http_act_fn(args.url, info, args.episodes), f"{kind}, HTTP {args.url}"
    return engine.spec, engine_act_fn(engine, info, args.episodes), f"{kind}, Engine.act in-process"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="lorasa-eval", description=__doc__)
    p.add_argument("policy_dir", type=Path, help="policy / run directory, or a lorasa-export --merge directory")
    p.add_argument("--episodes", type=int, default=10, help="episodes (one per parallel env)")
    p.add_argument("--compare-random", action="store_true", help="also run a uniform random policy")
    p.add_argument("--url", help="act through the HTTP service at this base URL instead of in-process")
    p.add_argument("--seed", type=int, default=12345, help="seeds the environments and the sampling")
    p.add_argument("--mode", choices=["auto", "lora", "merged"], default="auto", help="engine adapter mode")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small batches: 1 is fastest)")
    env = p.add_argument_group("task (default: the directory's env.json)")
    env.add_argument("--env.kind", dest="env.kind", choices=["mamujoco", "smax", "smac"],
                     help="the environment package")
    env.add_argument("--env.scenario", dest="env.scenario", help="MaMuJoCo scenario or SMAX / SMAC map")
    env.add_argument("--env.agent-conf", dest="env.agent_conf", help="MaMuJoCo agent partition, e.g. 2x3")
    env.add_argument("--env.agent-obsk", dest="env.agent_obsk", type=int,
                     help="MaMuJoCo: observe joints up to this many hops away")
    env.add_argument("--env.episode-limit", dest="env.episode_limit", type=int, help="steps per episode at most")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes {args.episodes} must be >= 1")
    if args.threads < 1:
        p.error(f"--threads {args.threads} must be >= 1")
    return args


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    target = targets.classify(args.policy_dir)
    overrides = {k: v for k, v in targets.env_overrides(vars(args)).items() if v is not None}
    env_cfg, env_from = targets.resolve_env(target, overrides)
    if args.json and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: directory {args.json.parent} does not exist; create it "
                         "or pass another path")
    if args.json:
        check_output_file(args.json)  # not a FIFO (writing would block), a device or a dangling link
    venv = make_vec_env(env_cfg, n_envs=args.episodes, workers=0)
    try:
        info = venv.info
        spec, act, via = resolve_actor(args, info, target)  # checks that the policy fits the env
    except BaseException:
        venv.close()
        raise
    _run(args, venv, info, spec, act, via, env_cfg, env_from)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("lorasa-eval", run, argv)


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
    sys.exit(main())
