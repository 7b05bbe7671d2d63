"""TorchEngine: exact on a tiny float64 Llama (fast), close on the real default model (slow).

In float64 the KV-cached sampling loop and the trainer's one-pass forward agree to 1e-12, which
pins the algorithm (padding, positions, cache copies, temperature). In float32 they differ only
by rounding: on SmolLM2-135M a KV-cached step and a full forward disagree by up to ~2e-5 in the
log-probability of a sampled token (two full forwards with different padding already differ by
~5e-6), so the real-model test uses 5e-5.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigrpo.rollout import Probe, Sampling, TorchEngine, WeightSyncError
from minigrpo.scoring import completion_logprobs


class CharTokenizer:
    """Token 0 = pad, 1 = EOS, token k >= 2 decodes to the letter chr(ord('a') + k - 2)."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 2) for i in ids if i >= 2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config).double().train()
    return TorchEngine(model, CharTokenizer())


PROMPTS = [[2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]  # different lengths: left padding is exercised


def _reference(model, batch, temperature):
    with torch.no_grad():
        lp = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, temperature)  # [N, T]
    return [lp[i, : len(c)] for i, c in enumerate(batch.completion_ids)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_trainers_exactly(tiny, temperature):
    batch = tiny.generate(PROMPTS, Sampling(n=4, max_tokens=10, temperature=temperature, seed=0))
    for got, ref in zip(batch.logprobs, _reference(tiny.model, batch, temperature)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ref, rtol=0, atol=1e-12)


def test_groups_seed_and_padding(tiny):
    sampling = Sampling(n=3, max_tokens=8, temperature=1.0, seed=5)
    a = tiny.generate(PROMPTS, sampling)
    assert a.prompt_ids == [p for p in PROMPTS for _ in range(3)] and a.group_size == 3
    assert tiny.generate(PROMPTS, sampling).completion_ids == a.completion_ids
    assert tiny.generate(PROMPTS, Sampling(n=3, max_tokens=8, temperature=1.0, seed=6)).completion_ids != a.completion_ids
    # a left-padded batch gives each prompt what it gets alone (greedy)
    greedy = Sampling(n=1, max_tokens=8, temperature=0.0)
    together = tiny.generate(PROMPTS, greedy).completion_ids
    assert together == [tiny.generate([p], greedy).completion_ids[0] for p in PROMPTS]


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    greedy = tiny.generate(PROMPTS, Sampling(n=1, max_tokens=8, temperature=0.0)).completion_ids
    assert tiny.generate(PROMPTS, Sampling(n=1, max_tokens=8, top_k=1, seed=1)).completion_ids == greedy
    assert tiny.generate(PROMPTS, Sampling(n=1, max_tokens=8, top_p=1e-6, seed=1)).completion_ids == greedy


def test_stop_strings_and_lengths(tiny):
    free = tiny.generate(PROMPTS, Sampling(n=2, max_tokens=12, temperature=1.0, seed=2, stop_token_ids=(0, 1)))
    i = max(range(len(free)), key=lambda k: len(free.texts[k]))
    text = free.texts[i]
    stop = text[2:4]  # a two-letter string the seeded sample produces
    cut = tiny.generate(PROMPTS, Sampling(n=2, max_tokens=12, temperature=1.0, seed=2, stop_token_ids=(0, 1), stop=(stop,)))
    end = text.index(stop) + len(stop)
    assert cut.finish_reasons[i] == "stop" and cut.texts[i] == text[:end]
    assert cut.completion_ids[i] == free.completion_ids[i][:end]  # one letter per token here
    short = tiny.generate(PROMPTS, Sampling(n=1, max_tokens=3, temperature=0.0))
    assert all(r == "length" and len(c) == 3 for r, c in zip(short.finish_reasons, short.completion_ids) if 1 not in c)


def test_eval_during_generation_and_train_mode_restored(tiny):
    seen = []
    hook = tiny.model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        tiny.model.train()
        tiny.generate(PROMPTS[:1], Sampling(n=1, max_tokens=3))
        assert seen and not any(seen) and tiny.model.training
        tiny.model.eval()
        tiny.generate(PROMPTS[:1], Sampling(n=1, max_tokens=3))
        assert not tiny.model.training
    finally:
        hook.remove()
        tiny.model.train()


def test_push_weights_only_checks_the_probe(tiny):
    assert tiny.shares_policy_weights
    tokens = [2, 3, 4, 5]
    expected = tuple(tiny.score([tokens])[0])
    tiny.push_weights(iter(()), None)
    tiny.push_weights(iter(()), Probe(tuple(tokens), expected, 1e-9))
    with pytest.raises(WeightSyncError):
        tiny.push_weights(iter(()), Probe(tuple(tokens), tuple(x + 0.01 for x in expected), 1e-3))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_real_model_logprobs_match_the_trainer(policy, tokenizer, prompts, temperature):
    engine = TorchEngine(policy, tokenizer)
    batch = engine.generate(prompts, Sampling(n=2, max_tokens=16, temperature=temperature, seed=0))
    diff = max((torch.tensor(g) - r).abs().max().item() for g, r in zip(batch.logprobs, _reference(policy, batch, temperature)))
    assert diff < 5e-5
