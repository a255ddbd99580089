"""A grid's runs as the report sees them: each run's summary and status (RunResult), the runs of one
method across seeds (Cell) with its display label, and learning curves (mean across seeds at each
evaluated step; phase-2 runs continue their base run's curve)."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from ..grid import Grid, Run
from ..plots import read_metrics
from .stats import Stats

ALGO_NAMES = {"mappo": "MAPPO", "a2po": "A2PO"}
MODE_NAMES = {"ps": "PS", "nps": "NPS", "seps": "SePS", "mtl": "MTL", "lorasa": "PS+LoRA",
              "seps_lorasa": "SePS+LoRA"}


@dataclass
class RunResult:
    run: Run
    root: Path  # the runs root; the run's directory is root / run.key
    summary: dict | None
    failed: bool = False  # reported failed by run_grid
    compact: Path | None = None  # the run's compact results (committed), when the grid has them

    @property
    def dir(self) -> Path:
        """The run's working directory (weights, train.log); may be gone on another machine."""
        return self.root / self.run.key

    @property
    def files(self) -> Path:
        """Where summary.json / metrics.csv are read: the compact results if present, else the run dir."""
        if self.compact is not None and (self.compact / "summary.json").is_file():
            return self.compact
        return self.dir

    @property
    def has_weights(self) -> bool:
        return (self.dir / "train_state" / "state.json").is_file()

    @property
    def done(self) -> bool:
        return self.summary is not None

    @property
    def final_return(self) -> float:
        return float(self.summary["final_eval"]["mean_return"])

    @property
    def trained_steps(self) -> int:
        """Env steps trained in this run (a phase-2 run started from a snapshot trains the rest)."""
        s = self.summary
        start = s["phase_switch_step"] if s.get("init_from") else 0
        return int(s["env_steps"]) - max(int(start), 0)

    @property
    def steps_per_s(self) -> float:
        return self.trained_steps / self.summary["train_wall_s"] if self.summary["train_wall_s"] else math.nan

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        if self.failed and not (self.dir / "train.log").is_file():
            return f"not run: its base run `{self.run.needs}` failed" if self.run.needs else "failed"
        if self.failed:
            return f"failed (see {self.dir / 'train.log'}){_log_error(self.dir)}"
        if (self.dir / "train.log").is_file():
            return f"no summary.json: failed or still running (see {self.dir / 'train.log'}){_log_error(self.dir)}"
        return "not run"

    def meta(self) -> dict:
        """The run's train_state/state.json (config, counters, spec): compact copy or the run's own."""
        compact = self.files / "state.json"
        path = compact if compact.is_file() else self.dir / "train_state" / "state.json"
        return json.loads(path.read_text())

    def config(self) -> dict:
        """The run's resolved TrainConfig."""
        return self.meta()["config"]

    def spec(self):
        from lorasa_serve import PolicySpec
        return PolicySpec.from_dict(self.meta()["spec"])

    def base_metrics(self) -> Path | None:
        """The base run's metrics (its compact metrics.csv, else the snapshot's) of a phase-2 run."""
        args = list(self.run.args)
        if "--init-from" not in args:
            return None
        if self.compact is not None and self.run.needs:
            base = self.compact.parents[len(Path(self.run.key).parts) - 1] / self.run.needs / "metrics.csv"
            if base.is_file():
                return base
        src = args[args.index("--init-from") + 1].replace("{runs}", str(self.root))
        return Path(src) / "metrics.csv"


