"""`lorasa-report`: run a declared grid (training/grid.py) and write its report: a markdown README with
final-performance tables (mean and 95% Student-t interval across seeds), learning curves, trainable
parameters, training throughput, inference time per decision, the ablations, and a comparison with
the LoRASA paper's qualitative claims computed from the numbers.

    lorasa-report run reports/grid.toml --runs runs/report --out reports [--jobs 2] [--notes NOTES.md]
    lorasa-report write reports/grid.toml --runs runs/report --out reports [--remeasure]

`run` trains the missing runs first, then writes the report (listing failed runs; exit code 1 if any
failed); `write` only writes the report. Inference timings are cached in OUT/assets/inference.json.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from .grid import Grid, Run, run_grid

ASSETS = "assets"
INFERENCE_FILE = "inference.json"
ALGO_NAMES = {"mappo": "MAPPO", "a2po": "A2PO"}
MODE_NAMES = {"ps": "PS", "nps": "NPS", "seps": "SePS", "mtl": "MTL", "lorasa": "PS+LoRA",
              "seps_lorasa": "SePS+LoRA"}
MODE_COLORS = {m: f"C{i}" for i, m in enumerate(MODE_NAMES)}
ABLATION_TITLES = {"rank": "LoRA rank", "layers": "Adapted layers", "switch": "Phase-switch step"}


# --- statistics ---------------------------------------------------------------------------------
def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def _beta_cf(a: float, b: float, x: float, iters: int = 500, eps: float = 1e-15) -> float:
    tiny = 1e-300

    def clamp(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, iters + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / clamp(1.0 + aa * d)
            c = clamp(1.0 + aa / c)
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Stats:
    """Values across seeds: mean and the two-sided Student-t confidence interval of the mean."""

    values: tuple[float, ...]
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def half_width(self) -> float:
        """nan with fewer than two values (no interval)."""
        if self.n < 2:
            return math.nan
        return t_quantile(0.5 + self.level / 2, self.n - 1) * statistics.stdev(self.values) / math.sqrt(self.n)

    @property
    def lo(self) -> float:
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        return self.mean + self.half_width

    def fmt(self, digits: int = 1) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed, no interval)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def overlap(a: Stats, b: Stats) -> bool | None:
    """Do the two intervals overlap? None when either has no interval."""
    if math.isnan(a.half_width) or math.isnan(b.half_width):
        return None
    return a.lo <= b.hi and b.lo <= a.hi


# --- runs ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run: Run
    root: Path  # the runs root; the run's directory is root / run.key
    summary: dict | None
    failed: bool = False  # reported failed by run_grid

    @property
    def dir(self) -> Path:
        return self.root / self.run.key

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

    def config(self) -> dict:
        """The run's resolved TrainConfig (from its train_state)."""
        from .checkpoint import load_meta
        return load_meta(self.dir)["config"]

    def spec(self):
        from lorasa_serve import PolicySpec
        from .checkpoint import load_meta
        return PolicySpec.from_dict(load_meta(self.dir)["spec"])

    def base_metrics(self) -> Path | None:
        """metrics.csv of the snapshot a phase-2 run started from (the base run up to the switch)."""
        args = list(self.run.args)
        if "--init-from" not in args:
            return None
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
        path = Path(runs_root) / run.key / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        out[run.key] = RunResult(run, Path(runs_root), summary, run.key in failed)
    return out


@dataclass
class Cell:
    """One method (or ablation setting) of one scenario: its runs across seeds."""

    preset: str
    group: str
    method: str
    results: list[RunResult]
    label: str = ""

    @property
    def algo(self) -> str:
        return self.method.partition(":")[0]

    @property
    def mode(self) -> str:
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


def method_label(method: str, groups: list[list[int]] | None = None) -> str:
    algo, _, mode = method.partition(":")
    label = f"{ALGO_NAMES[algo]} {MODE_NAMES[mode]}"
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
        cell = Cell(preset, group, method, rs)
        cell.label = method_label(method, cell.summary_values("groups") if cell.done else None)
        cells.append(cell)
    return cells


