"""The intervals behind every held-out result (minigrpo/stats.py) and the per-task summaries of
minigrpo/evaluation.py, on hand-made outcomes with the expected values worked out beside them."""

import math

import pytest

from minigrpo.evaluation import TaskOutcomes, rate, summarize_outcomes
from minigrpo.stats import Z95, mcnemar_p, paired_difference, wilson_interval


def test_wilson_interval_by_hand():
    # 0 of 10: the centre and the half-width are both z^2 / (2 (n + z^2)), so low = 0 and
    # high = z^2 / (n + z^2) = 3.841459 / 13.841459 = 0.277533 (the normal approximation gives [0, 0])
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.841459 / 13.841459), abs=1e-6)
    # 5 of 10: centre 0.5; half = z sqrt(0.25/10 + z^2/400) / (1 + z^2/10)
    #        = 1.959964 * sqrt(0.025 + 0.009604) / 1.384146 = 1.959964 * 0.186022 / 1.384146 = 0.263407
    assert wilson_interval(5, 10) == pytest.approx((0.5 - 0.263407, 0.5 + 0.263407), abs=1e-6)
    # symmetric: 10 of 10 mirrors 0 of 10
    assert wilson_interval(10, 10) == pytest.approx((1 - 3.841459 / 13.841459, 1.0), abs=1e-6)
    # the bounds at 0 and n successes are exact, so low <= rate <= high holds without rounding slack
    for n in (1, 7, 12, 640):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    # 43 of 191 (the warm-up on 3-number tasks, issue 22): contains 0.225, about +-0.06 wide
    low, high = wilson_interval(43, 191)
    assert low < 43 / 191 < high and high - low == pytest.approx(0.1178, abs=1e-3)
    assert Z95 == pytest.approx(1.959964, abs=1e-6)
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_mcnemar_exact_p_by_hand():
    # 0 vs 5 discordant tasks: P(X <= 0) for X ~ Bin(5, 1/2) is 1/32, two-sided 2/32
    assert mcnemar_p(0, 5) == 0.0625
    # 1 vs 9: (C(10,0) + C(10,1)) / 2^10 = 11/1024, two-sided 22/1024; symmetric in its arguments
    assert mcnemar_p(1, 9) == mcnemar_p(9, 1) == 22 / 1024
    # 3 vs 3: twice (1 + 6 + 15 + 20)/64 exceeds 1, capped; no discordant task: no evidence either way
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0


def test_paired_difference_by_hand():
    # 100 tasks: 30 both solve, 20 only B, 5 only A, 45 neither. Difference (20 - 5)/100 = 0.15. The
    # normal approximation of the paired difference: SE = sqrt(((20 + 5)/100 - 0.15^2) / 100) = 0.04770,
    # 0.15 +- 1.96 * 0.0477 = [0.0565, 0.2435]; the bootstrap agrees to its 0.01 grain.
    a = [1] * 30 + [0] * 20 + [1] * 5 + [0] * 45
    b = [1] * 30 + [1] * 20 + [0] * 5 + [0] * 45
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.15) and (d["only_a"], d["only_b"], d["tasks"]) == (5, 20, 100)
    se = math.sqrt((0.25 - 0.15**2) / 100)
    assert d["low"] == pytest.approx(0.15 - Z95 * se, abs=0.015) and d["high"] == pytest.approx(0.15 + Z95 * se, abs=0.015)
    # McNemar: 2 * sum_{i<=5} C(25, i) / 2^25 = 2 * 68406 / 33554432
    assert d["mcnemar_p"] == pytest.approx(2 * 68406 / 2**25)
    # seeded: the same outcomes give the same interval; the order of the tasks does not matter
    assert paired_difference(a, b) == d
    order = [(7 * i) % 100 for i in range(100)]
    shuffled = paired_difference([a[i] for i in order], [b[i] for i in order])
    assert shuffled["difference"] == d["difference"] and shuffled["mcnemar_p"] == d["mcnemar_p"]
    # the resampling draws other tasks then, so the interval agrees to the bootstrap's grain only
    assert shuffled["low"] == pytest.approx(d["low"], abs=0.011) and shuffled["high"] == pytest.approx(d["high"], abs=0.011)
    # B minus A: swapping them flips the sign
    assert paired_difference(b, a)["difference"] == pytest.approx(-0.15)


def test_paired_difference_without_disagreement_is_exactly_zero():
    same = [True, False, True, True]
    assert paired_difference(same, same) == {"difference": 0.0, "low": 0.0, "high": 0.0, "only_a": 0, "only_b": 0,
                                             "tasks": 4, "mcnemar_p": 1.0}
    # every task flips from failed to solved: +1 with no doubt about it
    d = paired_difference([False] * 20, [True] * 20)
    assert (d["difference"], d["low"], d["high"]) == (1.0, 1.0, 1.0) and d["mcnemar_p"] == 2 / 2**20
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_summaries_per_group_and_overall():
    # 6 tasks: three with 2 numbers (solved, solved, failed), three with 3 (failed x3); format on all but
    # one; pass@4 catches one more 3-number task
    outcomes = TaskOutcomes(success=[True, True, False, False, False, False],
                            format=[True, True, True, False, True, True],
                            pass_k=[True, True, False, True, False, False], k=4,
                            completion_length=[10, 20, 30, 40, 50, 60], truncated=[False] * 5 + [True],
                            texts=[""] * 6)
    s = summarize_outcomes(outcomes, ["2", "2", "2", "3", "3", "3"])
    assert list(s) == ["all", "2", "3"]
    assert s["all"]["success"] == rate([True, True] + [False] * 4)
    assert s["all"]["success"]["rate"] == pytest.approx(2 / 6) and s["all"]["success"]["count"] == 2
    assert (s["all"]["success"]["low"], s["all"]["success"]["high"]) == wilson_interval(2, 6)
    assert s["2"]["success"]["rate"] == pytest.approx(2 / 3) and s["3"]["success"]["rate"] == 0.0
    assert s["3"]["success"]["high"] == pytest.approx(3.841459 / 6.841459, abs=1e-6)  # 0 of 3: z^2/(n + z^2)
    assert s["all"]["format"]["count"] == 5 and s["3"]["format"]["rate"] == pytest.approx(2 / 3)
    assert s["all"]["pass@4"]["count"] == 3 and s["3"]["pass@4"]["count"] == 1
    assert s["2"]["completion_length_mean"] == 20 and s["all"]["completion_length_mean"] == 35
    assert s["2"]["truncated_fraction"] == 0 and s["3"]["truncated_fraction"] == pytest.approx(1 / 3)
    # pass@k and format not measured: not reported
    bare = summarize_outcomes(TaskOutcomes([True], None, None, 0, [5], [False], [""]), ["3"])
    assert set(bare["all"]) == {"success", "completion_length_mean", "truncated_fraction"}
    with pytest.raises(ValueError, match="groups"):
        summarize_outcomes(outcomes, ["2"])
