"""completion_logprobs (hidden states at completion positions only, chunked LM head) against a
plain full forward + log_softmax over the whole padded batch."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigrpo.scoring import completion_logprobs


def _rms_norm_in_input_dtype(self, x):
    # transformers' LlamaRMSNorm computes in float32 even in a float64 model, which limits any
    # float64 comparison to float32 rounding (~3e-8 relative where two paths sum gradients in a
    # different order); the test model keeps float64 throughout so the tolerances can be 1e-9.
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(scope="module")
def model():
    from transformers.models.llama import modeling_llama

    mp = pytest.MonkeyPatch()
    mp.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    yield _tiny_llama()
    mp.undo()


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def test_float32_norms_are_why_the_model_fixture_patches_them():
    # the unpatched model: shared and plain paths agree only to float32 rounding
    m = _tiny_llama()
    w = torch.randn(6, 4, dtype=torch.float64)
    g = []
    for share in (True, False):
        m.zero_grad()
        (completion_logprobs(m, G_PROMPTS, G_COMPLETIONS, share_prompts=share) * w).sum().backward()
        g.append(m.model.embed_tokens.weight.grad.clone())
    rel = (g[0] - g[1]).abs().max() / g[1].abs().max()
    assert 1e-12 < rel < 1e-6


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
COMPLETIONS = [[20, 21], [22, 23, 24, 25], []]  # ragged, one empty


def naive(model, temperature):
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        logits = model(torch.tensor([p + c])).logits[0]  # [L, V], one unpadded sequence
        lp = torch.log_softmax(logits / temperature, -1)
        out.append([lp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
    return out


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("temperature, chunk", [(1.0, 4096), (0.7, 2), (1.3, 1)])
def test_matches_full_forward(model, temperature, chunk, share):
    got = completion_logprobs(model, PROMPTS, COMPLETIONS, temperature, chunk_tokens=chunk, share_prompts=share)
    assert got.shape == (3, 4)
    want = naive(model, temperature)
    for i, row in enumerate(want):
        torch.testing.assert_close(got[i, : len(row)], torch.stack(row) if row else got[i, :0], rtol=1e-10, atol=1e-12)
        assert torch.all(got[i, len(row):] == 0)  # padding is exactly 0


def test_gradients_match_full_forward(model):
    w = torch.randn(3, 4, dtype=torch.float64)
    model.zero_grad()
    (completion_logprobs(model, PROMPTS, COMPLETIONS, 0.9, chunk_tokens=3) * w).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(w[i, t] * v for i, row in enumerate(naive(model, 0.9)) for t, v in enumerate(row)).backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty prompt"):
        completion_logprobs(model, [[]], [[1]])


# Two groups of 3 completions sharing their prompt (prompt-major, as the trainer passes them),
# prompts of different lengths, completions ragged (one empty, one a single token).
G_PROMPTS = [[5, 6, 7]] * 3 + [[9, 10, 11, 12, 13]] * 3
G_COMPLETIONS = [[20, 21, 22], [23], [], [24, 25, 26, 27], [28, 29], [30]]


def test_shared_prompt_values_and_gradients_equal_the_plain_path(model):
    w = torch.randn(6, 4, dtype=torch.float64)
    grads = []
    for share in (True, False):
        model.zero_grad()
        lp = completion_logprobs(model, G_PROMPTS, G_COMPLETIONS, 0.8, chunk_tokens=5, share_prompts=share)
        (lp * w).sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared, g_shared), (plain, g_plain) = grads
    torch.testing.assert_close(shared, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_shared_prompt_loss_and_gradients_equal_through_grpo_loss(model):
    # the trick must give the same GRPO loss and parameter gradients, not only the same log-probs
    from minigrpo.algo import grpo_loss

    adv = torch.tensor([1.0, -0.5, 0.0, 0.7, -1.2, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1] * len(c) + [0] * (4 - len(c)) for c in G_COMPLETIONS], dtype=torch.bool)
    ref = completion_logprobs(model, G_PROMPTS, G_COMPLETIONS, share_prompts=False).detach() - 0.1
    results = []
    for share in (True, False):
        model.zero_grad()
        lp = completion_logprobs(model, G_PROMPTS, G_COMPLETIONS, share_prompts=share)
        loss, _ = grpo_loss(lp, None, ref, adv, mask, beta=0.04)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_shared_prompts_under_gradient_checkpointing_recompute_and_match_the_plain_path(model):
    """Gradient checkpointing on, policy in train mode (as the trainer has it): the shared-prompt path
    still shares (the prompt runs once), the decoder layers really are recomputed in backward, and
    values and gradients equal the plain path without checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer0 = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = []
    hook = layer0.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[:2] if args else kwargs["hidden_states"].shape[:2]), with_kwargs=True)
    w = torch.randn(6, 4, dtype=torch.float64)
    results = []
    try:
        for checkpointing in (True, False):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            model.zero_grad()
            calls.clear()
            lp = completion_logprobs(model, G_PROMPTS, G_COMPLETIONS, 0.8, share_prompts=True)
            (lp * w).sum().backward()
            results.append((lp.detach(), [p.grad.clone() for p in model.parameters()], list(calls)))
            model.gradient_checkpointing_disable()
            model.eval()
    finally:
        hook.remove()
        model.gradient_checkpointing_disable()
        model.eval()
    (ck, g_ck, calls_ck), (plain, g_plain, calls_plain) = results
    # layer 0 sees: the 2 unique prompts [2, 5] once, the 6 completions [6, 3], and with
    # checkpointing the completions again in backward (the prompt pass is not checkpointed)
    assert calls_plain == [torch.Size([2, 5]), torch.Size([6, 3])], calls_plain
    assert calls_ck == [torch.Size([2, 5]), torch.Size([6, 3]), torch.Size([6, 3])], calls_ck
    torch.testing.assert_close(ck, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ck, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_chunked_head_values_and_gradients_equal_autograd_through_the_plain_formula():
    # the hand-written backward of the chunked LM head (with a bias, chunks of 3 rows over 7, one
    # short) against autograd through log_softmax((h W^T + b) / T)[id], in float64
    from minigrpo.scoring import head_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=True).double()
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    got = head_logprobs(head, h, ids, temperature=0.7, chunk_tokens=3)
    (got * upstream).sum().backward()

    w, b = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    h2 = h.detach().clone().requires_grad_()
    want = torch.log_softmax((h2 @ w.t() + b) / 0.7, -1).gather(1, ids[:, None]).squeeze(1)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.bias.grad, b.grad, rtol=1e-10, atol=1e-12)


