"""grpo_loss against hand-worked cases, a per-token loop reference, and finite differences."""

import math

import pytest
import torch

from minigrpo.algo import grpo_loss

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def lp(x):
    return torch.tensor(x, dtype=D, requires_grad=True)


def test_ratio_leaves_clip_range_on_each_side_positive_advantage():
    # old = 0, logprobs = [log 1.5, log 0.5] -> ratio [1.5, 0.5]; A = +1, eps = 0.2, beta = 0
    # token 1: min(1.5, clip(1.5)=1.2) = 1.2   (clipped high: no gradient)
    # token 2: min(0.5, clip(0.5)=0.8) = 0.5   (for A > 0 the low side never clips)
    # grpo loss = -(1.2 + 0.5) / 2 = -0.85
    # d loss / d logprobs: token 1: 0; token 2: -ratio * A / 2 = -0.25
    x = lp([[math.log(1.5), math.log(0.5)]])
    loss, m = grpo_loss(x, t([[0.0, 0.0]]), None, t([1.0]), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(-0.85, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(x.grad, t([[0.0, -0.25]]), rtol=1e-12, atol=1e-15)
    assert (m["clip_high"], m["clip_low"], m["clip_fraction"]) == (0.5, 0.0, 0.5)
    assert m["ratio_mean"] == pytest.approx(1.0)  # (1.5 + 0.5) / 2
    assert m["ratio_max"] == pytest.approx(1.5)


def test_ratio_leaves_clip_range_on_each_side_negative_advantage():
    # same ratios, A = -1:
    # token 1: min(-1.5, -1.2) = -1.5 (not clipped: gradient -(ratio * A) / 2 = +0.75)
    # token 2: min(-0.5, -0.8) = -0.8 (clipped low: no gradient)
    # loss = -(-1.5 - 0.8) / 2 = 1.15
    x = lp([[math.log(1.5), math.log(0.5)]])
    loss, m = grpo_loss(x, t([[0.0, 0.0]]), None, t([-1.0]), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(1.15, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(x.grad, t([[0.75, 0.0]]), rtol=1e-12, atol=1e-15)
    assert (m["clip_low"], m["clip_high"]) == (0.5, 0.0)


def test_clip_higher_widens_only_the_upper_side():
    # eps_low 0.2, eps_high 0.28, ratio 1.25, A = +1: 1.25 < 1.28 so not clipped -> loss -1.25
    x = lp([[math.log(1.25)]])
    loss, m = grpo_loss(x, t([[0.0]]), None, t([1.0]), torch.ones(1, 1), beta=0, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25, rel=1e-12)
    assert m["clip_high"] == 0.0
    # with symmetric eps 0.2 it is clipped to 1.2
    loss, m = grpo_loss(x, t([[0.0]]), None, t([1.0]), torch.ones(1, 1), beta=0)
    assert loss.item() == pytest.approx(-1.2, rel=1e-12)
    assert m["clip_high"] == 1.0


def test_kl_is_exactly_zero_when_reference_equals_policy():
    x = lp([[-0.3, -2.0, -1.1]])
    loss_kl, m = grpo_loss(x, None, x.detach().clone(), t([0.7]), torch.ones(1, 3), beta=1.0)
    loss_no, _ = grpo_loss(x, None, None, t([0.7]), torch.ones(1, 3), beta=0.0)
    assert m["kl"] == 0.0 and m["kl_loss"] == 0.0
    assert loss_kl.item() == loss_no.item()


def test_kl_value_and_gradient_by_hand():
    # ref - logprobs = d = log 2 -> k3 = e^d - d - 1 = 2 - ln 2 - 1 = 0.306853
    # A = 0 so only the KL term is left: loss = beta * kl = 0.5 * 0.306853
    # d kl / d logprobs = -(e^d - 1) = -1 -> grad = beta * (-1) = -0.5
    x = lp([[-1.0]])
    loss, m = grpo_loss(x, None, t([[-1.0 + math.log(2)]]), t([0.0]), torch.ones(1, 1), beta=0.5)
    assert m["kl"] == pytest.approx(1 - math.log(2), rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)), rel=1e-12)
    assert m["pg_loss"] == 0.0 and m["kl_loss"] == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    assert x.grad.item() == pytest.approx(-0.5, rel=1e-12)


def test_kl_is_nonnegative_on_random_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=g, dtype=D)
    ref = torch.randn(6, 9, generator=g, dtype=D)
    _, m = grpo_loss(x, None, ref, torch.zeros(6, dtype=D), torch.ones(6, 9), beta=0.1)
    assert m["kl"] > 0


# Two sequences of lengths 3 and 1, on-policy (ratio 1), beta 0, advantages [1, -1]:
# per-token loss = -A -> sequence 1: [-1, -1, -1], sequence 2: [+1].
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
ADV = t([1.0, -1.0])


@pytest.mark.parametrize(
    "loss_type, expected, grad",
    [
        # grpo: mean over sequences of per-sequence means = (-1 + 1) / 2 = 0
        #   grad = -A / (B * len_b): seq 1 -> -1/6 per token, seq 2 -> +1/2
        ("grpo", 0.0, [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.0, 0.0]]),
        # bnpo: one token mean = (-3 + 1) / 4 = -0.5; grad = -A / 4
        ("bnpo", -0.5, [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]]),
        # dr_grpo with max_completion_length 4: (-3 + 1) / (2 * 4) = -0.25; grad = -A / 8
        ("dr_grpo", -0.25, [[-0.125, -0.125, -0.125], [0.125, 0.0, 0.0]]),
    ],
)
def test_loss_types_differ_only_in_the_denominator(loss_type, expected, grad):
    x = lp([[-1.0, -2.0, -0.5], [-0.2, -9.0, -9.0]])
    loss, _ = grpo_loss(x, None, None, ADV, MASK, beta=0.0, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(x.grad, t(grad), rtol=1e-12, atol=1e-15)


def test_on_policy_ratio_is_one_but_gradient_flows():
    x = lp([[-0.5, -1.5]])
    loss, m = grpo_loss(x, None, None, t([2.0]), torch.ones(1, 2), beta=0.0)
    assert m["ratio_mean"] == 1.0 and m["clip_fraction"] == 0.0
    assert loss.item() == pytest.approx(-2.0)  # -(1 * 2 + 1 * 2) / 2
    loss.backward()
    torch.testing.assert_close(x.grad, t([[-1.0, -1.0]]))  # -A * ratio / len = -2 / 2


def test_empty_completion_counts_in_the_mean_but_adds_nothing():
    # grpo: sequence 2 has no tokens -> contributes 0, but B = 2: loss = (-1 + 0) / 2
    x = lp([[-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, m = grpo_loss(x, None, None, t([1.0, 5.0]), mask, beta=0.0)
    assert loss.item() == pytest.approx(-0.5)
    assert math.isfinite(m["ratio_max"])


def test_beta_zero_needs_no_reference_and_beta_positive_does():
    x = lp([[-1.0]])
    grpo_loss(x, None, None, t([1.0]), torch.ones(1, 1), beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(x, None, None, t([1.0]), torch.ones(1, 1), beta=0.04)


def test_dr_grpo_requires_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp([[-1.0]]), None, None, t([1.0]), torch.ones(1, 1), beta=0.0, loss_type="dr_grpo")


def test_shape_errors_name_the_shapes():
    x = lp([[-1.0, -1.0]])
    with pytest.raises(ValueError, match=r"mask has shape \(1, 3\)"):
        grpo_loss(x, None, None, t([1.0]), torch.ones(1, 3), beta=0.0)
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\)"):
        grpo_loss(x, None, None, t([1.0, 2.0]), torch.ones(1, 2), beta=0.0)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 2\)"):
        grpo_loss(x, torch.zeros(2, 2, dtype=D), None, t([1.0]), torch.ones(1, 2), beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(x, None, None, t([1.0]), torch.ones(1, 2), beta=0.0, loss_type="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_input_dtype(dtype):
    x = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    loss, _ = grpo_loss(x, x.detach(), x.detach(), torch.ones(2, dtype=dtype), torch.ones(2, 3))
    assert loss.dtype == dtype


def reference_loss(x, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len):
    """Token-by-token python loop of the formulas in the issue: the oracle for the vectorized loss."""
    b, tt = len(x), len(x[0])
    total, seq_means, n_tok = 0.0, [], 0
    for i in range(b):
        s, n = 0.0, 0
        for j in range(tt):
            if not mask[i][j]:
                continue
            ratio = math.exp(x[i][j] - old[i][j])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            surr = min(ratio * adv[i], clipped * adv[i])
            d = ref[i][j] - x[i][j]
            kl = math.exp(d) - d - 1
            s += -(surr - beta * kl)
            n += 1
        total += s
        n_tok += n
        seq_means.append(s / max(n, 1))
    if loss_type == "grpo":
        return sum(seq_means) / b
    if loss_type == "bnpo":
        return total / max(n_tok, 1)
    return total / (b * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_matches_loop_reference_and_finite_differences(loss_type):
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        b, tt = 4, 6
        old = -torch.rand(b, tt, generator=g, dtype=D) * 3
        x = (old + 0.4 * torch.randn(b, tt, generator=g, dtype=D)).requires_grad_(True)  # ratios both sides
        ref = old + 0.3 * torch.randn(b, tt, generator=g, dtype=D)
        adv = torch.randn(b, generator=g, dtype=D)
        lengths = torch.randint(1, tt + 1, (b,), generator=g)
        mask = torch.arange(tt)[None, :] < lengths[:, None]
        kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, loss_type=loss_type, max_completion_length=8)
        loss, _ = grpo_loss(x, old, ref, adv, mask, **kw)
        want = reference_loss(
            x.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
            0.04, 0.2, 0.28, loss_type, 8,
        )
        assert loss.item() == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert torch.autograd.gradcheck(lambda y: grpo_loss(y, old, ref, adv, mask, **kw)[0], (x,))