# --- learning curves ----------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def concat_rows(base: list[dict], own: list[dict]) -> tuple[list[dict], int | None]:
    """A phase-2 run's metrics with its base run's rows before them -> (rows, switch step)."""
    if not base or not own:
        return own, None
    first = int(own[0]["env_steps"])
    before = [r for r in base if int(r["env_steps"]) < first]
    return before + own, (int(before[-1]["env_steps"]) if before else None)


def run_curve(res: RunResult) -> tuple[list[tuple[int, float]], int | None]:
    """Evaluation return vs env steps of a finished run (phase-2 runs: with their base run's part)."""
    own = read_rows(res.dir / "metrics.csv")
    base_path = res.base_metrics()
    base = read_rows(base_path) if base_path and base_path.is_file() else []
    rows, switch = concat_rows(base, own)
    return [(int(r["env_steps"]), float(r["eval_return"])) for r in rows if r.get("eval_return")], switch


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


def cell_curve(cell: Cell) -> MeanCurve:
    pairs = [run_curve(r) for r in cell.done]
    switches = [s for _, s in pairs if s is not None]
    return mean_curve([c for c, _ in pairs], min(switches) if switches else None)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_curve(ax, curve: MeanCurve, label: str, color: str) -> None:
    if not curve.steps:
        return
    means = [s.mean for s in curve.stats]
    ax.plot(curve.steps, means, color=color, marker="o", ms=3, lw=1.8, label=label)
    lo = [s.lo if s.n > 1 else s.mean for s in curve.stats]
    hi = [s.hi if s.n > 1 else s.mean for s in curve.stats]
    ax.fill_between(curve.steps, lo, hi, color=color, alpha=0.18, lw=0)
    if curve.switch is not None:
        ax.axvline(curve.switch, color=color, ls=":", lw=1)


def _style(ax, title: str, ylabel: str = "evaluation return") -> None:
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_scenario(cells: list[Cell], title: str, path: Path) -> Path:
    """One panel per algorithm: mean evaluation return across seeds, shaded 95% interval."""
    plt = _pyplot()
    algos = list(dict.fromkeys(c.algo for c in cells))
    fig, axes = plt.subplots(1, len(algos), figsize=(7 * len(algos), 4.2), squeeze=False, sharey=True)
    for ax, algo in zip(axes[0], algos):
        for cell in (c for c in cells if c.algo == algo and c.done):
            draw_curve(ax, cell_curve(cell), f"{cell.label} (n={len(cell.done)})", MODE_COLORS[cell.mode])
        _style(ax, f"{title}: {ALGO_NAMES[algo]} (mean over seeds, 95% CI; dotted: LoRA switch)")
    return _save(fig, path)


def plot_ablation(cells: list[Cell], title: str, path: Path) -> Path:
    """Left: final return vs setting with 95% CI error bars; right: learning curves per setting."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    done = [c for c in cells if c.done]
    xs = list(range(len(done)))
    for x, cell in zip(xs, done):
        st = cell.returns
        err = 0.0 if st.n < 2 else st.half_width
        left.errorbar([x], [st.mean], yerr=[err], fmt="o", capsize=5, color=f"C{x}")
        left.plot([x] * st.n, st.values, "x", color=f"C{x}", alpha=0.5)
    left.set_xticks(xs, [c.label for c in done], rotation=15, fontsize=8)
    left.set_ylabel("final evaluation return")
    left.set_title(f"{title}: final return (mean, 95% CI; x: seeds)", fontsize=10)
    left.grid(alpha=0.3)
    for x, cell in zip(xs, done):
        draw_curve(right, cell_curve(cell), cell.label, f"C{x}")
    _style(right, f"{title}: learning curves")
    return _save(fig, path)


# --- inference time per decision ----------------------------------------------------------------
@dataclass
class Timed:
    name: str  # "<run key>|policy" or "<run key>|engine"
    fn: Callable[[], object]
    samples: list[float] = field(default_factory=list)


def policy_decision(run_dir: Path) -> Callable[[], object]:
    """One team decision of the run's training actor: Policy.act over all agents of one env."""
    import torch
    from .trainer import load_run_policy
    policy, _ = load_run_policy(run_dir)
    spec, info = policy.actor.spec, policy.info
    N, g = info.n_agents, torch.Generator().manual_seed(0)
    obs = torch.randn(N, 1, info.obs_max, generator=g)
    h = torch.zeros(N, 1, spec.hidden) if spec.recurrent else None
    reset = torch.zeros(N, 1, dtype=torch.bool)
    avail = torch.ones(N, 1, info.act_max, dtype=torch.bool)

    def act():
        with torch.no_grad():
            return policy.act(obs, h, reset, avail, True, None)

    return act


