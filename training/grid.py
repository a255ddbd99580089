"""The experiment grid behind `lorasa-report`: declared in TOML, expanded into lorasa-train runs with
their dependencies (a LoRA run starts from its PS / SePS run's snapshot at the switch step), run a few
at a time, resumable across sessions and machines: when a run finishes, its compact results (summary.json
with the final evaluation's per-episode returns, metrics.csv, the run's config and counters as
state.json; no weights) are copied to `<grid dir>/<grid name>/runs/<run key>/` (commit them), and a run
whose compact results are there is done, even where the runs root is gone. A base (PS / SePS) run whose
LoRA runs are not all done needs its snapshot in the runs root: without it (a new machine), the base run
is trained again, so that its LoRA runs start from the phase 1 their results are compared with (its
committed results are kept; a warning says if the new phase-1 curve differs from them).

Each run directory and compact results directory holds `run.json`: the lorasa-train config the grid asked
for (its flags resolved against the code's defaults: budget, switch, evaluation settings, overrides; all
but UNRECORDED below) and the git commit of the session that last launched it. Results count only while that config is what the grid asks now:
after an edit of the grid (or of a default) `run` stops with one line naming the run and the fields that
differ (move the old results aside, or restore the grid).

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
    [variants.lora_frozen_std]                   # optional: a named method variant, used in methods
    mode = "lorasa"                              #   as "mappo:lora_frozen_std" (key mappo-lora_frozen_std)
    flags = ["--no-lora.train-log-std"]          #   extra lorasa-train flags
    label = "PS+LoRA (log-std frozen)"
    [variants.ps_frozen_std]
    mode = "ps"
    continue_from_switch = true                  #   continues the same seed's PS run from its switch
    flags = ["--freeze-log-std"]                 #   snapshot (lorasa-train --mode ps --init-from)
    label = "PS continued (log-std frozen)"
    switch_rule = { every = 100000, window = 5, min_gain = 0.02, latest = 2000000 }   # optional (also
                                                 # per scenario): each seed's LoRA runs switch where its own
                                                 # PS curve plateaus (see plateau_step), not at switch_step
    [ablations]                                  # optional; on one scenario, from its mappo:ps runs
    preset = "halfcheetah_2x3"
    ranks = [4, 16, 64]
    layers = { mlp = ["mlp.0", "mlp.1", "mlp.2"], gru = ["gru.x", "gru.h"] }
    switch_steps = [75000, 225000]
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lorasa_serve.cli import UsageError

from . import rundir
from .config import PRESETS

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
    # switch by rule (Grid.switch_rule): the base run's plateau decides the switch (its --init-from has
    # "{switch}" until the base has finished, see resolve_args); switch_step is then the rule's `every`
    switch_rule: tuple | None = None  # ((key, value), ...) of the rule table

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
    variants: dict | None = None  # name -> {mode, flags, label, continue_from_switch}
    switch_rule: dict | None = None  # {every, window, min_gain, latest}: see plateau_step
    pairs: list | None = None  # the report's paired comparisons [[A, B], ...] (modes or variants); None: default
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
                 "eval_episodes", "final_eval_episodes", "plan", "variants", "pairs", "switch_rule"}
        if set(d) - known:
            raise UsageError(f"{path}: unknown keys {sorted(set(d) - known)}; use only {sorted(known)}")
        missing = sorted({"seeds", "total_steps", "switch_step", "scenarios"} - set(d))
        if missing:
            raise UsageError(f"{path}: missing keys {missing}; add them (see training/grid.py for an example)")
        g = cls(**d, results=path.parent / path.stem / "runs")
        try:
            g.check_variants()
            if g.pairs is not None and not all(isinstance(p, list) and len(p) == 2 for p in g.pairs):
                raise UsageError("pairs must be a list of [A, B] method names, e.g. [[\"lorasa\", \"ps\"]]")
            g.pairs = None if g.pairs is None else [tuple(p) for p in g.pairs]
            g.runs = g.expand()
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None
        return g

    def check_variants(self) -> None:
        for name, v in (self.variants or {}).items():
            if name in METHODS or not name.replace("_", "").isalnum():
                raise UsageError(f"[variants.{name}]: the name must be letters, digits and _ and differ from "
                                 f"the modes {', '.join(METHODS)}")
            if not isinstance(v, dict) or v.get("mode") not in METHODS:
                raise UsageError(f"[variants.{name}] needs mode = one of {', '.join(METHODS)}")
            unknown = set(v) - {"mode", "flags", "label", "continue_from_switch", "base"}
            if unknown:
                raise UsageError(f"[variants.{name}]: unknown keys {sorted(unknown)}")
            if not all(isinstance(f, str) and f.startswith("--") for f in v.get("flags", [])):
                raise UsageError(f"[variants.{name}]: flags must be a list of lorasa-train flags (\"--...\")")
            if v.get("continue_from_switch") and v["mode"] != "ps":
                raise UsageError(f"[variants.{name}]: continue_from_switch needs mode = \"ps\"")

    def mode_of(self, method: str) -> str:
        """The lorasa-train mode of a method ("mappo:lorasa" -> lorasa; a variant -> its mode)."""
        name = method.partition(":")[2]
        return (self.variants or {}).get(name, {}).get("mode", name)

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
            extra = override_flags(sc.get("overrides", {}))
            total, switch = self.budget(sc)
            rule = check_rule(sc.get("switch_rule", self.switch_rule), total)
            for seed in self.seeds:
                for m in sc["methods"]:
                    runs.append(self._run(preset, "main", m, seed, extra, switch=switch, total=total, rule=rule))
        ab = self.ablations
        if ab:
            if ab.get("preset") not in PRESETS:
                raise UsageError(f"[ablations] preset {ab.get('preset')!r}: use one of {sorted(PRESETS)}")
            preset, algo = ab["preset"], ab.get("algo", "mappo")
            if any(sc.get("preset") == preset and self.budget(sc) != (self.total_steps, self.switch_step)
                   for sc in self.scenarios):
                raise UsageError(f"[ablations] on {preset} use the grid's total_steps / switch_step: drop that "
                                 "scenario's own total_steps / switch_step (or ablate another preset)")
            extra = override_flags(ab.get("overrides", {}))
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
             switch: int | None = None, total: int | None = None, rule: dict | None = None) -> Run:
        algo, _, mode = method.partition(":")
        variant = (self.variants or {}).get(mode)
        if algo not in ("mappo", "a2po") or (mode not in METHODS and variant is None):
            raise UsageError(f"unknown method {method!r}: write <mappo|a2po>:<{'|'.join(METHODS)}> or a "
                             "[variants] name, e.g. \"mappo:lorasa\"")
        name = f"{algo}-{mode}" if group == "main" else f"ablation-{group}"
        if variant is not None:
            extra = [*extra, *variant.get("flags", [])]
            mode = variant["mode"]
        key = f"{preset}/{name}/seed{seed}"
        total, switch = total or self.total_steps, switch or self.switch_step
        args = ["--preset", preset, "--algo", algo, "--mode", mode, "--seed", str(seed),
                "--total-steps", str(total), "--eval-every", str(self.eval_every),
                "--eval-episodes", str(self.eval_episodes),
                "--final-eval-episodes", str(self.final_eval_episodes), "--no-tensorboard", *extra]
        needs = None
        if mode in BASE_OF or (variant or {}).get("continue_from_switch"):
            base = (variant or {}).get("base", BASE_OF.get(mode, "ps"))
            needs = f"{preset}/{algo}-{base}/seed{seed}"
            args += ["--init-from", f"{{runs}}/{needs}/snapshots/{{switch}}" if rule else
                     f"{{runs}}/{needs}/snapshots/{switch}"]
        elif mode in ("ps", "seps"):
            steps = rule_snapshots(rule) if rule else self.switch_steps(preset, switch)
            args += ["--snapshot-steps", ",".join(map(str, steps))]
        return Run(key, preset, group, method, seed, tuple(args), needs, total,
                   rule["every"] if rule else switch, tuple(sorted(rule.items())) if rule else None)


# --- switching where PS plateaus -----------------------------------------------------------------
def check_rule(rule: dict | None, total: int) -> dict | None:
    if rule is None:
        return None
    need = {"every", "window", "min_gain", "latest"}
    if not isinstance(rule, dict) or set(rule) != need:
        raise UsageError(f"switch_rule needs exactly the keys {sorted(need)}")
    every, window, latest = int(rule["every"]), int(rule["window"]), int(rule["latest"])
    if every < 1 or window < 1 or not 0 < latest < total or latest % every:
        raise UsageError(f"switch_rule: every and window >= 1, latest a multiple of every below total_steps "
                         f"{total}")
    return {"every": every, "window": window, "min_gain": float(rule["min_gain"]), "latest": latest}


def rule_snapshots(rule: dict) -> list[int]:
    """The base run's snapshot steps under a switch rule: every multiple of `every` up to `latest`."""
    return list(range(rule["every"], rule["latest"] + 1, rule["every"]))


