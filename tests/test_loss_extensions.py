"""The loss's additions, hand-worked: step-level token weights, rollout-mismatch corrections,
GSPO's sequence ratio, the entropy bonus, the zero-loss skip rule, and a loop reference of all of
them together with finite differences."""

import math

import pytest
import torch

from minigrpo.algo import group_advantages, grpo_loss, loss_is_zero, loss_metric_names, pooled_std, token_weights
from minigrpo.batching import rollout_seed
from minigrpo.runtime import combine_micro_metrics

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def lp(x):
    return torch.tensor(x, dtype=D, requires_grad=True)


# ------------------------------------------------------------------ step-level token weights
def test_step_weights_of_two_micro_batches_add_up_to_the_one_batch_loss():
    # sequences of lengths 2, 1 | 3 (two micro-batches); the step has S = 3 sequences, K = 6 tokens
    mask_a, mask_b = t([[1, 1, 0], [1, 0, 0]]), t([[1, 1, 1]])
    # grpo: 1 / (S * len_b): [1/6, 1/6 | 1/3 | 1/9 x 3]
    torch.testing.assert_close(token_weights(mask_a, "grpo", None, 3, 6), t([[1 / 6, 1 / 6, 0], [1 / 3, 0, 0]]))
    torch.testing.assert_close(token_weights(mask_b, "grpo", None, 3, 6), t([[1 / 9] * 3]))
    # bnpo: 1 / K = 1/6 for every real token
    torch.testing.assert_close(token_weights(mask_b, "bnpo", None, 3, 6), t([[1 / 6] * 3]))
    # dr_grpo: 1 / (S * max_len) = 1 / 12 with max_len 4
    torch.testing.assert_close(token_weights(mask_a, "dr_grpo", 4, 3, 6), t([[1 / 12, 1 / 12, 0], [1 / 12, 0, 0]]))
    # every sequence's weights sum to 1/S under grpo, whatever micro-batch it is in
    whole = torch.cat([token_weights(mask_a, "grpo", None, 3, 6), token_weights(mask_b, "grpo", None, 3, 6)])
    torch.testing.assert_close(whole.sum(1), t([1 / 3] * 3))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_split_loss_equals_whole_loss_in_value_and_gradient(loss_type):
    g = torch.Generator().manual_seed(3)
    x = (-torch.rand(6, 5, generator=g, dtype=D)).requires_grad_(True)
    old, ref = x.detach() + 0.1 * torch.randn(6, 5, generator=g, dtype=D), x.detach() - 0.2
    adv = torch.randn(6, generator=g, dtype=D)
    mask = (torch.arange(5)[None, :] < t([1, 5, 3, 2, 4, 5])[:, None]).to(D)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=5)
    whole, _ = grpo_loss(x, old, ref, adv, mask, **kw)
    (gw,) = torch.autograd.grad(whole, x)
    s, k = 6, mask.sum().item()
    parts = [grpo_loss(x[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                       weights=token_weights(mask[i:i + 2], loss_type, 5, s, k), **kw)[0] for i in (0, 2, 4)]
    (gp,) = torch.autograd.grad(sum(parts), x)
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(gp, gw, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ rollout correction
def test_token_truncate_weights_each_token_by_the_capped_ratio():
    # on-policy (ratio 1); trainer log-probs [-1.0, -2.0], engine's [-1.5, -1.9]:
    # rho = [e^0.5, e^-0.1] = [1.6487, 0.9048]; cap 1.5 -> c = [1.5, 0.9048]; A = 1, grpo, one sequence
    # loss = -(1.5 + 0.9048) / 2; d loss / d lp_t = -c_t * A / 2
    x = lp([[-1.0, -2.0]])
    loss, m = grpo_loss(x, None, None, t([1.0]), torch.ones(1, 2), beta=0.0, engine_logprobs=t([[-1.5, -1.9]]),
                        rollout_correction="token_truncate", correction_cap=1.5)
    c = [1.5, math.exp(-0.1)]
    assert loss.item() == pytest.approx(-(c[0] + c[1]) / 2, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(x.grad, t([[-c[0] / 2, -c[1] / 2]]), rtol=1e-12, atol=1e-15)
    assert m["rollout_is/ratio_max"] == pytest.approx(math.exp(0.5))
    assert m["rollout_is/truncated_fraction"] == 0.5
    assert m["rollout_is/weight_mean"] == pytest.approx((c[0] + c[1]) / 2)


def test_sequence_mask_drops_a_sequence_whose_ratio_product_leaves_the_band():
    # sequence 1: log rho = [0.3, 0.3] -> product e^0.6 = 1.82 <= cap 2: kept
    # sequence 2: log rho = [0.4, 0.4] -> product e^0.8 = 2.23 > 2: dropped (its policy-gradient term only)
    x = lp([[-1.0, -1.0], [-1.0, -1.0]])
    engine = t([[-1.3, -1.3], [-1.4, -1.4]])
    ref = t([[-1.2, -0.8], [-1.1, -0.9]])
    adv = t([1.0, 1.0])
    loss, m = grpo_loss(x, None, ref, adv, torch.ones(2, 2), beta=0.1, engine_logprobs=engine,
                        rollout_correction="sequence_mask", correction_cap=2.0)
    kl = lambda d: math.exp(d) - d - 1  # noqa: E731
    # pg: only sequence 1: -(1 + 1) / (2 * 2) = -0.5; kl: both sequences, weights 1/4 each token
    want = -0.5 + 0.1 * sum(kl(d) for d in (-0.2, 0.2, -0.1, 0.1)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["rollout_is/masked_fraction"] == 0.5
    assert m["rollout_is/ratio_max"] == pytest.approx(math.exp(0.8))
    loss.backward()
    d = lambda r: -0.1 * (math.exp(r) - 1) / 4  # noqa: E731  d(beta * kl * w) / d lp with kl'(d) = e^d - 1, d = ref - lp
    torch.testing.assert_close(x.grad, t([[-0.25 + d(-0.2), -0.25 + d(0.2)], [d(-0.1), d(0.1)]]), rtol=1e-12, atol=1e-15)


def test_a_correction_needs_the_engine_logprobs():
    with pytest.raises(ValueError, match="engine_logprobs"):
        grpo_loss(lp([[-1.0]]), None, None, t([1.0]), torch.ones(1, 1), beta=0.0, rollout_correction="token_truncate")


# ------------------------------------------------------------------ GSPO
def test_sequence_ratio_is_the_geometric_mean_and_is_clipped_per_sequence():
    # one sequence, lp - old = [0.3, 0.1] -> s = exp(0.2) = 1.2214; A = 1; eps 0.25 -> not clipped
    # loss = -s (the grpo weights of one sequence sum to 1); d loss / d lp_t = -s / 2
    x = lp([[-1.0, -2.0]])
    old = t([[-1.3, -2.1]])
    loss, m = grpo_loss(x, old, None, t([1.0]), torch.ones(1, 2), beta=0.0, eps_low=0.25,
                        importance_sampling_level="sequence")
    s = math.exp(0.2)
    assert loss.item() == pytest.approx(-s, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(x.grad, t([[-s / 2, -s / 2]]), rtol=1e-12, atol=1e-15)
    assert m["ratio_max"] == pytest.approx(s) and m["clip_fraction"] == 0.0
    # eps 0.2: 1.2214 > 1.2 -> clipped: loss -1.2 and no gradient
    x.grad = None
    loss, m = grpo_loss(x, old, None, t([1.0]), torch.ones(1, 2), beta=0.0, eps_low=0.2,
                        importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.2, rel=1e-12) and m["clip_high"] == 1.0
    loss.backward()
    assert torch.all(x.grad == 0)


def test_sequence_and_token_levels_coincide_on_policy_and_differ_off_policy():
    g = torch.Generator().manual_seed(5)
    x = (-torch.rand(3, 4, generator=g, dtype=D)).requires_grad_(True)
    adv, mask = t([1.0, -0.5, 2.0]), torch.ones(3, 4, dtype=D)
    grads = {}
    for level in ("token", "sequence"):
        for name, old in (("on", None), ("off", x.detach() + 0.05 * torch.randn(3, 4, generator=g, dtype=D))):
            loss, _ = grpo_loss(x, old, None, adv, mask, beta=0.0, eps_low=0.5, importance_sampling_level=level)
            grads[level, name] = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(grads["token", "on"], grads["sequence", "on"], rtol=1e-12, atol=1e-15)
    assert (grads["token", "off"] - grads["sequence", "off"]).abs().max() > 1e-3


def test_sequence_level_with_a_length_weighted_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type='grpo'"):
        grpo_loss(lp([[-1.0]]), None, None, t([1.0]), torch.ones(1, 1), beta=0.0, loss_type="bnpo",
                  importance_sampling_level="sequence")


# ------------------------------------------------------------------ entropy
def test_entropy_bonus_is_subtracted_with_the_token_weights():
    # two tokens of one sequence, entropies [2.0, 1.0], coef 0.1, grpo weights 1/2:
    # entropy_loss = -0.1 * (2 + 1) / 2 = -0.15; d loss / d entropy_t = -0.1 / 2
    ent = lp([[2.0, 1.0]])
    loss, m = grpo_loss(t([[-1.0, -1.0]]), None, None, t([0.0]), torch.ones(1, 2), beta=0.0, entropy=ent,
                        entropy_coef=0.1)
    assert loss.item() == pytest.approx(-0.15, rel=1e-12) and m["entropy_loss"] == pytest.approx(-0.15)
    assert m["entropy"] == pytest.approx(1.5)
    loss.backward()
    torch.testing.assert_close(ent.grad, t([[-0.05, -0.05]]))


def test_zero_loss_rule_is_exact_only_without_kl_and_entropy():
    zeros, some = torch.zeros(4), t([0.0, 1.0])
    assert loss_is_zero(zeros, 0.0, 0.0)
    assert not loss_is_zero(some, 0.0, 0.0)
    assert not loss_is_zero(zeros, 0.04, 0.0)  # the KL term has a gradient
    assert not loss_is_zero(zeros, 0.0, 0.01)  # so has the entropy bonus
    # and the loss is indeed exactly 0 with zero advantages, whatever the correction or level
    for kw in ({}, {"rollout_correction": "token_truncate", "engine_logprobs": t([[-0.5, -3.0]])},
               {"importance_sampling_level": "sequence"}):
        x = lp([[-1.0, -2.0]])
        loss, _ = grpo_loss(x, t([[-1.2, -1.7]]), None, t([0.0]), torch.ones(1, 2), beta=0.0, **kw)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(x.grad == 0)


# ------------------------------------------------------------------ loop reference of everything
def reference_loss(x, old, ref, engine, ent, adv, mask, w, beta, eps_low, eps_high, level, correction, cap, coef):
    """Token-by-token python loop of the loss in minigrpo/algo/loss.py's docstring."""
    total = 0.0
    for i in range(len(x)):
        toks = [j for j in range(len(x[i])) if mask[i][j]]
        if level == "sequence":
            s = math.exp(sum(x[i][j] - old[i][j] for j in toks) / max(len(toks), 1))
        log_seq = sum(old[i][j] - engine[i][j] for j in toks)
        for j in toks:
            ratio = s if level == "sequence" else math.exp(x[i][j] - old[i][j])
            surr = min(ratio * adv[i], min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[i])
            if correction == "token_truncate":
                c = min(math.exp(old[i][j] - engine[i][j]), cap)
            elif correction == "sequence_mask":
                c = 1.0 if abs(log_seq) <= math.log(cap) else 0.0
            else:
                c = 1.0
            d = ref[i][j] - x[i][j]
            total += w[i][j] * (-c * surr + beta * (math.exp(d) - d - 1) - coef * ent[i][j])
    return total


@pytest.mark.parametrize("level, correction", [("token", "none"), ("token", "token_truncate"),
                                               ("token", "sequence_mask"), ("sequence", "token_truncate")])
def test_matches_loop_reference_and_finite_differences(level, correction):
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        b, tt = 4, 5
        old = -torch.rand(b, tt, generator=g, dtype=D) * 3
        x = (old + 0.3 * torch.randn(b, tt, generator=g, dtype=D)).requires_grad_(True)
        ref = old + 0.3 * torch.randn(b, tt, generator=g, dtype=D)
        engine = old + 0.3 * torch.randn(b, tt, generator=g, dtype=D)
        ent = torch.rand(b, tt, generator=g, dtype=D).requires_grad_(True)
        adv = torch.randn(b, generator=g, dtype=D)
        mask = (torch.arange(tt)[None, :] < torch.randint(1, tt + 1, (b,), generator=g)[:, None]).to(D)
        w = token_weights(mask, "grpo", None, 7, None)  # as if the step had 7 sequences
        kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, weights=w, importance_sampling_level=level,
                  engine_logprobs=engine, rollout_correction=correction, correction_cap=1.3, entropy_coef=0.02)
        loss, _ = grpo_loss(x, old, ref, adv, mask, entropy=ent, **kw)
        want = reference_loss(x.tolist(), old.tolist(), ref.tolist(), engine.tolist(), ent.tolist(), adv.tolist(),
                              mask.tolist(), w.tolist(), 0.04, 0.2, 0.28, level, correction, 1.3, 0.02)
        assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert torch.autograd.gradcheck(lambda y, e: grpo_loss(y, old, ref, adv, mask, entropy=e, **kw)[0], (x, ent))


# ------------------------------------------------------------------ small things
def test_batch_std_over_ranks_equals_the_std_of_all_rewards():
    a, b = t([1.0, 0.0, 0.0, 1.0]), t([1.0, 1.0, 1.0, 0.0])  # two ranks' rewards, groups of 2
    pooled = pooled_std(8, (a.sum() + b.sum()).item(), ((a * a).sum() + (b * b).sum()).item())
    assert pooled == pytest.approx(torch.cat([a, b]).std().item(), rel=1e-12)
    whole = group_advantages(torch.cat([a, b]), 2, "batch")
    split = torch.cat([group_advantages(a, 2, "batch", batch_std=pooled), group_advantages(b, 2, "batch", batch_std=pooled)])
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-15)
    # each rank's own std would differ: 0.5774 here vs 0.5175 over both
    assert a.std().item() != pytest.approx(pooled, rel=1e-3)


def test_micro_batch_metrics_take_the_max_of_maxima_and_skip_missing():
    out = combine_micro_metrics([{"ratio_max": 1.5, "kl": 0.1, "entropy": 2.0}, {"ratio_max": 3.0, "kl": 0.3}],
                                ("ratio_max", "kl", "entropy", "rollout_is/weight_mean"))
    assert out["ratio_max"] == 3.0 and out["kl"] == pytest.approx(0.2) and out["entropy"] == 2.0
    assert math.isnan(out["rollout_is/weight_mean"])  # reported by no micro-batch, but present on every rank


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_logged_loss_terms_of_micro_batches_add_up_to_the_step_loss(loss_type):
    """Each micro-batch's loss is its share of the step's (step-level weights), so the logged loss
    is their sum over micro-batches (and ranks), divided by num_iterations, never their mean."""
    new, old, ref = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]), t([[-1.1, -1.9, -0.4], [-0.3, -1.0, 0.0]]), t(
        [[-1.2, -2.0, -0.6], [-0.2, -1.1, 0.0]])
    adv, mask = t([0.7, -0.4]), t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=3)
    weights = token_weights(mask, loss_type, 3, 2, 5)  # the step: 2 sequences, 5 tokens
    whole, _ = grpo_loss(new, old, ref, adv, mask, weights=weights, **kw)
    parts = [grpo_loss(new[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1], weights=weights[i:i + 1],
                       **kw)[1] for i in range(2)]
    for per, stats in ((1, parts), (2, parts + parts)):  # num_iterations 2: each micro-batch twice
        out = combine_micro_metrics(stats, ("loss", "pg_loss", "kl"), ("loss", "pg_loss"), per)
        assert out["loss"] == pytest.approx(whole.item(), abs=1e-12) and out["kl"] == pytest.approx(
            (parts[0]["kl"] + parts[1]["kl"]) / 2)
    assert combine_micro_metrics([], ("loss",), ("loss",))["loss"] == 0.0  # only ghosts: an exact 0


def test_loss_metric_names_are_what_the_loss_returns():
    x, mask = lp([[-1.0, -2.0]]), torch.ones(1, 2)
    for corr in ("none", "token_truncate", "sequence_mask"):
        _, m = grpo_loss(x, None, None, t([1.0]), mask, beta=0.0, engine_logprobs=t([[-1.0, -2.0]]),
                         rollout_correction=corr, entropy=t([[1.0, 1.0]]))
        assert set(m) == set(loss_metric_names(corr, entropy=True))


def test_rollout_seed_blocks_never_overlap_across_ranks_steps_and_rounds():
    n, world = 16, 4
    blocks = [range(s, s + n) for step in (1, 2, 3) for rnd in (0, 1) for r in range(world)
              for s in [rollout_seed(42, step, r, world, n, rnd)]]
    seeds = [x for blk in blocks for x in blk]
    assert len(set(seeds)) == len(seeds)  # the old step * 1009 + rank gave ranks r, r + 1 15 of 16 in common
    assert rollout_seed(42, 7, 1, world, n) == rollout_seed(42, 7, 1, world, n)  # the same on resume
    assert max(seeds) < 2**63