def engine_decision(run_dir: Path) -> Callable[[], object]:
    """One team decision through the serving Engine: `Engine.act` with one row per agent."""
    import torch
    from lorasa_serve import Engine
    engine = Engine.from_dir(run_dir, device="cpu")
    spec = engine.spec
    ids = engine.agent_index(engine.agent_ids)
    N = len(ids)
    obs = torch.randn(N, spec.obs_max, generator=torch.Generator().manual_seed(0))
    state = torch.zeros(N, spec.hidden) if spec.recurrent else None
    avail = torch.ones(N, spec.act_max, dtype=torch.bool) if spec.action == "categorical" else None
    return lambda: engine.act(ids, obs, state, None, avail, deterministic=True)


def measure_inference(run_dirs: dict[str, Path], rounds: int = 200, warmup: int = 20) -> dict[str, dict]:
    """Median µs per team decision for each run (Policy.act; Engine.act too for servable runs),
    measured round-robin across runs so that machine load affects all alike; 1 torch thread."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed = []
        for key, d in run_dirs.items():
            timed.append(Timed(f"{key}|policy", policy_decision(d)))
            if (d / "policy.json").is_file():
                timed.append(Timed(f"{key}|engine", engine_decision(d)))
        for i in range(warmup + rounds):
            for t in timed:
                t0 = time.perf_counter_ns()
                t.fn()
                if i >= warmup:
                    t.samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, dict] = {key: {} for key in run_dirs}
    for t in timed:
        key, kind = t.name.rsplit("|", 1)
        out[key][f"{kind}_act_us"] = statistics.median(t.samples)
    return out


def inference_times(cells: list[Cell], cache: Path, remeasure: bool = False, rounds: int = 200) -> dict:
    """{run key: {"policy_act_us", "engine_act_us"?}} for the first finished seed of each cell; cached
    in `cache` (all needed runs are measured together whenever one is missing from it)."""
    wanted = {c.done[0].run.key: c.done[0].dir for c in cells if c.done}
    data = json.loads(cache.read_text()) if cache.is_file() and not remeasure else {}
    if not wanted or set(wanted) <= set(data.get("runs", {})):
        return data
    data = {"rounds": rounds, "measured_at": _now(), "loadavg_1min": _loadavg(),
            "torch_threads": 1, "runs": measure_inference(wanted, rounds)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data, indent=2))
    return data


# --- markdown -----------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rel(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def setup_section(grid: Grid, results: dict[str, RunResult], runs_root: Path, out: Path,
                  grid_path: Path | None) -> str:
    import numpy
    import torch
    g = _rel(grid_path) if grid_path else "GRID.toml"
    n_done = sum(r.done for r in results.values())
    lines = ["## Setup", "",
             f"- Budget: {grid.total_steps:,} env steps per run (all phases); PS+LoRA / SePS+LoRA runs start "
             f"phase 2 from their PS / SePS run's snapshot at step {grid.switch_step:,} (same seed).",
             f"- Seeds: {', '.join(map(str, grid.seeds))}; {n_done} of {len(results)} runs finished.",
             f"- Evaluation: deterministic actions, {_plural(grid.eval_episodes, 'episode')} every "
             f"{grid.eval_every:,} steps (learning curves); final performance = "
             f"{_plural(grid.final_eval_episodes, 'episode')} at the end.",
             "- Intervals: 95% Student-t interval of the mean across seeds (t quantile with n-1 dof).",
             "- Columns: trainable params = actor parameters trained in the run's final phase (PS+LoRA: the "
             "adapters and what else phase 2 trains, not the frozen backbone); actor params (total) = everything "
             "the team needs to act, frozen backbone included; env-steps/s = steps trained in the run / its wall "
             "time (periodic evaluation included), mean over seeds; µs/decision = median wall time of one team "
             "decision (all agents, one env, deterministic, 1 torch thread) of the first finished seed's run, "
             "methods measured round-robin so that machine load affects all alike.",
             f"- Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {platform.platform()}, Python "
             f"{platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}; "
             f"report written {_now()}.",
             ""]
    for sc in grid.scenarios:
        cfg = _first_config(grid, results, sc["preset"])
        if cfg:
            e, m, p, lo = cfg["env"], cfg["model"], cfg["ppo"], cfg["lora"]
            lines.append(f"- `{sc['preset']}`: {e['n_envs']} envs x rollout {p['rollout']}, {p['epochs']} epochs, "
                         f"actor hidden {m['hidden']} (MLP depth {m['mlp_depth']}, GRU {m['recurrent']}), "
                         f"lr {p['lr']}, LoRA rank {lo['rank']} / alpha {lo['alpha']} / lr {lo['lr']}"
                         + (f"; overrides `{sc['overrides']}`" if sc.get("overrides") else ""))
    lines += ["", "Reproduce (trains only the runs without summary.json, then writes this report):", "",
              "```", f"lorasa-report run {g} --runs {_rel(runs_root)} --out {_rel(out)} --jobs 2",
              f"lorasa-report write {g} --runs {_rel(runs_root)} --out {_rel(out)}   # report only",
              "```", ""]
    return "\n".join(lines)


def _first_config(grid: Grid, results: dict[str, RunResult], preset: str) -> dict | None:
    for run in grid.runs:
        r = results[run.key]
        if run.preset == preset and run.group == "main" and r.done:
            return r.config()
    return None


def perf_table(cells: list[Cell], timings: dict) -> str:
    rows = []
    win = any(r.summary["final_eval"].get("win_rate") is not None for c in cells for r in c.done)
    for c in cells:
        t = timings.get("runs", {}).get(c.done[0].run.key, {}) if c.done else {}
        seeds = ", ".join(f"{r.final_return:.1f}" for r in c.done) or "n/a"
        row = [c.label, c.returns.fmt(), seeds, c.params("trainable_params"), c.params("actor_params"),
               _num(c.sps(), 0), _num(t.get("policy_act_us")), _num(t.get("engine_act_us")),
               f"{len(c.done)}/{len(c.results)}"]
        if win:
            rates = [r.summary["final_eval"]["win_rate"] for r in c.done]
            row.insert(3, _num(statistics.fmean(rates), 3) if rates else "n/a")
        rows.append(row)
    header = ["Method", "Final return (mean ± 95% CI)", "Per seed", "Trainable params", "Actor params (total)",
              "Env-steps/s", "µs/decision (Policy.act)", "µs/decision (Engine.act)", "Seeds done"]
    if win:
        header.insert(3, "Win rate")
    return md_table(header, rows)


def missing_lines(cells: list[Cell]) -> list[str]:
    return [f"- missing `{r.run.key}`: {r.status}" for c in cells for r in c.missing]


def scenario_section(grid: Grid, results: dict[str, RunResult], sc: dict, out: Path, timings: dict) -> str:
    preset = sc["preset"]
    cells = cells_of(grid, results, preset, "main")
    env = next((r.summary["env"] for c in cells for r in c.done), preset)
    lines = [f"## {env} (`{preset}`)", "", perf_table(cells, timings), ""]
    lines += missing_lines(cells) + [""]
    if any(c.done for c in cells):
        png = plot_scenario(cells, env, out / ASSETS / f"curves_{preset}.png")
        lines += [f"![{env} learning curves]({ASSETS}/{png.name})", ""]
    return "\n".join(lines)


# --- ablations ----------------------------------------------------------------------------------
def ablation_cells(grid: Grid, results: dict[str, RunResult], kind: str) -> list[Cell]:
    """The ablation's settings plus the main PS+LoRA run as the reference setting, sorted."""
    ab = grid.ablations or {}
    preset, algo = ab["preset"], ab.get("algo", "mappo")
    groups = list(dict.fromkeys(r.group for r in grid.runs if r.group.startswith(kind + "=")))
    cells = [c for g in groups for c in cells_of(grid, results, preset, g)]
    main = [c for c in cells_of(grid, results, preset, "main") if c.method == f"{algo}:lorasa"]
    hidden = next((int(c.done[0].config()["model"]["hidden"]) for c in main + cells if c.done), None)
    for c in cells:
        c.label = _setting_label(grid, kind, c.group.partition("=")[2], hidden)
    for c in main:
        c.label = _main_label(grid, kind, c)
    return sorted(main + cells, key=lambda c: _sort_key(grid, kind, c))


