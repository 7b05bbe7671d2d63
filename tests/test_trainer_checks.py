"""Mistakes in what is passed to train() fail in one clear line before any heavy work, and
beta=0 never loads a reference model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

import minigrpo.startup as startup  # where train() loads models and starts processes
from minigrpo import Config, train
from minigrpo.rewards import equation_reward, format_reward

ROOT = Path(__file__).resolve().parent.parent


def test_dataset_missing_reward_columns(no_heavy_work, monkeypatch):
    monkeypatch.setattr(startup, "resolve_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    ds = Dataset.from_dict({"prompt": ["a", "b"], "target": [1, 2]})
    with pytest.raises(ValueError, match=r"reward 'equation_reward' needs column\(s\) \['nums'\]"):
        train(Config(), [format_reward, equation_reward], ds)


def test_empty_dataset(no_heavy_work):
    with pytest.raises(ValueError, match="train dataset is empty"):
        train(Config(), [format_reward], Dataset.from_dict({"prompt": []}))


def test_reward_weights_must_match_rewards(no_heavy_work):
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        train(Config(reward_weights=[1.0]), [format_reward, equation_reward], Dataset.from_dict({"prompt": ["x"]}))


def test_model_path_that_does_not_exist(no_heavy_work, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="no/such/model"):
        train(Config(model=str(tmp_path / "no/such/model")), [format_reward], Dataset.from_dict({"prompt": ["x"]}))


def test_prompt_longer_than_max_prompt_length(no_heavy_work, tmp_path):
    from tiny_task import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    ds = Dataset.from_dict({"prompt": ["b c d", " ".join(["b"] * 40)]})
    with pytest.raises(ValueError, match="40 tokens"):
        train(Config(model=str(model), max_prompt_length=16), [format_reward], ds)


@pytest.mark.slow
@pytest.mark.parametrize("beta, loads", [(0.0, 1), (0.04, 2)])
def test_beta_zero_never_loads_a_reference(tmp_path, beta, loads):
    from tiny_task import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    code = (
        "import minigrpo.startup as t, tiny_task\n"
        "calls = []\n"
        "orig = t.load_causal_lm\n"
        "t.load_causal_lm = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]\n"
        f"tiny_task.main([{str(model)!r}, {str(tmp_path / 'out')!r}, 'rollout=torch', 'max_steps=1', 'beta={beta}'])\n"
        "print('LOADS', len(calls))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"LOADS {loads}" in proc.stdout
