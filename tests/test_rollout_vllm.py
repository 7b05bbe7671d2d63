"""VLLMEngine on the real default model: logprobs, sampling, weight push. One engine per session.

The reference is the trainer's own computation, `minigrpo.scoring.completion_logprobs` on the
fp32 policy with the same weights. vLLM computes with other kernels, so its values agree to about
4e-5 here (fp32, CPU); the tolerance is 1e-3, the default weight-sync tolerance.
"""

import pytest
import torch

from minigrpo.rollout import Probe, Sampling, WeightSyncError
from minigrpo.scoring import completion_logprobs

pytestmark = pytest.mark.slow
ATOL = 1e-3


def _reference(policy, batch, temperature):
    """The policy's log-probs of the batch's completions: [N] ragged lists."""
    with torch.no_grad():
        lp = completion_logprobs(policy, batch.prompt_ids, batch.completion_ids, temperature)  # [N, T]
    return [lp[i, : len(c)] for i, c in enumerate(batch.completion_ids)]


def _max_diff(batch, reference) -> float:
    return max((torch.tensor(got) - ref).abs().max().item() for got, ref in zip(batch.logprobs, reference))


def _probe(policy, token_ids, atol=ATOL) -> Probe:
    with torch.no_grad():
        expected = completion_logprobs(policy, [token_ids[:1]], [token_ids[1:]], 1.0)[0]
    return Probe(tuple(token_ids), tuple(expected.tolist()), atol)


def test_engine_loads_the_converted_folder(vllm_engine, model_path):
    assert vllm_engine.llm.llm_engine.model_config.model == str(model_path)
    assert vllm_engine.shares_policy_weights is False


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(vllm_engine, policy, prompts, temperature):
    batch = vllm_engine.generate(prompts, Sampling(n=2, max_tokens=24, temperature=temperature, seed=3))
    assert _max_diff(batch, _reference(policy, batch, temperature)) < ATOL


def test_groups_are_prompt_major_and_seeded(vllm_engine, prompts):
    sampling = Sampling(n=3, max_tokens=12, temperature=1.0, seed=11)
    a = vllm_engine.generate(prompts, sampling)
    assert len(a) == 6 and a.group_size == 3 and a.num_prompts == 2
    assert a.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert vllm_engine.generate(prompts, sampling).completion_ids == a.completion_ids  # same seed, same batch
    assert len({tuple(c) for c in a.completion_ids}) > 1  # the G samples differ from each other
    other = vllm_engine.generate(prompts, Sampling(n=3, max_tokens=12, temperature=1.0, seed=12))
    assert other.completion_ids != a.completion_ids


def test_seeded_prompts_beyond_one_prefill_step(vllm_engine, prompts):
    """Regression: 32 prompts x 150 tokens (the CPU learning recipe's 4 x 8 Countdown step) exceed
    vLLM's 4096-token step budget. With chunked prefill a seeded request got split over two steps
    and vLLM 0.32 on CPU crashed rewinding its generator ("CPU Generator does not use offset")."""
    long_prompt = (prompts[1] * 12)[:150]
    batch_prompts = [long_prompt[i:] + long_prompt[:i] for i in range(32)]  # 32 distinct prompts
    sampling = Sampling(n=2, max_tokens=4, temperature=1.0, seed=5)
    a = vllm_engine.generate(batch_prompts, sampling)
    assert len(a) == 64 and sum(len(p) for p in batch_prompts) == 32 * 150 > 4096
    assert vllm_engine.generate(batch_prompts, sampling).completion_ids == a.completion_ids


def test_length_and_stop(vllm_engine, tokenizer, prompts):
    count = [prompts[1]]  # "Count from 1 to 20, separated by commas." -> greedy "1. 1\n2. 2\n..."
    short = vllm_engine.generate(count, Sampling(n=2, max_tokens=3, temperature=0.0))
    assert short.finish_reasons == ["length"] * 2 and [len(c) for c in short.completion_ids] == [3, 3]

    greedy = vllm_engine.generate(count, Sampling(n=1, max_tokens=8, temperature=0.0)).texts[0]
    assert greedy.startswith("1. 1"), greedy
    cut = vllm_engine.generate(count, Sampling(n=1, max_tokens=40, temperature=0.0, stop=(". ",)))
    # the text ends with the stop string, the tokens end with the token that completed it
    assert cut.finish_reasons == ["stop"] and cut.texts[0] == "1. "
    assert tokenizer.decode(cut.completion_ids[0]).startswith("1. ")

    first = short.completion_ids[0][0]
    by_id = vllm_engine.generate(count, Sampling(n=1, max_tokens=40, temperature=0.0, stop_token_ids=(first,)))
    assert by_id.finish_reasons == ["stop"] and by_id.completion_ids == [[first]]


def test_score_matches_transformers(vllm_engine, policy, prompts):
    seq = prompts[0]
    probe = _probe(policy, seq)
    got = torch.tensor(vllm_engine.score([seq])[0])
    assert (got - torch.tensor(probe.expected)).abs().max().item() < ATOL


