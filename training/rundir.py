"""Checks and repairs of lorasa-train run directories, done before a run writes anything.

    check_resume(OUT)       OUT is a run with a whole checkpoint (else a UsageError naming the fix)
    check_init_source(SRC)  SRC is a phase-1 run / snapshot (train_state) or a PS policy directory
    source_env(SRC)         the task SRC was trained on (env.json, else its train_state config)
    check_out_writable(OUT) OUT is (or can be created as) a writable directory
    check_fresh_out(OUT)    OUT does not already hold a run (a fresh run would append to its metrics)
    truncate_metrics(CSV, step)  drop the rows a killed run wrote after its last checkpoint
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lorasa_serve import env_file
from lorasa_serve.artifacts import atomic_write
from lorasa_serve.cli import UsageError
from lorasa_serve.errors import ArtifactError, LorasaError

from .checkpoint import STATE_DIR, load_meta

RUN_FILES = ("metrics.csv", "summary.json", "policy.json", f"{STATE_DIR}/state.json")
TASK_KEYS = ("kind", "scenario", "agent_conf", "agent_obsk", "episode_limit")
TASK_IDENTITY = TASK_KEYS[:4]  # which task (the episode limit is a setting of it)


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / STATE_DIR / "state.json").is_file()


def check_resume(out: Path) -> dict:
    """-> the checkpoint's state.json of run directory `out`."""
    out = Path(out)
    if not out.is_dir():
        raise UsageError(f"--resume {out}: no such directory; pass the --out directory of an earlier "
                         "lorasa-train run, or start a new run with --out")
    if not has_checkpoint(out):
        raise UsageError(f"--resume {out}: not a lorasa-train run with a checkpoint ({STATE_DIR}/state.json "
                         "is missing); start a new run with --out instead (or resume the run's own directory)")
    try:
        return load_meta(out)
    except (OSError, LorasaError) as e:
        raise UsageError(f"--resume {out}: {STATE_DIR}/state.json is unreadable ({e}); start a new run "
                         "with --out instead") from None


def check_init_source(src: Path) -> None:
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"--init-from {src}: no such directory; pass a phase-1 run directory (or its "
                         "snapshots/<step>) written by lorasa-train --mode ps / seps")
    if not has_checkpoint(src) and not (src / "policy.json").is_file():
        raise UsageError(f"--init-from {src}: neither a phase-1 run ({STATE_DIR}/state.json missing) nor a "
                         "policy directory (policy.json missing); pass the --out directory of a "
                         "lorasa-train --mode ps / seps run or one of its snapshots/<step>")


def source_env(src: Path) -> dict | None:
    """The task block {kind, scenario, agent_conf, agent_obsk, episode_limit} `src` was trained on, from
    its env.json, else from its train_state config; None when neither records it."""
    src = Path(src)
    try:
        block = env_file.read_env_block_as_written(src)  # the one env.json reader
    except ArtifactError:  # missing or unusable: fall back to the checkpoint's config
        block = None
    if block is None and has_checkpoint(src):
        try:
            block = load_meta(src).get("config", {}).get("env")
        except (OSError, LorasaError, AttributeError):
            block = None
    if isinstance(block, dict) and block.get("kind"):
        return {k: block[k] for k in TASK_KEYS if k in block}
    return None


def check_out_writable(out: Path) -> None:
    """OUT is a directory, or one lorasa-train can create: not a file, no file on its path, and its
    nearest existing parent writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; pass a directory for the run")
    near = out.absolute()
    while not near.exists():
        near = near.parent
    if not near.is_dir():
        raise UsageError(f"--out {out}: {near} is a file, so the run directory cannot be created there; pass "
                         "another --out")
    if not os.access(near, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {near} is not writable; pass a directory you can write to")


def check_fresh_out(out: Path) -> None:
    out = Path(out)
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found:
        raise UsageError(f"--out {out} already holds a run ({found[0]}); continue it with --resume {out}, "
                         "or pass a new --out directory")


def truncate_metrics(path: Path, env_steps: int) -> int:
    """Keep only the rows of metrics.csv at or before `env_steps` (a killed run logged past its last
    checkpoint; the resumed run logs those steps again). Rewritten atomically -> rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields:
        return 0
    keep = [r for r in rows if _step(r) is not None and _step(r) <= env_steps]
    if len(keep) == len(rows):
        return 0
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(keep)
    atomic_write(path, buf.getvalue().encode())
    return len(rows) - len(keep)


def _step(row: dict) -> int | None:
    try:
        return int(row.get("env_steps") or "")
    except ValueError:
        return None
