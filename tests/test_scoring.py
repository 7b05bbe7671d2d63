"""completion_logprobs (hidden states at completion positions only, chunked LM head) against a
plain full forward + log_softmax over the whole padded batch."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigrpo.scoring import completion_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
COMPLETIONS = [[20, 21], [22, 23, 24, 25], []]  # ragged, one empty


def naive(model, temperature):
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        logits = model(torch.tensor([p + c])).logits[0]  # [L, V], one unpadded sequence
        lp = torch.log_softmax(logits / temperature, -1)
        out.append([lp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
    return out


@pytest.mark.parametrize("temperature, chunk", [(1.0, 4096), (0.7, 2), (1.3, 1)])
def test_matches_full_forward(model, temperature, chunk):
    got = completion_logprobs(model, PROMPTS, COMPLETIONS, temperature, chunk_tokens=chunk)
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
