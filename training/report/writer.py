"""The report's markdown: setup, per-scenario tables and curves, ablations, the comparison with the
paper's claims and the missing runs, assembled into OUT/README.md by `write_report`."""
from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from ..grid import BASE_OF, Grid
from .inference import inference_times, utc_now
from .paired import paired_section
from .plots import plot_ablation, plot_entropy, plot_scenario
from .results import ALGO_NAMES, MODE_NAMES, Cell, RunResult, cells_of, load_results
from .stats import Stats, overlap

ASSETS = "assets"
INFERENCE_FILE = "inference.json"
ABLATION_TITLES = {"rank": "LoRA rank", "layers": "Adapted layers", "switch": "Phase-switch step"}


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(r: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"  # "Humanoid 9|8" stays one cell
    lines = [cells(header), "|" + "|".join("---" for _ in header) + "|"] + [cells(r) for r in rows]
    return "\n".join(lines)


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"



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
             f"- Budget: {_budget_text(grid)} env steps per run (all phases); PS+LoRA / SePS+LoRA runs start "
             f"phase 2 from their PS / SePS run's snapshot at the switch step (same seed).",
             *_switch_rule_lines(grid, results),
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
             f"report written {utc_now()}.",
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


def _switch_rule_lines(grid: Grid, results: dict[str, RunResult]) -> list[str]:
    """Under a switch rule, the rule (stated in the grid before any run) and where each seed switched."""
    rules = [sc.get("switch_rule", grid.switch_rule) for sc in grid.scenarios]
    if not any(rules):
        return []
    rule = next(r for r in rules if r)
    lines = [f"- Switch rule (stated in the grid before any run, `training/grid.py` plateau_step): each seed's "
             f"phase-2 runs switch at the first evaluation where the mean of its PS run's last {rule['window']} "
             f"evaluations is less than {rule['min_gain']:.0%} above the mean of the {rule['window']} before "
             f"them, rounded up to the next snapshot (every {rule['every']:,} steps), at {rule['latest']:,} at the "
             f"latest; the budget's switch step above is only that latest bound."]
    for sc in grid.scenarios:
        seen: dict[int, int] = {}
        for r in results.values():
            if r.done and r.run.preset == sc["preset"] and r.summary.get("init_from"):
                seen[r.run.seed] = int(r.summary["phase_switch_step"])
        if seen:
            per_seed = ", ".join(f"seed {k}: {v:,}" for k, v in sorted(seen.items()))
            lines.append(f"- Switches of `{sc['preset']}` (first update boundary at or after the rule's step): "
                         f"{per_seed}.")
    return lines


def _budget_text(grid: Grid) -> str:
    budgets = {sc["preset"]: grid.budget(sc) for sc in grid.scenarios}
    if len(set(budgets.values())) <= 1 and (not budgets or next(iter(budgets.values())) ==
                                             (grid.total_steps, grid.switch_step)):
        return f"{grid.total_steps:,} (switch at {grid.switch_step:,})"
    return "; ".join(f"`{p}` {t:,} (switch at {s:,})" for p, (t, s) in budgets.items())


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
        ent = plot_entropy(cells, env, out / ASSETS / f"entropy_{preset}.png")
        lines += [f"![{env} policy entropy]({ASSETS}/{ent.name})", ""]
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
    from ..config import preset
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
    def paired(self) -> Stats | None:
        """Per-seed differences A - B when A is phase 2 of B's own runs (same seed, same phase 1):
        the seed's luck in phase 1 cancels. None for unpaired comparisons."""
        if BASE_OF.get(self.a.mode) != self.b.mode:
            return None
        b_by_seed = {r.run.seed: r.final_return for r in self.b.done}
        return Stats(tuple(r.final_return - b_by_seed[r.run.seed] for r in self.a.done
                           if r.run.seed in b_by_seed))

    @property
    def ratio(self) -> str:
        a, b = self.a.returns.mean, self.b.returns.mean
        return f"{a / b:.2f}" if a > 0 and b > 0 else "n/a"

    def row(self) -> list[str]:
        a, b = self.a.returns, self.b.returns
        return [self.scenario, ALGO_NAMES[self.algo], f"{self.a.mode_label} vs {self.b.mode_label}",
                a.fmt(), b.fmt(), _num(self.diff) if a.n and b.n else "n/a", self.ratio, self.reading,
                "n/a" if self.paired is None else _paired_text(self.paired)]


def _paired_text(d: Stats) -> str:
    """'+24.3 ± 80.1 (seeds: +426, -370, +17)'; the interval excludes 0 -> 'higher' / 'lower'."""
    if d.n == 0:
        return "n/a"
    seeds = ", ".join(f"{v:+.0f}" for v in d.values)
    if d.n < 2:
        return f"{d.mean:+.1f} (seed: {seeds})"
    sign = "" if d.lo <= 0 <= d.hi else (" higher" if d.lo > 0 else " lower")
    return f"{d.mean:+.1f} ± {d.half_width:.1f}{sign} (seeds: {seeds})"


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
             "'(no interval)': a side has a single seed. A / B: ratio of mean returns (when both are positive). "
             "Paired: for a LoRA run against its own base method, the mean and 95% interval of the per-seed "
             "differences (each LoRA run continues that seed's base run from the switch step, so phase-1 "
             "luck cancels); 'higher' / 'lower' when the interval excludes 0.",
             ""]
    if comps:
        header = ["Scenario", "Algo", "A vs B", "A", "B", "A − B", "A / B", "Reading", "Paired A − B (same seeds)"]
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
             "per-agent heads (MTL). Generated by `lorasa-report` (training/report/) from the runs' files.", "",
             setup_section(grid, results, runs_root, out, grid_path)]
    if timings.get("runs"):
        parts += [f"Inference timings measured {timings['measured_at']} ({timings['rounds']} interleaved rounds, "
                  f"1-minute load average {timings['loadavg_1min']}); cached in `{ASSETS}/{INFERENCE_FILE}`.", ""]
    parts += [scenario_section(grid, results, sc, out, timings) for sc in grid.scenarios]
    parts += [ablation_section(grid, results, out), comparison_section(grid, results),
              paired_section(grid, results, md_table, out / ASSETS)]
    if notes:
        parts += ["## Reading", "", Path(notes).read_text().rstrip(), ""]
    parts.append(missing_section(results))
    readme = out / "README.md"
    readme.write_text("\n".join(parts))
    return readme