def _setting_label(grid: Grid, kind: str, value: str, hidden: int | None) -> str:
    if kind == "rank":
        return f"{value} (full rank: = hidden)" if hidden and int(value) >= hidden else value
    if kind == "layers":
        return f"{value}: {', '.join(grid.ablations['layers'][value])}"
    return f"{int(value):,}"


def _main_label(grid: Grid, kind: str, main: Cell) -> str:
    if kind == "switch":
        return f"{grid.switch_step:,} (main run)"
    if kind == "rank":
        return f"{_main_rank(main)} (main run)"
    if not main.done:
        return "main run"
    layers = main.done[0].config()["lora"]["layers"]
    if layers is None:
        return f"all {len(main.done[0].spec().linear_names())} Linears (main run)"
    return f"{', '.join(layers)} (main run)"


def _main_rank(main: Cell) -> int:
    """The main PS+LoRA run's LoRA rank (its config; the preset's while it has not finished)."""
    from .config import preset
    return int(main.done[0].config()["lora"]["rank"]) if main.done else preset(main.preset).lora.rank


def _sort_key(grid: Grid, kind: str, cell: Cell):
    value = cell.group.partition("=")[2]
    if kind == "rank":
        return int(value) if value else _main_rank(cell)
    if kind == "switch":
        return int(value) if value else grid.switch_step
    declared = list(grid.ablations.get("layers", {}))
    return declared.index(value) + 1 if value in declared else 0  # layers: the main run first


