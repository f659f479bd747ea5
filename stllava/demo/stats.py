"""Statistics of the study: mean ± sd over seeds, and paired differences with a 95% interval.

Seeds are the unit of replication: a seed fixes the labelled set, the model's initialisation and
every sampling stream, so two conditions run with the same seed and labelled-set size form a
*pair*, and the comparison is the mean of the per-seed differences with Student's t interval
(n − 1 degrees of freedom). With 3 seeds the t quantile is 4.30: intervals are honest, not narrow.
Only the standard library is used (``statistics``; the t quantiles are tabulated below, since
SciPy is not a dependency of this project).
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (beyond: the normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (df ≥ 1)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df ≥ 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def primary_score(scores: dict) -> float:
    """The study's pre-registered primary metric of one model's scores: the mean of closed accuracy
    and open recall (docs/Study.md#pre-registration-2026-12-06)."""
    return (scores["closed_acc"] + scores["open_recall"]) / 2


def mean_sd(values: Sequence[float]) -> dict:
    """``{"n", "mean", "sd", "values"}``; sd is the sample standard deviation (None for n < 2)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "values": vals}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired difference ``a − b`` (value i of each from the same seed): ``{"n", "mean", "sd",
    "ci95": [low, high], "diffs", "significant"}``, where the interval is mean ± t·sd/√n and
    ``significant`` says whether it excludes 0. Refuses lists of different lengths or n < 2."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    if len(diffs) < 2:
        raise ValueError("a paired interval needs at least 2 seeds")
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    low, high = m - half, m + half
    return {"n": len(diffs), "mean": m, "sd": sd, "ci95": [low, high], "diffs": diffs,
            "significant": low > 0 or high < 0}


def fmt_mean_sd(stat: dict, digits: int = 1) -> str:
    """``"85.0 ± 1.2"`` (or just the mean when there is one value)."""
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def fmt_diff(d: dict, digits: int = 1) -> str:
    """``"+3.2 [+0.4, +6.0]"``, bold when the interval excludes 0."""
    low, high = d["ci95"]
    text = f"{d['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"**{text}**" if d["significant"] else text