def naive_entropy(model, temperature):
    """Entropy of softmax(logits / T) at each completion position, from a full forward of each sequence."""
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        logits = model(torch.tensor([p + c])).logits[0] / temperature  # [L, V]
        probs = torch.softmax(logits, -1)
        h = -(probs * torch.log_softmax(logits, -1)).sum(-1)  # [L]
        out.append([h[len(p) - 1 + t] for t in range(len(c))])
    return out


def test_entropy_and_its_gradient_from_the_chunked_head_match_a_full_forward(model):
    """H = -sum p log p of the tempered distribution, and d(sum w_lp * lp + w_h * H) for every
    parameter, from chunks of 3 rows (the backward's dH/dz = -p (z - E_p z) against autograd)."""
    w_lp, w_h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    model.zero_grad()
    lp, ent = completion_logprobs(model, PROMPTS, COMPLETIONS, 0.7, chunk_tokens=3, with_entropy=True)
    ((lp * w_lp).sum() + (ent * w_h).sum()).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want_lp, want_h = naive(model, 0.7), naive_entropy(model, 0.7)
    for i, row in enumerate(want_h):
        torch.testing.assert_close(ent[i, : len(row)], torch.stack(row) if row else ent[i, :0], rtol=1e-10, atol=1e-12)
        assert torch.all(ent[i, len(row):] == 0)
    total = sum(w_lp[i, t] * v for i, row in enumerate(want_lp) for t, v in enumerate(row))
    total = total + sum(w_h[i, t] * v for i, row in enumerate(want_h) for t, v in enumerate(row))
    total.backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_entropy_of_a_uniform_head_is_log_v():
    """A head of zeros gives the uniform distribution over V = 50 tokens: H = log 50 at every position."""
    from minigrpo.scoring import head_logprobs

    head = torch.nn.Linear(4, 50, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    lp, ent = head_logprobs(head, torch.randn(5, 4, dtype=torch.float64), torch.arange(5), 1.3, 2, with_entropy=True)
    torch.testing.assert_close(ent, torch.full((5,), torch.log(torch.tensor(50.0, dtype=torch.float64)).item(),
                                               dtype=torch.float64))
    torch.testing.assert_close(lp, -ent)


@pytest.mark.parametrize("completions", [[[7], [8]], [[], [9]], [[], []]], ids=["one-token", "empty+one", "all-empty"])
def test_every_pass_runs_whatever_the_lengths_and_values_match(model, completions):
    """Under ZeRO-3 each forward gathers parameters collectively, so the passes must not depend on
    the data: a batch whose completions have at most one token still runs the completion pass (over
    padding, sliced off) and the LM head (for 0 tokens too); the values equal the plain path's."""
    import minigrpo.scoring as scoring

    calls = []
    real_head, real_base = scoring.head_logprobs, model.base_model.forward
    scoring.head_logprobs = lambda *a, **k: calls.append("head") or real_head(*a, **k)
    model.base_model.forward = lambda *a, **k: calls.append("base") or real_base(*a, **k)
    try:
        shared = completion_logprobs(model, [[1, 2], [1, 2]], completions, share_prompts=True)
    finally:
        scoring.head_logprobs, model.base_model.forward = real_head, real_base
    assert calls == ["base", "base", "head"]  # prompt pass, completion pass, head
    plain = completion_logprobs(model, [[1, 2], [1, 2]], completions, share_prompts=False)
    torch.testing.assert_close(shared, plain, rtol=1e-10, atol=1e-12)
    assert shared.shape == (2, max(len(c) for c in completions))