def ablation_section(grid: Grid, results: dict[str, RunResult], out: Path) -> str:
    if not grid.ablations:
        return ""
    ab = grid.ablations
    lines = ["## Ablations", "",
             f"On `{ab['preset']}` with {ALGO_NAMES[ab.get('algo', 'mappo')]} PS+LoRA: every setting starts from "
             f"the same seeds' PS runs; the main PS+LoRA run is the reference row.", ""]
    kinds = [k for k in ABLATION_TITLES if any(r.group.startswith(k + "=") for r in grid.runs)]
    for kind in kinds:
        cells = ablation_cells(grid, results, kind)
        lines += [f"### {ABLATION_TITLES[kind]}", "", _ablation_table(kind, cells), ""]
        lines += missing_lines(cells)
        if any(c.done for c in cells):
            png = plot_ablation(cells, ABLATION_TITLES[kind], out / ASSETS / f"ablation_{kind}.png")
            lines += ["", f"![{ABLATION_TITLES[kind]} ablation]({ASSETS}/{png.name})", ""]
    return "\n".join(lines)


def _ablation_table(kind: str, cells: list[Cell]) -> str:
    rows = []
    for c in cells:
        row = [c.label, c.returns.fmt(), ", ".join(f"{r.final_return:.1f}" for r in c.done) or "n/a",
               c.params("trainable_params"), _num(c.sps(), 0), f"{len(c.done)}/{len(c.results)}"]
        if kind == "switch":
            row.insert(1, c.params("phase_switch_step"))
        rows.append(row)
    header = [ABLATION_TITLES[kind], "Final return (mean ± 95% CI)", "Per seed", "Trainable params",
              "Env-steps/s", "Seeds done"]
    if kind == "switch":
        header.insert(1, "Actual switch step")
    return md_table(header, rows)


