"""group_advantages against hand-worked values and a loop reference."""

import math

import pytest
import torch

from minigrpo.algo import group_advantages


def test_one_group_hand_computed():
    # rewards [1, 0, 0, 1]: mean 0.5, deviations +-0.5,
    # unbiased variance = 4 * 0.25 / (4 - 1) = 1/3, std = sqrt(1/3) = 0.57735...
    # advantage = +-0.5 / (sqrt(1/3) + 1e-4)
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 4)
    x = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.865875...
    torch.testing.assert_close(a, torch.tensor([x, -x, -x, x], dtype=torch.float64), rtol=1e-12, atol=0)


def test_population_std_is_not_used():
    # The population std (divide by G) would give 0.5 / (0.5 + 1e-4) = 0.9998; we pin Bessel's.
    a = group_advantages(torch.tensor([1.0, 0.0]), 2)
    # two rewards 1, 0: unbiased std = sqrt(0.5) = 0.70711; 0.5 / 0.70721 = 0.70700
    assert a[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4), rel=1e-6)


def test_groups_are_independent_and_prompt_major():
    # group 1: [2, 4] -> mean 3, std sqrt(2); group 2: [10, 10, ...] never mixes with group 1.
    a = group_advantages(torch.tensor([2.0, 4.0, 10.0, 10.0], dtype=torch.float64), 2)
    x = 1.0 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(a, torch.tensor([-x, x, 0.0, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)


def test_all_equal_group_is_exactly_zero_not_nan():
    # 0.1 * 3 / 3 != 0.1 in floating point; the residue must not be divided by eps into noise.
    a = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5]), 3)
    assert torch.equal(a[:3], torch.zeros(3))
    assert torch.isfinite(a).all()
    a = group_advantages(torch.zeros(8), 4)
    assert torch.equal(a, torch.zeros(8))


def test_scale_none_is_dr_grpo_centering_only():
    # [1, 0, 0, 1] - 0.5, no std, no eps
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale="none")
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_scale_batch_uses_group_mean_and_batch_std():
    # rewards [1, 0 | 3, 3], G=2: group means 0.5 and 3 -> centred [0.5, -0.5, 0, 0]
    # batch mean 1.75; squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75;
    # unbiased variance 6.75 / 3 = 2.25 -> std 1.5 -> advantages [0.5, -0.5, 0, 0] / 1.5001
    a = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=torch.float64), 2, scale="batch")
    x = 0.5 / 1.5001
    torch.testing.assert_close(a, torch.tensor([x, -x, 0.0, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)


def test_matches_loop_reference_on_random_rewards():
    g = torch.Generator().manual_seed(0)
    for scale in ("group", "batch", "none"):
        for group_size in (2, 3, 8):
            r = torch.randint(0, 3, (5 * group_size,), generator=g).double() / 2
            got = group_advantages(r, group_size, scale=scale, eps=1e-4)
            want = []
            vals = r.tolist()
            n = len(vals)
            bmean = sum(vals) / n
            bstd = math.sqrt(sum((v - bmean) ** 2 for v in vals) / (n - 1))
            for i in range(0, n, group_size):
                grp = vals[i : i + group_size]
                mean = sum(grp) / group_size
                std = math.sqrt(sum((v - mean) ** 2 for v in grp) / (group_size - 1))
                for v in grp:
                    c = 0.0 if max(grp) == min(grp) else v - mean
                    want.append(c if scale == "none" else c / ((std if scale == "group" else bstd) + 1e-4))
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_keeps_dtype():
    assert group_advantages(torch.tensor([1.0, 0.0]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"7 rewards .* group.* 4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="at least|>= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match=r"1-D"):
        group_advantages(torch.zeros(2, 2), 2)
