"""The report's answer to the central question: paired per-seed differences between methods of one
scenario and algorithm (same seed: same env seeds and evaluation episodes; a PS+LoRA run also shares its
PS run's phase 1), each with a 95% Student-t interval, for the final return and for the normalised area
under the learning curve (over all steps, and over the LoRA phase only), plus how large the final
evaluation's episode noise is next to the seed noise."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..grid import Grid
from .results import ALGO_NAMES, Cell, RunResult, cells_of, run_curve
from .stats import Stats, episode_noise_ratio, normalised_auc, paired_differences

PAIRED = (("lorasa", "ps"), ("lorasa", "nps"), ("nps", "ps"))  # A - B


def run_measures(res: RunResult, switch: int) -> dict[str, float]:
    """final return, AUC over the whole curve, AUC from `switch` to the end (normalised by steps)."""
    curve, _ = run_curve(res)
    out = {"final": res.final_return, "auc": math.nan, "auc_phase2": math.nan}
    if len(curve) >= 2:
        out["auc"] = normalised_auc(curve)
        if curve[0][0] <= switch < curve[-1][0]:
            out["auc_phase2"] = normalised_auc(curve, start=switch)
    return out


def recorded_switches(cells: list[Cell], nominal: int) -> dict[int, int]:
    """seed -> where that seed's phase-2 runs of `cells` really switched (summary.json's
    phase_switch_step: the first update boundary at or after the switch step, which a grid's switch_rule
    sets per seed; the latest if that seed's phase-2 runs differ); seeds without one are absent
    (`nominal` applies to them)."""
    out: dict[int, int] = {}
    for c in cells:
        for r in c.done:
            if r.summary.get("init_from") and int(r.summary.get("phase_switch_step", -1)) >= 0:
                out[r.run.seed] = max(out.get(r.run.seed, 0), int(r.summary["phase_switch_step"]))
    return out


@dataclass
class PairedRow:
    scenario: str
    algo: str
    a: Cell
    b: Cell
    diffs: dict[str, Stats]  # measure -> per-seed differences A - B

    def cells(self) -> list[str]:
        return [self.scenario, ALGO_NAMES[self.algo], f"{self.a.mode_label} − {self.b.mode_label}",
                str(self.diffs["final"].n)] + [interval_text(self.diffs[m]) for m in ("final", "auc", "auc_phase2")]


def interval_text(d: Stats) -> str:
    """'+24.3 ± 80.1 (seeds +426, -370, +17)'; 'higher' / 'lower' when the 95% interval excludes 0."""
    if d.n == 0 or any(math.isnan(v) for v in d.values):
        return "n/a"
    seeds = ", ".join(f"{v:+.0f}" if abs(v) >= 10 else f"{v:+.1f}" for v in d.values)
    if d.n < 2:
        return f"{d.mean:+.1f} (1 seed: no interval)"
    verdict = "within noise" if d.lo <= 0 <= d.hi else ("**higher**" if d.lo > 0 else "**lower**")
    return f"{d.mean:+.1f} ± {d.half_width:.1f}, {verdict} (seeds {seeds})"


def paired_rows(grid: Grid, results: dict[str, RunResult]) -> list[PairedRow]:
    rows = []
    for sc in grid.scenarios:
        _, switch = grid.budget(sc)
        cells = cells_of(grid, results, sc["preset"], "main")
        env = next((r.summary["env"] for c in cells for r in c.done), sc["preset"])
        for algo in dict.fromkeys(c.algo for c in cells):
            by_mode = {c.mode: c for c in cells if c.algo == algo}
            starts = recorded_switches(list(by_mode.values()), switch)
            measures = {m: {r.run.seed: run_measures(r, starts.get(r.run.seed, switch)) for r in c.done}
                        for m, c in by_mode.items()}
            for a, b in grid.pairs or PAIRED:
                if a in by_mode and b in by_mode:
                    diffs = {k: paired_differences({s: v[k] for s, v in measures[a].items()},
                                                   {s: v[k] for s, v in measures[b].items()})
                             for k in ("final", "auc", "auc_phase2")}
                    rows.append(PairedRow(env, algo, by_mode[a], by_mode[b], diffs))
    return rows


def noise_rows(grid: Grid, results: dict[str, RunResult]) -> list[list[str]]:
    out = []
    for sc in grid.scenarios:
        for c in cells_of(grid, results, sc["preset"], "main"):
            eps = [r.summary["final_eval"].get("returns") or [] for r in c.done]
            ratio = episode_noise_ratio(eps)
            out.append([c.done[0].summary["env"] if c.done else sc["preset"], c.label,
                        str(len(c.done)), str(max((len(e) for e in eps), default=0)),
                        "n/a" if math.isnan(ratio) else f"{ratio:.2f}"])
    return out


def paired_section(grid: Grid, results: dict[str, RunResult], md_table, assets: Path | None = None) -> str:
    """The section's markdown; with `assets`, also the figure paired_differences.png there."""
    rows = paired_rows(grid, results)
    if not rows:
        return ""
    figure = []
    if assets is not None and any(r.diffs["final"].n for r in rows):
        from .plots import plot_paired
        png = plot_paired(rows, assets / "paired_differences.png")
        figure = [f"![Paired differences]({assets.name}/{png.name})", ""]
    lines = ["## Paired differences (same seeds)", "",
             "A − B per seed, then the mean and its 95% Student-t interval (n − 1 dof) across seeds; "
             "**higher** / **lower** when the interval excludes 0. Same seed = same training env seeds and "
             "the same evaluation episodes; PS+LoRA − PS also shares phase 1 (the LoRA run starts from that "
             "seed's PS snapshot), so only the phase after the switch differs. AUC = area under the "
             "evaluation-return curve divided by its steps (the mean return over training; trapezoid rule, "
             "PS+LoRA's curve continues its PS run's); 'LoRA phase' = the same from the step where that seed's "
             "LoRA runs really switched (their first update boundary at or after the switch step: the grid's, "
             "or that seed's own under a switch rule) to the end, for both sides of the pair.", "",
             md_table(["Scenario", "Algo", "A − B", "Seeds", "Final return", "AUC (all steps)",
                       "AUC (LoRA phase)"], [r.cells() for r in rows]), "", *figure,
             "Final-evaluation noise: standard error of a run's final mean from its own episodes, divided "
             "by the standard deviation of the final means across seeds (below ~0.3 the episode noise "
             "adds under 5% to the seed spread).", "",
             md_table(["Scenario", "Method", "Seeds", "Final episodes per run", "episode SE / seed SD"],
                      noise_rows(grid, results)), ""]
    return "\n".join(lines)