# --- comparison with the paper's claims ---------------------------------------------------------
@dataclass
class Comparison:
    scenario: str
    algo: str
    a: Cell
    b: Cell

    @property
    def diff(self) -> float:
        return self.a.returns.mean - self.b.returns.mean

    @property
    def verdict(self) -> str:
        """'higher' / 'lower' (intervals apart), 'within noise' (they overlap), 'higher (no interval)' /
        'lower (no interval)' (a side with one seed), or 'no data'."""
        a, b = self.a.returns, self.b.returns
        if a.n == 0 or b.n == 0:
            return "no data"
        ov = overlap(a, b)
        direction = "higher" if self.diff > 0 else "lower"
        if ov is None:
            return f"{direction} (no interval)"
        return "within noise" if ov else direction

    @property
    def reading(self) -> str:
        return {"within noise": "within noise (95% CIs overlap)",
                "higher": "higher, 95% CIs do not overlap", "lower": "lower, 95% CIs do not overlap",
                "higher (no interval)": "higher (fewer than 2 seeds: no interval)",
                "lower (no interval)": "lower (fewer than 2 seeds: no interval)",
                "no data": "no data (runs missing)"}[self.verdict]

    @property
    def ratio(self) -> str:
        a, b = self.a.returns.mean, self.b.returns.mean
        return f"{a / b:.2f}" if a > 0 and b > 0 else "n/a"

    def row(self) -> list[str]:
        a, b = self.a.returns, self.b.returns
        return [self.scenario, ALGO_NAMES[self.algo], f"{MODE_NAMES[self.a.mode]} vs {MODE_NAMES[self.b.mode]}",
                a.fmt(), b.fmt(), _num(self.diff) if a.n and b.n else "n/a", self.ratio, self.reading]


PAIRS = (("lorasa", "ps"), ("lorasa", "nps"), ("seps_lorasa", "seps"), ("seps_lorasa", "nps"))


def comparisons(grid: Grid, results: dict[str, RunResult]) -> tuple[list[Comparison], list[list[str]]]:
    """Return comparisons for PAIRS and parameter-ratio rows, per scenario and algorithm."""
    comps, params = [], []
    for sc in grid.scenarios:
        cells = cells_of(grid, results, sc["preset"], "main")
        env = next((r.summary["env"] for c in cells for r in c.done), sc["preset"])
        for algo in dict.fromkeys(c.algo for c in cells):
            by_mode = {c.mode: c for c in cells if c.algo == algo}
            comps += [Comparison(env, algo, by_mode[a], by_mode[b]) for a, b in PAIRS
                      if a in by_mode and b in by_mode]
            nps = by_mode.get("nps")
            for mode in ("lorasa", "seps_lorasa"):
                lora = by_mode.get(mode)
                if lora and nps and lora.done and nps.done:
                    lt, nt = lora.first_param("trainable_params"), nps.first_param("trainable_params")
                    la, na = lora.first_param("actor_params"), nps.first_param("actor_params")
                    params.append([env, ALGO_NAMES[algo], MODE_NAMES[mode], f"{lt:,}", f"{nt:,}",
                                   f"{lt / nt:.3f}", f"{la:,}", f"{na:,}", f"{la / na:.3f}"])
    return comps, params


def _tally(comps: list[Comparison], a: str, b: str) -> str:
    sel = [c for c in comps if (c.a.mode, c.b.mode) == (a, b) and c.verdict != "no data"]
    if not sel:
        return "no finished pair"
    counts: dict[str, list[str]] = {}
    for c in sel:
        counts.setdefault(c.verdict, []).append(f"{c.scenario} {ALGO_NAMES[c.algo]}")
    return "; ".join(f"{word} in {len(v)} of {len(sel)} ({', '.join(v)})" for word, v in counts.items())


