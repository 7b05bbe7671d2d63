"""The reward runner: weights, None, metrics, and every way a reward can fail (loudly, by name)."""

import doctest
import functools
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch

from minigrpo.rewards import Reward, RewardError, RewardWarning, repeat_columns, runner, score_completions

COMPLETIONS = ["c0", "c1", "c2", "c3"]  # P = 2 prompts, G = 2
PROMPTS = ["p0", "p0", "p1", "p1"]


def score(rewards, completions=COMPLETIONS, columns=None, **kw):
    return score_completions(rewards, completions, PROMPTS[: len(completions)], columns or {}, 2, **kw)


def partial_reward(completions, **kw):
    """Applies to c0, c2, c3 only."""
    return [{"c0": 1.0, "c1": None, "c2": 0.0, "c3": 1.0}[c] for c in completions]


def constant_two(completions, **kw):
    return [2] * len(completions)  # ints are numbers too


def test_weights_none_and_metrics():
    s = score([Reward(partial_reward), Reward(constant_two, weight=0.5)])
    # total = 1*partial (None -> 0) + 0.5*2 = [1+1, 0+1, 0+1, 1+1]
    assert s.total.dtype == torch.float32 and s.total.tolist() == [2.0, 1.0, 1.0, 2.0]
    assert s.per_reward == {"partial_reward": [1.0, None, 0.0, 1.0], "constant_two": [2.0] * 4}
    assert s.num_failures == {"partial_reward": 0, "constant_two": 0}
    m = s.metrics()
    assert all(type(v) is float for v in m.values())
    assert m["reward/partial_reward/mean"] == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3: the None is left out
    # Unbiased std (ddof=1), as the advantages use. group 0 = [1, None]: one value, skipped;
    # group 1 = [0, 1]: sqrt(((0 - .5)^2 + (1 - .5)^2) / 1) = sqrt(0.5)
    assert m["reward/partial_reward/group_std"] == pytest.approx(0.5**0.5, abs=1e-12)
    assert m["reward/constant_two/mean"] == 2.0 and m["reward/constant_two/group_std"] == 0.0
    assert m["reward/total/mean"] == 1.5
    assert m["reward/total/std"] == pytest.approx((1 / 3) ** 0.5, abs=1e-12)  # [2, 1, 1, 2]: 4 * 0.25 / 3
    assert m["reward/total/group_std"] == pytest.approx(0.5**0.5, abs=1e-12)  # both groups are {1, 2}
    assert m["reward/partial_reward/failures"] == 0.0


def test_all_none_reward_logs_nan_mean():
    s = score([Reward(lambda completions, **kw: [None] * len(completions), name="never")])
    assert s.total.tolist() == [0.0] * 4
    assert math.isnan(s.metrics()["reward/never/mean"]) and math.isnan(s.metrics()["reward/never/group_std"])


def test_columns_and_prompts_reach_the_reward_aligned_with_completions():
    seen = []

    def check(completions, prompts, target, **kw):  # a closure: fine across the fork
        seen.append(1)  # lost in the forked child: that is the documented caveat
        return [float(t == int(c[1:])) for c, t in zip(completions, target)] if prompts == PROMPTS else [-1.0] * 4

    columns = repeat_columns({"target": [0, 3]}, 2)  # per prompt -> per completion: [0, 0, 3, 3]
    assert columns == {"target": [0, 0, 3, 3]}
    forked = score([Reward(check)], columns=columns)
    assert forked.per_reward["check"] == [1.0, 0.0, 0.0, 1.0] and seen == []
    inline = score([Reward(check)], columns=columns, isolate=False)
    assert inline.per_reward == forked.per_reward and seen == [1]


def picky(completions, **kw):
    if any(c.startswith("bad") for c in completions):
        raise ZeroDivisionError("cannot score " + completions[0][:10])
    return [1.0] * len(completions)


def test_raising_reward_scores_zero_with_a_counted_warning():
    long_bad = "bad" + "x" * 500
    with pytest.warns(RewardWarning) as caught:
        s = score([Reward(picky)], completions=["c0", long_bad, "c2", "bad2"])
    assert s.per_reward["picky"] == [1.0, 0.0, 1.0, 0.0] and s.num_failures == {"picky": 2}
    assert s.metrics()["reward/picky/failures"] == 2.0
    assert len(caught) == 1  # one warning per reward and batch
    message = str(caught[0].message)
    assert message.startswith("reward 'picky' raised on 2 of 4 completions, scored 0 (on_error='zero'): completion 1")
    assert "ZeroDivisionError: cannot score badxxxxxxx" in message and "completion 3 'bad2'" in message
    assert long_bad[:200] in message and long_bad[:201] not in message  # shown truncated to 200 chars


def test_warning_shows_the_first_three_failures():
    with pytest.warns(RewardWarning, match=r"raised on 6 of 6 completions.*completion 2 'bad2'.*; and 3 more$"):
        score_completions([Reward(picky)], [f"bad{i}" for i in range(6)], ["p"] * 6, {}, 2)


def test_raising_reward_under_strict_policy_raises_naming_reward_and_completion():
    with pytest.raises(RewardError, match=r"(?s)reward 'picky' raised on completion 3 'bad2'.*ZeroDivisionError"):
        score([Reward(picky)], completions=["c0", "c1", "c2", "bad2"], on_error="raise")


