"""The experiment grid behind `lorasa-report`: declared in TOML, expanded into lorasa-train runs with
their dependencies (a LoRA run starts from its PS / SePS run's snapshot at the switch step), run a few
at a time, resumable across sessions and machines: when a run finishes, its compact results (summary.json
with the final evaluation's per-episode returns, metrics.csv, the run's config and counters as
state.json; no weights) are copied to `<grid dir>/<grid name>/runs/<run key>/` (commit them), and a run
whose compact results are there is done, even where the runs root is gone. A base (PS / SePS) run whose
LoRA runs are not all done needs its snapshot in the runs root: without it (a new machine), the base run
is trained again, so that its LoRA runs start from the phase 1 their results are compared with.

    seeds = [1, 2, 3]
    total_steps = 300000
    switch_step = 150000
    [[scenarios]]
    preset = "halfcheetah_2x3"
    methods = ["mappo:ps", "mappo:nps", "mappo:lorasa", "a2po:ps", "a2po:lorasa"]
    total_steps = 600000                         # optional: this scenario's own budget and switch
    switch_step = 300000
    [plan]                                       # optional: measured env-steps/s for `lorasa-report plan`
    steps_per_s = { halfcheetah_2x3 = { "mappo:ps" = 2679 } }
    [ablations]                                  # optional; on one scenario, from its mappo:ps runs
    preset = "halfcheetah_2x3"
    ranks = [4, 16, 64]
    layers = { mlp = ["mlp.0", "mlp.1", "mlp.2"], gru = ["gru.x", "gru.h"] }
    switch_steps = [75000, 225000]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .config import PRESETS
from .errors import UsageError

METHODS = ("ps", "nps", "seps", "mtl", "lorasa", "seps_lorasa")
BASE_OF = {"lorasa": "ps", "seps_lorasa": "seps"}  # phase-2 methods and the run they start from


@dataclass(frozen=True)
class Run:
    key: str  # e.g. "halfcheetah_2x3/mappo-lorasa/seed1" (also its directory under the runs root)
    preset: str
    group: str  # "main" or the ablation's name ("rank=4", "layers=mlp", "switch=75000")
    method: str  # "mappo:lorasa", ...
    seed: int
    args: tuple[str, ...]  # lorasa-train flags (without --out)
    needs: str | None = None  # key of the run whose snapshot this one starts from
    total_steps: int = 0  # env steps at the run's end (all phases)
    switch_step: int = 0  # LoRA runs: where they start from their base run's snapshot

    @property
    def trained_steps(self) -> int:
        """Env steps this run trains itself (a LoRA run continues its base run from the switch)."""
        return self.total_steps - (self.switch_step if self.needs else 0)


@dataclass
class Grid:
    seeds: list[int]
    total_steps: int
    switch_step: int
    scenarios: list[dict]
    ablations: dict | None = None
    eval_every: int = 25_000
    eval_episodes: int = 4
    final_eval_episodes: int = 16
    plan: dict | None = None
    runs: list[Run] = field(default_factory=list)
    results: Path | None = None  # compact results root: <grid dir>/<grid name>/runs (set by load)

    @classmethod
    def load(cls, path: Path) -> "Grid":
        """The grid in TOML file `path`; UsageError (one line naming the fix) for a missing file,
        malformed TOML or a grid that does not describe runs."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"grid file {path} does not exist; pass the path of a grid TOML "
                             "(e.g. reports/grid.toml)")
        try:
            d = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid TOML ({e}); fix the file") from None
        known = {"seeds", "total_steps", "switch_step", "scenarios", "ablations", "eval_every",
                 "eval_episodes", "final_eval_episodes", "plan"}
        if set(d) - known:
            raise UsageError(f"{path}: unknown keys {sorted(set(d) - known)}; use only {sorted(known)}")
        missing = sorted({"seeds", "total_steps", "switch_step", "scenarios"} - set(d))
        if missing:
            raise UsageError(f"{path}: missing keys {missing}; add them (see training/grid.py for an example)")
        g = cls(**d, results=path.parent / path.stem / "runs")
        try:
            g.runs = g.expand()
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None
        return g

    def budget(self, sc: dict) -> tuple[int, int]:
        """(total steps, switch step) of scenario entry `sc` (its own, else the grid's)."""
        total, switch = int(sc.get("total_steps", self.total_steps)), int(sc.get("switch_step", self.switch_step))
        if not 0 < switch < total:
            raise UsageError(f"{sc.get('preset')}: switch_step {switch} must be between 0 and total_steps {total}")
        return total, switch

    def switch_steps(self, preset: str | None = None, switch: int | None = None) -> list[int]:
        """Snapshot steps of a base run: its scenario's switch, plus the ablations' on their preset."""
        own = self.switch_step if switch is None else switch
        ab = self.ablations or {}
        extra = [*ab.get("switch_steps", []), self.switch_step] \
            if ab and (preset is None or ab.get("preset") == preset) else []
        return sorted({own, *extra})

    def expand(self) -> list[Run]:
        runs: list[Run] = []
        for sc in self.scenarios:
            if not isinstance(sc, dict) or "preset" not in sc or not isinstance(sc.get("methods"), list):
                raise UsageError("every [[scenarios]] entry needs preset = \"...\" and methods = [...]")
            preset = sc["preset"]
            if preset not in PRESETS:
                raise UsageError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
            extra = [f"--{k}={v}" for k, v in sc.get("overrides", {}).items()]
            total, switch = self.budget(sc)
            for seed in self.seeds:
                for m in sc["methods"]:
                    runs.append(self._run(preset, "main", m, seed, extra, switch=switch, total=total))
        ab = self.ablations
        if ab:
            if ab.get("preset") not in PRESETS:
                raise UsageError(f"[ablations] preset {ab.get('preset')!r}: use one of {sorted(PRESETS)}")
            preset, algo = ab["preset"], ab.get("algo", "mappo")
            if any(sc.get("preset") == preset and self.budget(sc) != (self.total_steps, self.switch_step)
                   for sc in self.scenarios):
                raise UsageError(f"[ablations] on {preset} use the grid's total_steps / switch_step: drop that "
                                 "scenario's own total_steps / switch_step (or ablate another preset)")
            extra = [f"--{k}={v}" for k, v in ab.get("overrides", {}).items()]
            method = f"{algo}:lorasa"
            for seed in self.seeds:
                for r in ab.get("ranks", []):
                    runs.append(self._run(preset, f"rank={r}", method, seed,
                                          extra + [f"--lora.rank={r}", f"--lora.alpha={r}"]))
                for name, layers in ab.get("layers", {}).items():
                    runs.append(self._run(preset, f"layers={name}", method, seed,
                                          extra + [f"--lora.layers={','.join(layers)}"]))
                for s in ab.get("switch_steps", []):
                    runs.append(self._run(preset, f"switch={s}", method, seed, extra, switch=s))
        keys = [r.key for r in runs]
        if len(set(keys)) != len(keys):
            raise UsageError("the grid declares the same run twice: remove the duplicate method or seed")
        missing = {r.needs for r in runs if r.needs} - set(keys)
        if missing:
            raise UsageError(f"LoRA runs need their base runs in the grid: add {sorted(missing)}")
        return runs

    def _run(self, preset: str, group: str, method: str, seed: int, extra: list[str],
             switch: int | None = None, total: int | None = None) -> Run:
        algo, _, mode = method.partition(":")
        if algo not in ("mappo", "a2po") or mode not in METHODS:
            raise UsageError(f"unknown method {method!r}: write <mappo|a2po>:<{'|'.join(METHODS)}>, "
                             "e.g. \"mappo:lorasa\"")
        name = f"{algo}-{mode}" if group == "main" else f"ablation-{group}"
        key = f"{preset}/{name}/seed{seed}"
        total, switch = total or self.total_steps, switch or self.switch_step
        args = ["--preset", preset, "--algo", algo, "--mode", mode, "--seed", str(seed),
                "--total-steps", str(total), "--eval-every", str(self.eval_every),
                "--eval-episodes", str(self.eval_episodes),
                "--final-eval-episodes", str(self.final_eval_episodes), "--no-tensorboard", *extra]
        needs = None
        if mode in BASE_OF:
            needs = f"{preset}/{algo}-{BASE_OF[mode]}/seed{seed}"
            args += ["--init-from", f"{{runs}}/{needs}/snapshots/{switch}"]
        elif mode in ("ps", "seps"):
            args += ["--snapshot-steps", ",".join(map(str, self.switch_steps(preset, switch)))]
        return Run(key, preset, group, method, seed, tuple(args), needs, total, switch)


