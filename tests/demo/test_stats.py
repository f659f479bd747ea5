"""The study's statistics on inputs worked out by hand."""
import math

import pytest

from stllava.demo.stats import fmt_diff, fmt_mean_sd, mean_sd, paired_difference, t_quantile_975


def test_mean_sd_by_hand():
    s = mean_sd([80.0, 84.0, 88.0])
    assert s["mean"] == 84.0 and s["sd"] == 4.0 and s["n"] == 3  # deviations -4, 0, 4: sqrt(32/2) = 4
    assert mean_sd([5.0])["sd"] is None
    assert fmt_mean_sd(s) == "84.0 ± 4.0"


def test_paired_difference_by_hand():
    # per-seed differences 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7321
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert d["diffs"] == [1.0, 2.0, 3.0] and d["mean"] == 2.0 and d["sd"] == 1.0
    half = 4.303 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-12)
    assert d["significant"] is False  # 2 - 2.484 < 0
    assert fmt_diff(d) == "+2.0 [-0.5, +4.5]"


def test_pairing_not_pooling():
    # Large spread between seeds, consistent gain within each seed: the paired interval excludes 0
    # where an unpaired comparison of the two means would not.
    a, b = [50.0, 70.0, 90.0, 60.0], [48.0, 67.0, 88.0, 57.5]
    d = paired_difference(a, b)
    assert d["significant"] and d["ci95"][0] > 0
    assert fmt_diff(d).startswith("**+")


def test_refusals():
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_difference([1.0], [0.0])
    with pytest.raises(ValueError):
        mean_sd([])
    assert t_quantile_975(1) == 12.706 and t_quantile_975(200) == 1.96
