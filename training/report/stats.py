"""Statistics across seeds: Student's t distribution (via the regularized incomplete beta function),
the mean with its two-sided Student-t confidence interval, and interval overlap."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


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


def paired_differences(a: dict[int, float], b: dict[int, float]) -> Stats:
    """Per-seed differences a[s] - b[s] over the seeds both have (sorted by seed)."""
    return Stats(tuple(a[s] - b[s] for s in sorted(set(a) & set(b))))


def _interp(points: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"{x} is outside the curve's steps {points[0][0]}..{points[-1][0]}")


def normalised_auc(points: list[tuple[float, float]], start: float | None = None,
                   end: float | None = None) -> float:
    """Area under the piecewise-linear curve (step, value) between `start` and `end` (default: its first
    and last step) divided by (end - start): the curve's mean value over those steps (trapezoid rule)."""
    pts = sorted(points)
    if len(pts) < 2:
        return pts[0][1] if pts else math.nan
    lo = pts[0][0] if start is None else start
    hi = pts[-1][0] if end is None else end
    if not lo < hi:
        raise ValueError(f"empty AUC window [{lo}, {hi}]")
    inner = [p for p in pts if lo < p[0] < hi]
    xs = [(lo, _interp(pts, lo)), *inner, (hi, _interp(pts, hi))]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(xs, xs[1:]))
    return area / (hi - lo)


def episode_noise_ratio(episode_returns: list[list[float]]) -> float:
    """Standard error of one run's final mean from its own episodes (root mean over runs of
    var_episodes / n) divided by the standard deviation of the final means across runs (seeds).
    Small (e.g. < 0.3): the final evaluation's episode noise is small next to the seed noise."""
    runs = [r for r in episode_returns if len(r) >= 2]
    if len(runs) < 2:
        return math.nan
    se = math.sqrt(statistics.fmean(statistics.variance(r) / len(r) for r in runs))
    sd = statistics.stdev(statistics.fmean(r) for r in runs)
    return se / sd if sd > 0 else math.inf
