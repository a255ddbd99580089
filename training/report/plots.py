"""Matplotlib figures of the report (Agg backend, PNG): learning curves per scenario and algorithm, and
ablation panels (final return per setting and learning curves)."""
from __future__ import annotations

from pathlib import Path

from .results import ALGO_NAMES, Cell, MeanCurve, cell_curve



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


def shade_lora_phase(ax, curves: list[MeanCurve]) -> None:
    """Grey band from the (first) LoRA switch to the last evaluated step: phase 2 (backbone frozen)."""
    switches = [c.switch for c in curves if c.switch is not None]
    end = max((c.steps[-1] for c in curves if c.steps), default=None)
    if switches and end is not None and min(switches) < end:
        ax.axvspan(min(switches), end, color="0.5", alpha=0.12, lw=0, label="LoRA phase (backbone frozen)")


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
        curves = [(cell, cell_curve(cell)) for cell in cells if cell.algo == algo and cell.done]
        shade_lora_phase(ax, [c for _, c in curves])
        for cell, curve in curves:
            draw_curve(ax, curve, f"{cell.label} (n={len(cell.done)})", cell.color)
        _style(ax, f"{title}: {ALGO_NAMES[algo]} (mean over seeds, 95% CI; dotted: LoRA switch)")
    return _save(fig, path)


def plot_entropy(cells: list[Cell], title: str, path: Path) -> Path:
    """The policy entropy logged at each update (metrics.csv `entropy`; with an entropy coefficient of 0
    it only falls if the run trains its log-std), mean across seeds, one panel per algorithm."""
    plt = _pyplot()
    algos = list(dict.fromkeys(c.algo for c in cells))
    fig, axes = plt.subplots(1, len(algos), figsize=(7 * len(algos), 4.2), squeeze=False, sharey=True)
    for ax, algo in zip(axes[0], algos):
        curves = [(cell, cell_curve(cell, "entropy")) for cell in cells if cell.algo == algo and cell.done]
        shade_lora_phase(ax, [c for _, c in curves])
        for cell, curve in curves:
            means = [s.mean for s in curve.stats]
            ax.plot(curve.steps, means, color=cell.color, lw=1.4,
                    label=f"{cell.label} (n={len(cell.done)})")
        _style(ax, f"{title}: {ALGO_NAMES[algo]} policy entropy (mean over seeds)", ylabel="entropy (nats)")
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


def plot_paired(rows, path: Path) -> Path:
    """One panel per measure (final return, AUC, AUC of the LoRA phase): each paired comparison's per-seed
    differences A - B (x) and their mean with its 95% interval; the dashed line is 0 (no difference)."""
    plt = _pyplot()
    measures = (("final", "final return"), ("auc", "AUC (all steps)"), ("auc_phase2", "AUC (LoRA phase)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.9 + 0.45 * len(rows)), sharey=True, squeeze=False)
    labels = [f"{r.scenario} {r.algo.upper()}: {r.a.mode_label} − {r.b.mode_label}" for r in rows]
    for ax, (key, title) in zip(axes[0], measures):
        for y, row in enumerate(rows):
            d = row.diffs[key]
            if d.n == 0 or any(v != v for v in d.values):  # no data / nan
                continue
            ax.plot(d.values, [y] * d.n, "x", color="0.4", alpha=0.7)
            err = 0.0 if d.n < 2 else d.half_width
            ax.errorbar([d.mean], [y], xerr=[err], fmt="o", color=f"C{y % 10}", capsize=4)
        ax.axvline(0.0, color="k", ls="--", lw=0.8)
        ax.set_title(f"A − B per seed (x), mean ± 95% CI: {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    return _save(fig, path)
