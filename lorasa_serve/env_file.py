"""`env.json`: which task a policy directory was trained on. The one reader and writer.

Written by `lorasa-train` beside the policy files; read by `lorasa-eval` (to rebuild the task) and
by `lorasa-export` (to verify on real observations). Layout:

    {"env": {"kind": "mamujoco" | "smax" | "smac", "scenario": ..., "agent_conf": ...,
             "agent_obsk": ..., "episode_limit": ...},        # training.envs.EnvConfig.env_block()
     "trained_by": "lorasa-train", ...}                        # free-form provenance

A bare env block (no "env" key) is read too. The runtime never needs this file to serve.
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifacts import atomic_write
from .errors import ArtifactError
from .spec import PolicySpec

ENV_FILE = "env.json"
KINDS = ("mamujoco", "smax", "smac")
# mamujoco keys an env block may leave out (older files, hand-written ones)
MAMUJOCO_DEFAULTS = {"kind": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "2x3", "agent_obsk": 1}
# Policies without env.json (e.g. the shipped policies/halfcheetah_2x3, written before env.json
# existed) whose agent sizes are exactly MaMuJoCo HalfCheetah 2x3's (two agents, obs 12, act 3,
# Gaussian) are taken to be HalfCheetah 2x3. Only the exporters use this guess, to verify on real
# observations; `lorasa-eval` requires the file.
GUESSES = {(("gaussian", 12, 3), ("gaussian", 12, 3)): MAMUJOCO_DEFAULTS}


class EnvFileMissingError(ArtifactError, FileNotFoundError):
    """The policy directory has no env.json."""


def write_env_file(directory: str | Path, env_block: dict, **provenance) -> Path:
    """Atomically write `directory/env.json` = {"env": env_block, **provenance}."""
    path = Path(directory) / ENV_FILE
    atomic_write(path, json.dumps({"env": env_block, **provenance}, indent=2).encode())
    return path


def read_env_block(directory: str | Path) -> dict:
    """The env block of `directory/env.json`, mamujoco blocks completed with MAMUJOCO_DEFAULTS."""
    block = read_env_block_as_written(directory)
    return {**MAMUJOCO_DEFAULTS, **block} if block["kind"] == "mamujoco" else block


def read_env_block_as_written(directory: str | Path) -> dict:
    """The env block exactly as the file has it. EnvFileMissingError without the file;
    ArtifactError if it is unreadable or names no known kind."""
    path = Path(directory) / ENV_FILE
    if not path.is_file():
        raise EnvFileMissingError(path, "is missing: lorasa-eval needs to know the policy's environment "
                                        "(policies written by lorasa-train have it)")
    from .files import read_file  # regular files only: a FIFO named env.json must not hang a CLI
    try:
        data = json.loads(read_file(path, 1 << 20))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(path, f"unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    block = data.get("env", data) if isinstance(data, dict) else None
    if not isinstance(block, dict) or block.get("kind") not in KINDS:
        raise ArtifactError(path, f"names no known environment kind (one of {list(KINDS)})")
    return dict(block)


def env_block_or_guess(directory: str | Path, spec: PolicySpec) -> tuple[dict | None, str]:
    """-> (env block or None, a note saying where it came from). Never raises: the file's block,
    else a guess from the agent sizes (GUESSES), else None."""
    try:
        return read_env_block(directory), f"environment from {ENV_FILE}"
    except EnvFileMissingError:
        pass
    except ArtifactError as e:
        return None, f"{ENV_FILE} {e.problem}; random observations only"
    sizes = tuple((spec.action, a.obs_dim, a.act_dim) for a in spec.agents)
    if sizes in GUESSES:
        name = f"{GUESSES[sizes]['scenario']} {GUESSES[sizes]['agent_conf']}"
        return dict(GUESSES[sizes]), f"no {ENV_FILE}; the agent sizes match {name}"
    return None, f"no {ENV_FILE} and sizes match no default environment: random observations only"
