"""`lorasa-report plan GRID`: how long the grid's remaining runs take, before starting them.

Each run trains `Run.trained_steps` env steps (a LoRA run only the part after the switch) at the
env-steps/s of its scenario and method: measured on this grid's own finished runs when there are some
(mean over them, from their compact results), else the grid's `[plan] steps_per_s` table (measured
numbers from earlier runs, with their source in the grid file). The wall time is that of the runner's
own schedule (`run_grid`: declared order, `jobs` at a time, a LoRA run after its base run), simulated.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from lorasa_serve.cli import UsageError

from ..grid import Grid, Run, is_done
from .results import load_results


@dataclass
class PlanRow:
    preset: str
    method: str
    runs_left: int
    runs_total: int
    steps_per_run: int  # env steps one run trains itself
    steps_per_s: float
    source: str  # "measured (n runs)" or "[plan] table"

    @property
    def run_seconds(self) -> float:
        return self.runs_left * self.steps_per_run / self.steps_per_s


def rates(grid: Grid, runs_root: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """(preset, method) -> (env-steps/s, source): the grid's finished runs, else its [plan] table."""
    table = (grid.plan or {}).get("steps_per_s", {})
    out = {}
    finished: dict[tuple[str, str], list[float]] = {}
    for r in load_results(grid, runs_root).values():
        if r.done and r.run.group == "main" and r.summary.get("train_wall_s"):
            finished.setdefault((r.run.preset, r.run.method), []).append(r.steps_per_s)
    for run in grid.runs:
        key = (run.preset, run.method)
        if key in out:
            continue
        if key in finished:
            out[key] = (statistics.fmean(finished[key]), f"measured ({len(finished[key])} runs)")
        elif run.method in table.get(run.preset, {}):
            out[key] = (float(table[run.preset][run.method]), "[plan] table")
    return out


def plan_rows(grid: Grid, runs_root: Path) -> list[PlanRow]:
    known = rates(grid, runs_root)
    rows: dict[tuple[str, str, int], PlanRow] = {}
    for run in grid.runs:
        key = (run.preset, run.method)
        if key not in known:
            raise UsageError(f"no env-steps/s for {run.preset} {run.method}: add to the grid file a measured "
                             f"rate (e.g. a report's Env-steps/s column, or one short run's summary.json "
                             f"env_steps / train_wall_s): [plan] then steps_per_s = {{ {run.preset} = "
                             f"{{ \"{run.method}\" = 2500 }} }}")
        rate, source = known[key]
        row = rows.setdefault((run.preset, run.method, run.trained_steps),
                              PlanRow(run.preset, run.method, 0, 0, run.trained_steps, rate, source))
        row.runs_total += 1
        row.runs_left += not is_done(runs_root, run, grid)
    return list(rows.values())


def simulate(runs: list[Run], seconds: dict[str, float], jobs: int) -> float:
    """Wall time of `run_grid`'s schedule: runs in declared order, up to `jobs` at once, a run waits for
    the run it `needs` (if that one is in `runs`) to finish. seconds: run key -> duration."""
    todo, running, now = list(runs), {}, 0.0  # running: key -> finish time
    pending = {r.key for r in runs}
    while todo or running:
        for run in list(todo):
            if len(running) >= jobs:
                break
            if run.needs in pending:
                continue
            todo.remove(run)
            running[run.key] = now + seconds[run.key]
        if not running:
            raise ValueError("runs wait for runs that never finish")
        key = min(running, key=running.get)
        now = running.pop(key)
        pending.discard(key)
    return now


def plan(grid: Grid, runs_root: Path, jobs: int) -> tuple[list[PlanRow], float]:
    """-> (rows per scenario x method x steps, simulated wall seconds of the remaining runs)."""
    rows = plan_rows(grid, runs_root)
    rate = {(r.preset, r.method): r.steps_per_s for r in rows}
    left = [r for r in grid.runs if not is_done(runs_root, r, grid)]
    seconds = {r.key: r.trained_steps / rate[(r.preset, r.method)] for r in left}
    return rows, simulate(left, seconds, jobs)


def plan_text(grid: Grid, runs_root: Path, jobs: int, md_table) -> str:
    rows, wall = plan(grid, runs_root, jobs)
    total = sum(r.run_seconds for r in rows)
    body = [[r.preset, r.method, f"{r.runs_left}/{r.runs_total}", f"{r.steps_per_run:,}",
             f"{r.steps_per_s:,.0f}", r.source, f"{r.run_seconds / 3600:.2f}"] for r in rows]
    return "\n".join([
        md_table(["Scenario", "Method", "Runs left", "Steps per run", "Env-steps/s", "Rate from",
                  "Run-hours left"], body), "",
        f"Remaining: {sum(r.runs_left for r in rows)} runs, {total / 3600:.2f} run-hours; at {jobs} at a time "
        f"(one core each) {total / jobs / 3600:.2f} h if perfectly packed, {wall / 3600:.2f} h in the "
        f"runner's schedule (simulated)."])