def plateau_step(curve: list[tuple[int, float]], window: int, min_gain: float) -> int | None:
    """The rule, stated before any run: the first evaluation step at which the mean of the last `window`
    evaluations is less than `min_gain` (relative) above the mean of the `window` evaluations before
    them; None if that never happens. curve: (env step, evaluation return), in step order."""
    vals = [v for _, v in curve]
    for k in range(2 * window - 1, len(curve)):
        now = sum(vals[k - window + 1:k + 1]) / window
        before = sum(vals[k - 2 * window + 1:k - window + 1]) / window
        if now - before < min_gain * abs(before):
            return curve[k][0]
    return None


def rule_switch(rule: dict, base_metrics: Path) -> int | None:
    """The snapshot a dependent run starts from: the rule's plateau step rounded up to a multiple of
    `every`, at most `latest` (also when the curve never plateaus); None if the base's metrics.csv is
    missing or does not reach `latest` (the base has not finished)."""
    curve = sorted(_eval_curve_float(base_metrics).items())
    if not curve or curve[-1][0] < rule["latest"]:
        return None
    step = plateau_step(curve, rule["window"], rule["min_gain"])
    if step is None:
        return rule["latest"]
    return min(rule["latest"], -(-step // rule["every"]) * rule["every"])


def _eval_curve_float(path: Path) -> dict[int, float]:
    return {s: float(v) for s, v in _eval_curve(path).items()}


def resolve_args(grid: Grid, run: Run, runs_root: Path) -> list[str] | None:
    """run.args with "{runs}" (and, under a switch rule, "{switch}") filled in; None while the rule's
    switch cannot be known yet (the base run is not finished)."""
    args = [a.replace("{runs}", str(runs_root)) for a in run.args]
    if run.switch_rule is None or not run.needs:
        return args
    by_key = {r.key: r for r in grid.runs}
    base = by_key[run.needs]
    src = runs_root / base.key / "metrics.csv"
    if not src.is_file() and compact_dir(grid, base) is not None:
        src = compact_dir(grid, base) / "metrics.csv"
    switch = rule_switch(dict(run.switch_rule), src)
    return None if switch is None else [a.replace("{switch}", str(switch)) for a in args]


def override_flags(overrides: dict) -> list[str]:
    """TOML overrides -> lorasa-train flags: {"env.workers": 0} -> --env.workers=0, a bool -> --x / --no-x."""
    return [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
            for k, v in overrides.items()]


# --- what a run was asked to do (run.json) -----------------------------------------------------
RUN_JSON = "run.json"
# where a base run is snapshotted, which Ray cluster rollouts ran on: neither changes the results
UNRECORDED = {"snapshot_steps", "env.ray_address"}
# config fields added after results were committed: a run.json without one was made with this value
LEGACY = {"lora.train_log_std": False, "lora.init": "peft", "freeze_log_std": False, "env.backend": "local",
          "env.ray_exact": True, "model.agent_onehot": False}


def requested(run: Run) -> dict:
    """The lorasa-train config `run`'s flags resolve to now (JSON types; "{runs}" left in --init-from)."""
    from .cli import resolve_flags
    try:
        cfg = json.loads(json.dumps(resolve_flags(list(run.args)).to_dict()))
    except UsageError as e:
        raise UsageError(f"run {run.key}: lorasa-train rejects its flags ({e}); fix the grid's overrides") from None
    return {k: v for k, v in _flat(cfg).items() if k not in UNRECORDED}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def write_run_json(run: Run, directory: Path, commit: str | None) -> None:
    data = {"key": run.key, "args": list(run.args), "config": requested(run), "git_commit": commit}
    (directory / RUN_JSON).write_text(json.dumps(data, indent=2) + "\n")


def recorded_mismatch(run: Run, directory: Path, want: dict) -> list[str] | None:
    """None if `directory` holds no results of `run` or results recorded with the config the grid asks
    now (`want`: requested(run)); else the differing fields ("run.json missing" for results written
    before run.json)."""
    if not ((directory / "summary.json").is_file() or rundir.has_checkpoint(directory)):
        return None
    try:
        recorded = json.loads((directory / RUN_JSON).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["run.json missing or unreadable"]
    recorded = {**{k: v for k, v in LEGACY.items() if k in want}, **recorded}
    return [f"{k}: {recorded.get(k, '<absent>')} -> {want.get(k, '<absent>')}"
            for k in sorted(set(want) | set(recorded)) if recorded.get(k) != want.get(k)] or None


def check_recorded(grid: Grid, runs_root: Path) -> None:
    """UsageError (one line) if lorasa-train would reject a run's flags, or any run's results, committed
    or in the runs root, were made with another config than the grid asks for now."""
    bad = []
    for run in grid.runs:
        want = requested(run)
        for d in (compact_dir(grid, run), runs_root / run.key):
            diff = None if d is None else recorded_mismatch(run, d, want)
            if diff:
                bad.append((run, d, diff))
    if bad:
        run, d, diff = bad[0]
        more = f" (and {len(bad) - 1} more results)" if len(bad) > 1 else ""
        raise UsageError(f"run {run.key}: the results in {d} were made with other settings than the grid "
                         f"asks for now ({'; '.join(diff)}){more}; move the old results aside or restore "
                         "the grid")


# --- compact results (committed; no weights) ----------------------------------------------------
COMPACT_FILES = {RUN_JSON: RUN_JSON, "summary.json": "summary.json", "metrics.csv": "metrics.csv",
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
    return all(_snapshot_of(runs_root, r, grid).is_dir() for r in waiting)


def _snapshot_of(runs_root: Path, run: Run, grid: Grid | None = None) -> Path:
    args = resolve_args(grid, run, runs_root) if grid is not None else \
        [a.replace("{runs}", str(runs_root)) for a in run.args]
    if args is None:  # switch by rule, base unfinished: nothing to start from yet
        return runs_root / run.needs / "snapshots" / "unknown"
    return Path(args[args.index("--init-from") + 1]) / "train_state"


class LocalLauncher:
    """Runs as lorasa-train processes on this host, `jobs` at a time (each 1 thread)."""

    poll_s = 0.5

    def __init__(self, runs_root: Path, jobs: int = 2, python: str = sys.executable):
        self.runs_root, self.jobs, self.python = runs_root, jobs, python
        self.running: dict[str, tuple[subprocess.Popen, object]] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def free(self) -> bool:
        return len(self.running) < self.jobs

    def launch(self, run: Run, out: Path, args: list[str]) -> None:
        """Start `run` in `out` with lorasa-train flags `args` (resolved against the runs root)."""
        log = open(out / "train.log", "w")
        cmd = [self.python, "-m", "training.cli", *args, "--out", str(out)]
        log.write(" ".join(cmd) + "\n")
        log.flush()
        self.running[run.key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env), log)

    def poll(self) -> list[tuple[str, str | None]]:
        """The runs that ended since the last call: (key, None if it finished, else why it failed)."""
        ended = []
        for key, (proc, log) in list(self.running.items()):
            if proc.poll() is not None:
                log.close()
                del self.running[key]
                why = None if proc.returncode == 0 else \
                    f"exit {proc.returncode}; see {self.runs_root / key / 'train.log'}"
                ended.append((key, why))
        return ended


def run_grid(grid: Grid, runs_root: Path, jobs: int = 2, python: str = sys.executable,
             launcher=None) -> list[str]:
    """Run every missing run -> failed keys: `jobs` at a time as 1-thread lorasa-train processes here, or
    through `launcher` (training/grid_ray.py: Ray tasks across a cluster). A run starts once the run whose
    snapshot it needs is done. UsageError first if recorded results no longer match the grid (check_recorded)."""
    check_recorded(grid, runs_root)
    commit = git_commit()
    sync_compact(grid, runs_root)
    launcher = launcher or LocalLauncher(runs_root, jobs, python)
    todo = [r for r in grid.runs if not is_done(runs_root, r, grid)]
    by_key = {r.key: r for r in grid.runs}
    failed: list[str] = []
    bar = tqdm(total=len(grid.runs), initial=len(grid.runs) - len(todo), unit="run", desc="grid")
    while todo or launcher.running:
        for key, why in launcher.poll():
            if why is not None:
                failed.append(key)
                tqdm.write(f"FAILED {key}: {why}")
            elif grid.results is not None:
                keep_or_save_compact(grid, by_key[key], runs_root / key)
            bar.update(1)
        blocked = set(failed) | set(launcher.running) | {r.key for r in todo}
        for run in list(todo):
            if not launcher.free():
                break
            if run.needs in blocked:
                if run.needs in failed:
                    todo.remove(run)
                    failed.append(run.key)
                    bar.update(1)
                continue
            if is_done(runs_root, run, grid):  # finished meanwhile (results copied in, another host)
                todo.remove(run)
                bar.update(1)
                continue
            resolved = resolve_args(grid, run, runs_root)
            if resolved is None:  # its base has not finished: the rule cannot place the switch yet
                continue
            todo.remove(run)
            out = runs_root / run.key
            out.mkdir(parents=True, exist_ok=True)
            args = resolved + _restart_args(out, run)
            write_run_json(run, out, commit)
            launcher.launch(run, out, args)
            bar.set_postfix_str(run.key)
        time.sleep(launcher.poll_s)
    bar.close()
    return failed


def _restart_args(out: Path, run: Run) -> list[str]:
    """An unfinished run (killed, or failed earlier) continues from its checkpoint. A run that cannot get
    there by resuming (finished, or past a snapshot step whose snapshot is missing: it is rerun only to
    rebuild its snapshots) is moved aside to `<run>.stale-<n>` and trained afresh; without a checkpoint,
    the partial files it wrote are dropped so lorasa-train starts it afresh."""
    if rundir.has_checkpoint(out):
        steps = _checkpoint_steps(out)
        lost = steps is None or any(s <= steps and not (out / "snapshots" / str(s)).is_dir()
                                    for s in _snapshot_steps(run))
        if not (out / "summary.json").is_file() and not lost:
            return ["--resume", str(out)]
        stale = _move_aside(out)
        tqdm.write(f"{run.key}: resuming cannot rebuild its missing snapshots (or its checkpoint is unreadable); "
                   f"moved the old run to {stale}, training it afresh")
        out.mkdir(parents=True)
        return []
    for name in PARTIAL_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return []


def _checkpoint_steps(out: Path) -> int | None:
    try:
        return int(json.loads((out / "train_state" / "state.json").read_text())["counters"]["env_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


PARTIAL_FILES = (*rundir.RUN_FILES, "train_state", "backbone.safetensors", "adapters", "env.json", "tb",
                 "snapshots", "phase1", "learning_curve.png", RUN_JSON)


def _snapshot_steps(run: Run) -> list[int]:
    args = list(run.args)
    if "--snapshot-steps" not in args:
        return []
    return [int(s) for s in args[args.index("--snapshot-steps") + 1].split(",") if s]


def _move_aside(out: Path) -> Path:
    n = 1
    while out.with_name(f"{out.name}.stale-{n}").exists():
        n += 1
    stale = out.with_name(f"{out.name}.stale-{n}")
    out.rename(stale)
    return stale


def keep_or_save_compact(grid: Grid, run: Run, run_dir: Path) -> None:
    """Copy a finished run's compact results, unless results of it are committed already (a base run
    trained again to rebuild its snapshots): those stay, with a warning if the new curve differs."""
    dest = compact_dir(grid, run)
    if not has_compact(grid, run):
        save_compact(run_dir, dest)
        return
    old, new = _eval_curve(dest / "metrics.csv"), _eval_curve(run_dir / "metrics.csv")
    upto = max(_snapshot_steps(run), default=run.total_steps)
    old = {s: v for s, v in old.items() if s <= upto}
    diff = [s for s in sorted(old) if new.get(s) != old[s]]
    if diff:
        s = diff[0]
        tqdm.write(f"warning: {run.key} was trained again to rebuild its snapshots, and its phase-1 evaluation "
                   f"returns differ from the committed ones at {len(diff)} of {len(old)} steps (first at "
                   f"{s:,}: committed {old[s]}, now {new.get(s)}); its committed results in {dest} were kept, "
                   "its LoRA runs start from the new snapshot")


def _eval_curve(path: Path) -> dict[int, str]:
    """env_steps -> eval_return (as written) of a metrics.csv's evaluated rows."""
    try:
        with open(path, newline="") as f:
            return {int(r["env_steps"]): r["eval_return"] for r in csv.DictReader(f) if r.get("eval_return")}
    except (OSError, KeyError, ValueError):
        return {}