def comparison_section(grid: Grid, results: dict[str, RunResult]) -> str:
    comps, params = comparisons(grid, results)
    lines = ["## Comparison with the paper's claims", "",
             "The paper (LoRASA) claims that LoRA fine-tuning of a shared policy beats parameter sharing (PS) and "
             "approaches non-shared policies (NPS) on heterogeneous tasks, with far fewer trainable parameters. "
             "Below, A vs B compares final returns; 'within noise' means the two 95% intervals overlap (a "
             "conservative criterion: no difference is claimed), 'higher' / 'lower' that they do not; "
             "'(no interval)': a side has a single seed. A / B: ratio of mean returns (when both are positive).",
             ""]
    if comps:
        header = ["Scenario", "Algo", "A vs B", "A", "B", "A − B", "A / B", "Reading"]
        lines += [md_table(header, [c.row() for c in comps]), ""]
    lines += [f"- PS+LoRA vs PS (claim: higher): {_tally(comps, 'lorasa', 'ps')}.",
              f"- PS+LoRA vs NPS (claim: close to NPS): {_tally(comps, 'lorasa', 'nps')}.",
              f"- SePS+LoRA vs SePS (claim: higher): {_tally(comps, 'seps_lorasa', 'seps')}.", ""]
    if params:
        lines += ["Parameters (claim: far fewer trainable parameters than NPS):", "",
                  md_table(["Scenario", "Algo", "LoRA method", "LoRA trainable", "NPS trainable", "ratio",
                            "LoRA actor total", "NPS actor total", "ratio"], params), ""]
    return "\n".join(lines)


def missing_section(results: dict[str, RunResult]) -> str:
    missing = [r for r in results.values() if not r.done]
    if not missing:
        return "## Runs\n\nAll declared runs finished.\n"
    return "\n".join(["## Missing or failed runs", "",
                      f"{len(missing)} of {len(results)} declared runs have no summary.json and are left out of "
                      "the numbers above:", ""] + [f"- `{r.run.key}`: {r.status}" for r in missing]) + "\n"


def write_report(grid: Grid, runs_root: Path, out: Path, notes: Path | None = None, *,
                 grid_path: Path | None = None, remeasure: bool = False, failed: Collection[str] = (),
                 rounds: int = 200) -> Path:
    """Write out/README.md and out/assets/*.png from the grid's runs under runs_root -> the README path."""
    runs_root, out = Path(runs_root), Path(out)
    (out / ASSETS).mkdir(parents=True, exist_ok=True)
    results = load_results(grid, runs_root, set(failed))
    main_cells = [c for sc in grid.scenarios for c in cells_of(grid, results, sc["preset"], "main")]
    timings = inference_times(main_cells, out / ASSETS / INFERENCE_FILE, remeasure, rounds)
    parts = ["# LoRASA report", "",
             "Multi-agent policies trained as one shared backbone plus per-agent LoRA adapters (LoRASA) against "
             "parameter sharing (PS), non-shared policies (NPS), selective sharing (SePS) and shared trunk with "
             "per-agent heads (MTL). Generated by `lorasa-report` (training/report.py) from the runs' files.", "",
             setup_section(grid, results, runs_root, out, grid_path)]
    if timings.get("runs"):
        parts += [f"Inference timings measured {timings['measured_at']} ({timings['rounds']} interleaved rounds, "
                  f"1-minute load average {timings['loadavg_1min']}); cached in `{ASSETS}/{INFERENCE_FILE}`.", ""]
    parts += [scenario_section(grid, results, sc, out, timings) for sc in grid.scenarios]
    parts += [ablation_section(grid, results, out), comparison_section(grid, results)]
    if notes:
        parts += ["## Reading", "", Path(notes).read_text().rstrip(), ""]
    parts.append(missing_section(results))
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme


# --- CLI ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lorasa-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "train the missing runs, then write the report"),
                        ("write", "write the report from the finished runs")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("grid", type=Path, help="the grid TOML")
        s.add_argument("--runs", type=Path, required=True, help="runs root (one directory per run)")
        s.add_argument("--out", type=Path, required=True, help="report directory (README.md, assets/)")
        s.add_argument("--notes", type=Path, help="markdown included verbatim under 'Reading'")
        s.add_argument("--remeasure", action="store_true", help="redo the cached inference timings")
        s.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
        if name == "run":
            s.add_argument("--jobs", type=int, default=2, help="runs trained at a time")
    args = p.parse_args(argv)
    grid = Grid.load(args.grid)
    failed: list[str] = []
    if args.command == "run":
        failed = run_grid(grid, args.runs.resolve(), args.jobs)
    readme = write_report(grid, args.runs, args.out, args.notes, grid_path=args.grid, remeasure=args.remeasure,
                          failed=set(failed), rounds=args.rounds)
    print(readme)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
