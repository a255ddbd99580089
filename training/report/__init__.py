"""`lorasa-report`: run a declared grid (training/grid.py) and write its report: a markdown README with
final-performance tables (mean and 95% Student-t interval across seeds), learning curves, trainable
parameters, training throughput, inference time per decision, the ablations, and a comparison with
the LoRASA paper's qualitative claims computed from the numbers.

    lorasa-report run reports/grid.toml --runs runs/report --out reports [--jobs 2] [--notes NOTES.md]
    lorasa-report run reports/grid.toml --runs runs/report --out reports --ray auto   # on a Ray cluster
    lorasa-report write reports/grid.toml --runs runs/report --out reports [--remeasure]
    lorasa-report plan reports/grid_budget.toml --runs runs/budget [--jobs 2]

`run` trains the missing runs first, then writes the report (listing failed runs; exit code 1 if any
failed); `write` only writes the report; `plan` prints the expected wall time of the runs not yet done
(training/report/plan.py). Inference timings are cached in OUT/assets/inference.json. Each finished
run's compact results go to <grid dir>/<grid name>/runs/ (commit them: `run` skips those runs).
"""
from __future__ import annotations

import sys
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, UsageError, run_cli

from ..grid import Grid, check_recorded, has_compact, run_grid
from .results import concat_rows, mean_curve
from .stats import Stats, betainc, overlap, t_cdf, t_quantile
from .writer import write_report

__all__ = ["main", "write_report", "Stats", "betainc", "concat_rows", "mean_curve", "overlap", "t_cdf",
           "t_quantile"]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="lorasa-report", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, help="what to do")
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
            s.add_argument("--jobs", type=int, default=2, help="runs trained at a time (here; not with --ray)")
            s.add_argument("--ray", metavar="ADDRESS", help="train the runs as Ray tasks on the cluster at "
                           "ADDRESS (auto: the one `ray start` runs here; host:port) instead of here; needs the "
                           "'ray' extra (training/grid_ray.py)")
    s = sub.add_parser("plan", help="print the expected wall time of the runs not yet done")
    s.add_argument("grid", type=Path, help="the grid TOML")
    s.add_argument("--runs", type=Path, required=True, help="runs root (finished runs there count too)")
    s.add_argument("--jobs", type=int, default=2, help="runs trained at a time")
    return p


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plan":
        from .plan import plan_text
        from .writer import md_table
        if args.jobs < 1:
            raise UsageError("--jobs must be >= 1")
        print(plan_text(Grid.load(args.grid), args.runs, args.jobs, md_table))
        return 0
    launcher = None
    grid = _check(args)
    if args.command == "run":
        check_recorded(grid, args.runs.resolve())
        if args.ray:
            from ..grid_ray import RayLauncher, check_cluster_fits
            launcher = RayLauncher(args.runs.resolve(), args.ray)
            check_cluster_fits(grid.runs, launcher)
    failed: list[str] = []
    if args.command == "run":
        failed = run_grid(grid, args.runs.resolve(), args.jobs, launcher=launcher)
    readme = write_report(grid, args.runs, args.out, args.notes, grid_path=args.grid, remeasure=args.remeasure,
                          failed=set(failed), rounds=args.rounds)
    print(readme)
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("lorasa-report", run, argv)


def _check(args) -> Grid:
    """The grid, once every argument is usable (before anything is trained or written)."""
    if args.notes and not args.notes.is_file():
        raise UsageError(f"--notes {args.notes} does not exist; pass an existing markdown file or drop --notes")
    if args.rounds < 1 or getattr(args, "jobs", 1) < 1:
        raise UsageError("--rounds and --jobs must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a directory for the report")
    grid = Grid.load(args.grid)
    if args.command == "write" and not args.runs.is_dir() and not any(has_compact(grid, r) for r in grid.runs):
        raise UsageError(f"--runs {args.runs} does not exist and {grid.results} holds no compact results; pass "
                         "the runs root that lorasa-report run trained into (or use lorasa-report run to train "
                         "them)")
    return grid