def test_weight_push_follows_and_restores(vllm_engine, policy, prompts):
    greedy = Sampling(n=1, max_tokens=24, temperature=0.0)
    before = vllm_engine.generate(prompts, greedy)
    original = {name: p.detach().clone() for name, p in policy.named_parameters()}
    probe_seq = prompts[0] + before.completion_ids[0]
    try:
        with torch.no_grad():  # change every kind of tensor: embeddings (tied to lm_head), fused qkv and gate/up, norms
            g = torch.Generator().manual_seed(0)
            params = dict(policy.named_parameters())
            params["model.embed_tokens.weight"].mul_(1.1)
            for name in ("model.layers.3.self_attn.k_proj.weight", "model.layers.7.mlp.up_proj.weight",
                         "model.layers.10.self_attn.o_proj.weight"):
                params[name].add_(torch.randn(params[name].shape, generator=g) * 0.05)
            params["model.norm.weight"].mul_(0.8)
        new_probe = _probe(policy, probe_seq)
        with pytest.raises(WeightSyncError):  # a push that did not take: nothing was loaded
            vllm_engine.push_weights(iter(()), new_probe)
        # 1 MB chunks: many pushes per layer, so chunk boundaries fall inside fused q/k/v and gate/up
        vllm_engine.push_chunk_bytes = 2**20
        vllm_engine.push_weights(policy.named_parameters(), new_probe)
        after = vllm_engine.generate(prompts, greedy)
        assert _max_diff(after, _reference(policy, after, 1.0)) < ATOL  # follows the new weights
        assert after.logprobs[0][0] != pytest.approx(before.logprobs[0][0], abs=0.05)  # and they are new
    finally:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                p.copy_(original[name])
        vllm_engine.push_chunk_bytes = 256 * 2**20
    old_probe = _probe(policy, probe_seq)
    with pytest.raises(WeightSyncError):  # the engine still has the new weights, the probe the old
        vllm_engine.verify(old_probe)
    vllm_engine.push_weights(policy.named_parameters(), old_probe)
    restored = vllm_engine.generate(prompts, greedy)
    assert restored.completion_ids == before.completion_ids and restored.logprobs == before.logprobs


def test_exact_check_catches_a_skipped_tensor_a_one_ulp_change_and_a_stale_packed_head(vllm_engine, policy, prompts, monkeypatch):
    """Each push is compared exactly with the engine's weights (integer sums of their bits), so a
    loader that skips one tensor, or changes one element by one ulp, is a WeightSyncError, where the
    probe's log-probs move by far less than any tolerance. The tied LM head's packed copy (vLLM-CPU
    packs it once for its matmul) is checked too: the stale copy only the probe used to catch."""
    from minigrpo.rollout import vllm_engine as module

    name = "model.layers.5.self_attn.k_proj.weight"
    load, finish = module._load_chunk, module._finish_reload
    original = {n: p.detach().clone() for n, p in policy.named_parameters()}

    def skip_one(worker, chunk):
        return load(worker, [(n, t) for n, t in chunk if n != name])

    def one_ulp(worker, chunk):
        changed = []
        for n, t in chunk:
            if n == name:
                t = t.clone()
                t.view(-1)[7] = torch.nextafter(t.view(-1)[7], torch.tensor(float("inf")))
            changed.append((n, t))
        return load(worker, changed)

    def no_repack(worker):  # _finish_reload without its re-pack of the tied head
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(worker.model_runner.get_model(), worker.model_config)

    try:
        with torch.no_grad():  # new weights, so that a tensor left out keeps a different old value
            g = torch.Generator().manual_seed(1)
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        for fault, where in ((skip_one, "qkv_proj"), (one_ulp, "model.layers.5.self_attn.qkv_proj.weight")):
            monkeypatch.setattr(module, "_load_chunk", fault)
            with pytest.raises(WeightSyncError, match=where):
                vllm_engine.push_weights(policy.named_parameters(), None)
        # the engine now differs from the policy by one ulp in one element: the probe cannot tell
        probe = _probe(policy, prompts[0])
        got = torch.tensor(vllm_engine.score([list(probe.token_ids)])[0])
        assert (got - torch.tensor(probe.expected)).abs().max().item() < 1e-4

        monkeypatch.setattr(module, "_load_chunk", load)
        monkeypatch.setattr(module, "_finish_reload", no_repack)
        with torch.no_grad():
            policy.model.embed_tokens.weight.mul_(1.01)
        with pytest.raises(WeightSyncError, match=r"lm_head \(packed copy of model.embed_tokens.weight\)"):
            vllm_engine.push_weights(policy.named_parameters(), None)
    finally:
        monkeypatch.setattr(module, "_load_chunk", load)
        monkeypatch.setattr(module, "_finish_reload", finish)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                p.copy_(original[n])
        vllm_engine.push_weights(policy.named_parameters(), _probe(policy, prompts[0]))  # back in sync, verified
    assert vllm_engine.last_checksum_seconds < vllm_engine.last_push_seconds / 2
