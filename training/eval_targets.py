"""What `lorasa-eval DIR` evaluates, and on which task. DIR is one of:

    policy    a policy directory (policy.json + backbone [+ adapters]) or a lorasa-train run
    run       a lorasa-train run without a single backbone (NPS / SePS / MTL): train_state only
    export    a `lorasa-export --merge` directory: policy.json (the source spec), manifest.json and one
              merged single-agent policy per agent in merged/<agent>/; the team acts with each agent's
              rows through its own merged policy
    merged    one agent's merged policy (export/merged/<agent>): it cannot act for a whole team, so
              this is a UsageError pointing at the export directory

The task comes from DIR's env.json (or its train_state config); for an export (or a merged agent inside
one) from the export's source (manifest.json "source"); explicit --env.* flags override any field.
Every failure is a UsageError naming what to pass instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lorasa_serve.cli import UsageError

from .checkpoint import STATE_DIR
from .envs import EnvConfig, EnvInfo
from .episodes import ActFn
from .rundir import TASK_KEYS, source_env

MANIFEST = "manifest.json"
ENV_FLAGS = "--env.kind mamujoco --env.scenario HalfCheetah --env.agent-conf 2x3"


@dataclass(frozen=True)
class Target:
    kind: str  # "policy", "run", "export" or "merged"
    path: Path
    export: Path | None = None  # the export directory (kinds export / merged)


def classify(path: Path) -> Target:
    """By which files DIR has (whatever they are: a FIFO or broken symlink in their place is reported,
    as a typed error, by the reader of that file)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory; pass a policy directory written by lorasa-train "
                         "or an export directory written by lorasa-export --merge")
    if os.path.lexists(path / MANIFEST):
        return Target("export", path, path)
    parent = path.parent
    if parent.name == "merged" and os.path.lexists(parent.parent / MANIFEST):
        return Target("merged", path, parent.parent)
    if os.path.lexists(path / "policy.json"):
        return Target("policy", path)
    if os.path.lexists(path / STATE_DIR / "state.json"):
        return Target("run", path)
    raise UsageError(f"{path} is not a policy: it has no policy.json, {STATE_DIR}/ or {MANIFEST}; pass a "
                     "directory written by lorasa-train (its --out) or by lorasa-export --merge")


def export_source(export: Path) -> Path | None:
    """The export's source policy directory (manifest.json "source"), None when it names none. The
    manifest is read through `onnx_contract.read_manifest` (typed errors: a FIFO, a device, a broken
    symlink, an oversized file or not JSON)."""
    from lorasa_serve.onnx_contract import read_manifest
    src = read_manifest(Path(export)).get("source")
    return Path(src) if isinstance(src, str) and src else None


def resolve_env(target: Target, overrides: dict) -> tuple[EnvConfig, str]:
    """-> (the task, where it came from). `overrides`: explicit --env.* values by EnvConfig field."""
    task, where = source_env(target.path), f"{target.path}/env.json"
    if task is None and target.export is not None:
        src = export_source(target.export)
        task = None if src is None else source_env(src)
        where = f"the export's source {src}/env.json"
    if task is None and not overrides:
        hint = "" if target.export is None else f" and the export's source ({export_source(target.export)}) has none"
        raise UsageError(f"{target.path} records no task (no env.json{hint}): pass the one it was trained "
                         f"on, e.g. {ENV_FLAGS}")
    known = {f.name for f in fields(EnvConfig)}
    block = {**(task or {}), **{k: v for k, v in overrides.items() if k in known}}
    if overrides:
        where = "--env flags" + (f" over {where}" if task else "")
    return EnvConfig(**block), where


def check_policy_fits_env(spec, info: EnvInfo, target: Target) -> None:
    want = tuple((a.agent_id, a.obs_dim, a.act_dim) for a in spec.agents)
    have = tuple(zip(info.agent_ids, info.obs_dims, info.act_dims))
    if want == have and spec.action == info.action:
        return
    if target.kind == "merged":
        raise UsageError(f"{target.path} is the merged policy of {spec.agent_ids[0]} alone and cannot act for "
                         f"the team {list(info.agent_ids)} of {info.name}: evaluate the export directory "
                         f"{target.export} instead (it holds every agent's merged policy)")
    raise UsageError(f"{target.path}: policy agents {want} ({spec.action}) do not match env {info.name}: "
                     f"{have} ({info.action}); pass the task it was trained on with --env.* flags")


def load_merged_team(export: Path):
    """-> (source spec, {agent: Engine over export/merged/<agent>}) for a whole team."""
    from lorasa_serve import Engine, PolicySpec
    spec = PolicySpec.load(Path(export) / "policy.json")
    missing = [a for a in spec.agent_ids if not (Path(export) / "merged" / a / "policy.json").is_file()]
    if missing:
        raise UsageError(f"{export} has no merged policy for agents {missing}: re-export with "
                         f"lorasa-export SOURCE --out {export} --merge (every agent), or evaluate the source")
    engines = {a: Engine.from_dir(Path(export) / "merged" / a, device="cpu", mode="lora") for a in spec.agent_ids}
    for a, eng in engines.items():
        one, want = eng.spec.agents, spec.agent(a)
        if len(one) != 1 or (one[0].obs_dim, one[0].act_dim) != (want.obs_dim, want.act_dim):
            raise UsageError(f"{export}/merged/{a} does not match {a} in {export}/policy.json: re-export "
                             f"with lorasa-export SOURCE --out {export} --merge")
    return spec, engines


def merged_team_act_fn(engines: dict, info: EnvInfo) -> ActFn:
    """Each agent's rows (one per env) through its own merged single-agent Engine; state is the list of
    per-agent next states [E, H] (None for feed-forward policies)."""
    import torch
    N, categorical = info.n_agents, info.action == "categorical"
    order = [engines[a] for a in info.agent_ids]

    def act(obs, avail, state, reset):
        E = obs.shape[0]
        states = state if state is not None else [None] * N
        reset_t = torch.from_numpy(reset)
        acts, nxt = [], []
        for i, eng in enumerate(order):
            ag = eng.spec.agents[0]
            ids = np.zeros(E, np.int64)  # the engine's only agent
            av = torch.from_numpy(avail[:, i, :ag.act_dim]) if categorical else None
            out = eng.act(ids, torch.from_numpy(np.ascontiguousarray(obs[:, i, :eng.spec.obs_max])),
                          states[i], reset_t, av, deterministic=True)
            acts.append(out.actions.numpy())
            nxt.append(out.state)
        if categorical:
            return np.stack(acts, axis=1), nxt  # [E, N]
        actions = np.zeros((E, N, info.act_max), np.float32)
        for i, a in enumerate(acts):
            actions[:, i, :a.shape[1]] = a
        return actions, nxt

    return act


def env_overrides(ns: dict) -> dict:
    """{EnvConfig field: value} of the --env.* flags given (argparse dests 'env.<field>')."""
    return {k[4:]: v for k, v in ns.items() if k.startswith("env.") and k[4:] in TASK_KEYS}