# --- compact results (committed; no weights) ----------------------------------------------------
COMPACT_FILES = {"summary.json": "summary.json", "metrics.csv": "metrics.csv",
                 "train_state/state.json": "state.json"}  # source in the run dir -> name in the compact dir


def compact_dir(grid: Grid, run: Run) -> Path | None:
    return None if grid.results is None else grid.results / run.key


def save_compact(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's compact results (COMPACT_FILES; summary.json last, as the done marker)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in sorted(COMPACT_FILES.items(), key=lambda kv: kv[0] == "summary.json"):
        if (run_dir / src).is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(run_dir / src, tmp)
            os.replace(tmp, dest / name)


def has_compact(grid: Grid, run: Run) -> bool:
    d = compact_dir(grid, run)
    return d is not None and (d / "summary.json").is_file()


def sync_compact(grid: Grid, runs_root: Path) -> None:
    """Copy the compact results of runs finished in the runs root but not yet copied."""
    for run in grid.runs:
        if not has_compact(grid, run) and (runs_root / run.key / "summary.json").is_file():
            if grid.results is not None:
                save_compact(runs_root / run.key, compact_dir(grid, run))


def is_done(runs_root: Path, run: Run, grid: Grid | None = None) -> bool:
    """Finished: compact results committed (or summary.json in the runs root). A base run whose
    dependents are not all done also needs its snapshots in the runs root (else it is trained again)."""
    done = (runs_root / run.key / "summary.json").is_file() or (grid is not None and has_compact(grid, run))
    if not done or grid is None:
        return done
    waiting = [r for r in grid.runs if r.needs == run.key and not is_done(runs_root, r, grid)]
    return all(_snapshot_of(runs_root, r).is_dir() for r in waiting)


def _snapshot_of(runs_root: Path, run: Run) -> Path:
    args = list(run.args)
    return Path(args[args.index("--init-from") + 1].replace("{runs}", str(runs_root))) / "train_state"


def run_grid(grid: Grid, runs_root: Path, jobs: int = 2, python: str = sys.executable) -> list[str]:
    """Run every missing run (`jobs` at a time, each a 1-thread lorasa-train process) -> failed keys."""
    sync_compact(grid, runs_root)
    todo = [r for r in grid.runs if not is_done(runs_root, r, grid)]
    failed: list[str] = []
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    bar = tqdm(total=len(grid.runs), initial=len(grid.runs) - len(todo), unit="run", desc="grid")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while todo or running:
        for key, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[key]
                if proc.returncode != 0:
                    failed.append(key)
                    tqdm.write(f"FAILED {key} (exit {proc.returncode}): see {runs_root / key / 'train.log'}")
                elif grid.results is not None:
                    save_compact(runs_root / key, grid.results / key)
                bar.update(1)
        blocked = set(failed) | set(running) | {r.key for r in todo}
        for run in list(todo):
            if len(running) >= jobs:
                break
            if run.needs in blocked:
                if run.needs in failed:
                    todo.remove(run)
                    failed.append(run.key)
                    bar.update(1)
                continue
            todo.remove(run)
            out = runs_root / run.key
            out.mkdir(parents=True, exist_ok=True)
            args = [a.replace("{runs}", str(runs_root)) for a in run.args] + _restart_args(out)
            log = open(out / "train.log", "w")
            cmd = [python, "-m", "training.cli", *args, "--out", str(out)]
            log.write(" ".join(cmd) + "\n")
            log.flush()
            running[run.key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
            bar.set_postfix_str(run.key)
        time.sleep(0.5)
    bar.close()
    return failed


def _restart_args(out: Path) -> list[str]:
    """An unfinished run (killed, or failed earlier) continues from its checkpoint; without one, the
    partial metrics it logged are dropped so lorasa-train starts it afresh."""
    if (out / "train_state" / "state.json").is_file():
        return ["--resume", str(out)]
    (out / "metrics.csv").unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)
    return []
