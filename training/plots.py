"""Learning-curve PNGs (matplotlib, Agg) from one or more metrics.csv files."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, run_cli


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_learning_curves(runs: dict[str, Path], out: Path, title: str = "",
                         metric: str | None = None) -> Path:
    """One line per run: evaluation return (or win rate for win-condition tasks) vs env steps; the
    training return (mean of the last episodes) as a thin line; a dotted line at each LoRA switch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, path) in enumerate(runs.items()):
        rows = read_metrics(Path(path))
        color = f"C{i}"
        key = metric or ("eval_win" if any(r["eval_win"] for r in rows) else "eval_return")
        train_key = "train_win" if key == "eval_win" else "train_return"
        tr = [(int(r["env_steps"]), float(r[train_key])) for r in rows if r[train_key]]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.35, lw=1, label=f"{label} (train, last 20 episodes)")
        ev = [(int(r["env_steps"]), float(r[key])) for r in rows if r[key]]
        if ev:
            ax.plot(*zip(*ev), color=color, marker="o", ms=3, lw=1.8, label=f"{label} (eval)")
        phases = [int(r["env_steps"]) for a, r in zip(rows, rows[1:]) if a["phase"] != r["phase"]]
        for x in phases:
            ax.axvline(x, color=color, ls=":", lw=1)
        ax.set_ylabel("win rate" if key == "eval_win" else "episode return")
    ax.set_xlabel("environment steps")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def save_learning_curve(metrics: Path, out: Path, label: str, title: str = "") -> Path | None:
    """The trainer's learning-curve PNG, or (matplotlib absent, e.g. only the `dev` extra installed) one
    note on stderr and None: the run's other outputs are already saved and stay valid."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"note: matplotlib is not installed (pip install 'lorasa-serve[train]'), {Path(out).name} "
              "not drawn", file=sys.stderr)
        return None
    return plot_learning_curves({label: Path(metrics)}, out, title)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m training.plots",
                       description="python -m training.plots OUT.png [--title T] LABEL=path/to/metrics.csv ...")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("runs", nargs="+", help="LABEL=metrics.csv, one per curve")
    p.add_argument("--title", default="", help="the figure's title")
    return p


def run(argv: list[str] | None) -> int:
    p = parser()
    args = p.parse_args(argv)
    bad = [r for r in args.runs if "=" not in r]
    if bad:
        p.error(f"{bad[0]!r}: write LABEL=path/to/metrics.csv")
    runs = dict(r.rsplit("=", 1) for r in args.runs)
    print(plot_learning_curves({k: Path(v) for k, v in runs.items()}, args.out, args.title))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m training.plots", run, argv)


if __name__ == "__main__":
    sys.exit(main())