def _log_error(directory: Path) -> str:
    """': <last error line>' of a run's train.log, if it ends with one."""
    try:
        lines = [ln.strip() for ln in (directory / "train.log").read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    errors = [ln for ln in lines[-20:] if "Error" in ln or "Exception" in ln]
    return f": `{errors[-1][:160]}`" if errors else ""


def load_results(grid: Grid, runs_root: Path, failed: Collection[str] = ()) -> dict[str, RunResult]:
    out = {}
    for run in grid.runs:
        res = RunResult(run, Path(runs_root), None, run.key in failed,
                        None if grid.results is None else grid.results / run.key)
        path = res.files / "summary.json"
        res.summary = json.loads(path.read_text()) if path.is_file() else None
        out[run.key] = res
    return out


@dataclass
class Cell:
    """One method (or ablation setting) of one scenario: its runs across seeds."""

    preset: str
    group: str
    method: str
    results: list[RunResult]
    label: str = ""
    mode_label: str = ""  # "PS+LoRA", or a [variants] label ("PS+LoRA (log-std frozen)")
    color: str = "C0"  # matplotlib colour of the mode (mode_color)

    @property
    def algo(self) -> str:
        return self.method.partition(":")[0]

    @property
    def mode(self) -> str:
        """The method's mode, or its [variants] name (each variant is a column of its own)."""
        return self.method.partition(":")[2]

    @property
    def done(self) -> list[RunResult]:
        return [r for r in self.results if r.done]

    @property
    def missing(self) -> list[RunResult]:
        return [r for r in self.results if not r.done]

    @property
    def returns(self) -> Stats:
        return Stats(tuple(r.final_return for r in self.done))

    def summary_values(self, key: str) -> list:
        return [r.summary[key] for r in self.done]

    def params(self, key: str) -> str:
        vals = sorted(set(self.summary_values(key)))
        return "n/a" if not vals else " – ".join(f"{v:,}" for v in vals)

    def first_param(self, key: str) -> int | None:
        vals = self.summary_values(key)
        return vals[0] if vals else None

    def sps(self) -> float:
        vals = [r.steps_per_s for r in self.done]
        return statistics.fmean(vals) if vals else math.nan


def mode_color(grid: Grid, mode: str) -> str:
    """One colour per mode (C0-C5), then per [variants] name in the grid's order (C6-C9)."""
    if mode in MODE_NAMES:
        return f"C{list(MODE_NAMES).index(mode)}"
    return f"C{(len(MODE_NAMES) + list(grid.variants or {}).index(mode)) % 10}"


def mode_label(grid: Grid, mode: str) -> str:
    """Display name of a mode or of a grid's [variants] name."""
    variant = (grid.variants or {}).get(mode)
    return variant.get("label", mode) if variant is not None else MODE_NAMES[mode]


def method_label(method: str, groups: list[list[int]] | None = None, grid: Grid | None = None) -> str:
    algo, _, mode = method.partition(":")
    label = f"{ALGO_NAMES[algo]} {MODE_NAMES[mode] if grid is None else mode_label(grid, mode)}"
    if mode.startswith("seps") and groups:
        distinct = []
        for g in groups:
            if g not in distinct:
                distinct.append(g)
        label += " (groups " + " / ".join(",".join(map(str, g)) for g in distinct) + ")"
    return label


def cells_of(grid: Grid, results: dict[str, RunResult], preset: str, group: str) -> list[Cell]:
    """The cells of one scenario's group, in the grid's declared order."""
    order: dict[str, list[RunResult]] = {}
    for run in grid.runs:
        if run.preset == preset and run.group == group:
            order.setdefault(run.method, []).append(results[run.key])
    cells = []
    for method, rs in order.items():
        mode = method.partition(":")[2]
        cell = Cell(preset, group, method, rs, mode_label=mode_label(grid, mode), color=mode_color(grid, mode))
        cell.label = method_label(method, cell.summary_values("groups") if cell.done else None, grid)
        cells.append(cell)
    return cells


# --- learning curves ----------------------------------------------------------------------------
def concat_rows(base: list[dict], own: list[dict]) -> tuple[list[dict], int | None]:
    """A phase-2 run's metrics with its base run's rows before them -> (rows, switch step)."""
    if not base or not own:
        return own, None
    first = int(own[0]["env_steps"])
    before = [r for r in base if int(r["env_steps"]) < first]
    return before + own, (int(before[-1]["env_steps"]) if before else None)


def run_curve(res: RunResult, column: str = "eval_return") -> tuple[list[tuple[int, float]], int | None]:
    """`column` of metrics.csv (default: evaluation return) vs env steps of a finished run (phase-2
    runs: with their base run's part), rows where it is set."""
    own = read_metrics(res.files / "metrics.csv")
    base_path = res.base_metrics()
    base = read_metrics(base_path) if base_path and base_path.is_file() else []
    rows, switch = concat_rows(base, own)
    return [(int(r["env_steps"]), float(r[column])) for r in rows if r.get(column)], switch


@dataclass
class MeanCurve:
    steps: list[int]
    stats: list[Stats]
    switch: int | None = None


def mean_curve(curves: list[list[tuple[int, float]]], switch: int | None = None) -> MeanCurve:
    """Mean and interval across seeds at each evaluated step (seeds evaluate at the same steps)."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for s, v in curve:
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    return MeanCurve(steps, [Stats(tuple(by_step[s])) for s in steps], switch)


def cell_curve(cell: Cell, column: str = "eval_return") -> MeanCurve:
    pairs = [run_curve(r, column) for r in cell.done]
    switches = [s for _, s in pairs if s is not None]
    return mean_curve([c for c, _ in pairs], min(switches) if switches else None)