def test_reward_raising_only_on_the_batch_warns_and_uses_single_values():
    def batch_shy(completions, **kw):
        if len(completions) > 1:
            raise MemoryError("batch too big")
        return [0.5]

    with pytest.warns(RewardWarning, match="'batch_shy' raised MemoryError: batch too big on the batch of 4"):
        s = score([Reward(batch_shy)])
    assert s.per_reward["batch_shy"] == [0.5] * 4 and s.num_failures == {"batch_shy": 0}


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0], r"returned 1 values for 4 completions"),
        ([1.0] * 5, r"returned 5 values for 4 completions"),
        (["1.0"] * 4, r"returned str '1.0' at position 0, not a number or None"),
        ([torch.tensor(1.0)] * 4, r"returned Tensor"),
        ([1.0, float("nan"), 1.0, 1.0], r"returned nan at position 1; rewards must be finite"),
        ([1.0, 1.0, float("-inf"), 1.0], r"returned -inf at position 2"),
        (np.array([1.0, 2.0, np.nan, 1.0]), r"returned nan at position 2"),
        (1.0, r"returned float, not a list"),
        ([10**400] * 4, r"returned inf at position 0"),
        ("1111", r"returned a str, not a list"),
    ],
)
@pytest.mark.parametrize("isolate", [True, False])
def test_broken_contract_is_an_error_naming_the_reward(returned, message, isolate):
    bad = Reward(lambda completions, **kw: returned, name="broken")
    with pytest.raises(RewardError, match="reward 'broken' " + message):
        score([bad], on_error="zero", isolate=isolate)


def test_generator_errors_count_as_the_reward_raising():
    def lazy(completions, **kw):
        return (1.0 / (c != "c2") for c in completions)  # ZeroDivisionError on c2, raised while consuming

    with pytest.warns(RewardWarning, match="reward 'lazy' raised on 1 of 4 completions.*completion 2 'c2': ZeroDivisionError"):
        s = score([Reward(lazy)])
    assert s.per_reward["lazy"] == [1.0, 1.0, 0.0, 1.0]


def test_numpy_values_are_accepted():
    s = score([Reward(lambda completions, **kw: np.array([0, 1, 0, 1], dtype=np.int64), name="np")])
    assert s.per_reward["np"] == [0.0, 1.0, 0.0, 1.0]


def spin(completions, **kw):
    while True:
        pass


def sleepy(completions, **kw):
    time.sleep(60)


def gil_holder(completions, **kw):
    base = 9  # 9**9**9**9 is one C call holding the GIL: no thread could interrupt it
    return [base**base**base**base]


@pytest.mark.parametrize("hang", [spin, sleepy, gil_holder])
def test_hanging_reward_is_killed_at_the_deadline(hang):
    start = time.perf_counter()
    with pytest.raises(RewardError, match=f"reward '{hang.__name__}' did not finish its batch call on 4 completions"):
        score([Reward(partial_reward), Reward(hang)], timeout_s=0.5)  # the second one is named
    assert time.perf_counter() - start < 5.0


def test_hang_during_one_by_one_calls_is_named_too():
    def hang_on_single(completions, **kw):
        if len(completions) > 1:
            raise ValueError("batch")
        while True:
            pass

    with pytest.raises(RewardError, match="'hang_on_single' did not finish its one-completion-at-a-time calls"):
        score([Reward(hang_on_single)], timeout_s=0.5)


def test_reward_killing_its_process_is_an_error():
    def exits(completions, **kw):
        os._exit(3)

    with pytest.raises(RewardError, match=r"died \(exit code 3\) while running reward 'exits'"):
        score([Reward(exits)])


def test_inline_mode_checks_the_time_limit_afterwards():
    def slow(completions, **kw):
        time.sleep(0.3)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward .slow. took \d+\.\d s on 4 completions, over timeout_s=0.1"):
        score([Reward(slow)], timeout_s=0.1, isolate=False)


def test_reward_definition_is_checked():
    assert Reward(partial_reward).name == "partial_reward"
    assert Reward(partial_reward, name="fmt").name == "fmt"
    with pytest.raises(ValueError, match="needs a name"):
        Reward(lambda c, **kw: c)
    with pytest.raises(ValueError, match="needs a name"):
        Reward(functools.partial(partial_reward))
    with pytest.raises(ValueError, match="weight must be a finite number"):
        Reward(partial_reward, weight=float("nan"))
    with pytest.raises(TypeError, match="must be callable"):
        Reward("format_reward")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rewards=[]), ValueError, "at least one Reward"),
        (dict(rewards=[partial_reward]), TypeError, "wrap functions as Reward"),
        (dict(rewards=[Reward(partial_reward), Reward(partial_reward)]), ValueError, "names must be unique"),
        (dict(group_size=3), ValueError, "4 completions are not whole groups of group_size=3"),
        (dict(prompts=["p"]), ValueError, "1 prompts for 4 completions"),
        (dict(columns={"target": [1, 2]}), ValueError, "column 'target' has 2 values for 4 completions"),
        (dict(columns={"prompts": PROMPTS}), ValueError, "would shadow"),
        (dict(columns={"trainer_state": [1] * 4}), ValueError, "would shadow"),
        (dict(completion_ids=[[1]]), ValueError, "1 completion_ids for 4 completions"),
        (dict(rewards=[Reward(lambda c, **kw: c, name="c")]), ValueError, r"reward .c. needs argument\(s\) \[.c.\]"),
        (dict(on_error="ignore"), ValueError, "on_error must be one of"),
        (dict(timeout_s=0), ValueError, "timeout_s must be > 0"),
    ],
)
def test_arguments_are_checked(kwargs, error, message):
    args = dict(rewards=[Reward(partial_reward)], completions=COMPLETIONS, prompts=PROMPTS, columns={}, group_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        score_completions(**args)


def test_no_warning_when_nothing_fails():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score([Reward(partial_reward)])


def test_docstring_examples_run():
    assert doctest.testmod(runner).failed == 0
