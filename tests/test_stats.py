"""stats.py: Student's t quantiles against a statistics table, intervals and paired differences by hand."""
import math

import pytest

from stats import markdown_table, mean_interval, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (200, 1.9719)])
def test_t_quantiles_match_the_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)


@pytest.mark.parametrize("df,p,q", [(1, 0.9995, 636.6192), (2, 0.9995, 31.5991), (3, 0.9995, 12.9240),
                                    (5, 0.995, 4.0321), (10, 0.9995, 4.5869)])
def test_t_quantiles_in_the_tails(df, p, q):
    assert t_quantile(p, df) == pytest.approx(q, rel=1e-4)


@pytest.mark.parametrize("t", [-30.0, -1.5, 0.0, 0.7, 4.0, 600.0])
def test_t_cdf_closed_forms(t):
    """df 1 is Cauchy's, df 2 has the closed form 1/2 + t / (2 sqrt(t^2 + 2))."""
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-15)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-15)


def test_mean_interval_by_hand():
    s = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, half-width 4.3027 / sqrt(3)
    assert (s["mean"], s["sd"], s["n"]) == (2.0, 1.0, 3)
    assert (s["lo"] == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3)
            and s["hi"] == pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-3))
    assert mean_interval([5.0]) == {"mean": 5.0, "sd": 0.0, "lo": 5.0, "hi": 5.0, "n": 1}


def test_paired_difference_by_hand():
    a, b = [70.0, 75.0, 80.0, 72.0], [60.0, 66.0, 69.0, 61.0]  # differences 10, 9, 11, 11: mean 10.25, sd 0.9574
    p = paired_difference(a, b)
    assert p["mean"] == pytest.approx(10.25) and p["sd"] == pytest.approx(0.957427, abs=1e-5)
    half = 3.1824 * 0.957427 / 2  # t_{0.975, 3}
    assert p["lo"] == pytest.approx(10.25 - half, abs=1e-3) and p["significant"]
    q = paired_difference([70.0, 60.0, 65.0], [65.0, 66.0, 64.0])  # 5, -6, 1: the interval holds 0
    assert q["lo"] < 0 < q["hi"] and not q["significant"]
    z = paired_difference([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # identical differences: a zero-width interval, no evidence
    assert z["lo"] == z["hi"] == 2.0 and not z["significant"]
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 1.25], [None, 2]]) == "| a | b |\n|---|---|\n| x | 1.2 |\n| - | 2 |\n"
