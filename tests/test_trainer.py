"""The full trainer on a tiny random LM (tests/tiny_task.py): it learns, its sign-flipped twin
does not, outputs and checkpoints are complete, resume is exact, two ranks stay identical.

Each training run is a fresh process: vLLM and DeepSpeed keep process-wide state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.stats import wilson_interval
from tiny_task import LEARN_STEPS, build_tiny_model, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tests" / "tiny_task.py")


def run(model, out, *args, launcher=(), stdout=None):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([*launcher, *(() if launcher else (sys.executable,)), SCRIPT, str(model), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if stdout is not None:
        stdout.append(proc.stdout + proc.stderr)
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def tail_mean(rows, key, k=5):
    return sum(r[key] for r in rows[-k:]) / k


def test_learns_with_vllm_and_sign_flipped_twin_does_not(tiny_model, tmp_path):
    # A fresh model says "a" for ~1/31 of its words. LEARN_STEPS steps x 32 completions.
    console = []
    rows = run(tiny_model, tmp_path / "learn", "rollout=vllm", f"max_steps={LEARN_STEPS}", stdout=console)
    # log_level error (the default): vLLM's and DeepSpeed's own notices stay off the console
    chatter = [line for line in console[0].splitlines()
               if " INFO " in line or " WARNING " in line or "built successfully" in line or "Loading" in line]
    assert not chatter and f"step {LEARN_STEPS}: reward" in console[0], chatter[:5]
    start, end = rows[0]["reward/says_a/mean"], tail_mean(rows, "reward/says_a/mean")
    assert start < 0.1, start
    assert end > 0.8, [round(r["reward/says_a/mean"], 3) for r in rows]
    # engine and trainer agree after every push; steps whose micro-batches were all skipped
    # (all groups scored alike: beta 0) measure no gap and log "nan"
    gaps = [r["logprob_gap"] for r in rows if r["skipped_micro_batches"] < 1]
    assert len(gaps) >= 10 and max(gaps) < 1e-3, gaps

    flipped = run(tiny_model, tmp_path / "flip", "rollout=vllm", f"max_steps={LEARN_STEPS}", "--reward=says_a_negated")
    end_flipped = -tail_mean(flipped, "reward/says_a_negated/mean")
    assert end_flipped < 0.05, [round(-r["reward/says_a_negated/mean"], 3) for r in flipped]


def test_learns_with_torch_engine(tiny_model, tmp_path):
    rows = run(tiny_model, tmp_path / "torch", "rollout=torch", "max_steps=20")
    assert rows[0]["reward/says_a/mean"] < 0.1
    assert tail_mean(rows, "reward/says_a/mean", 3) > 0.6, [round(r["reward/says_a/mean"], 3) for r in rows]


def test_skipping_zero_advantage_micro_batches_changes_no_update(tiny_model, tmp_path):
    """beta 0, sparse 0/1 reward, one group per micro-batch: the micro-batches whose advantages are
    all 0 are skipped, and every step's weights (checksum) and loss equal those of the run that
    computes them. Also checks the run had both kinds, so both paths are exercised."""
    args = ("--reward=starts_with_a", "rollout=torch", "max_steps=4", "gradient_accumulation_steps=4", "logging_steps=1",
            "success_reward=starts_with_a")
    skipped = run(tiny_model, tmp_path / "skip", *args)
    # also: a step-0 evaluation of 0 tasks is no evaluation (no row, no crash), not a KeyError
    computed = run(tiny_model, tmp_path / "compute", *args, "skip_zero_advantage=false", "eval_before_training=true",
                   "eval_num_samples=0")
    assert [r["step"] for r in computed] == [1, 2, 3, 4]
    fractions = [r["skipped_micro_batches"] for r in skipped]
    assert 0 < sum(fractions) < len(fractions), fractions  # some skipped, some computed
    assert all(r["skipped_micro_batches"] == 0 for r in computed)
    for a, b in zip(skipped, computed):
        assert a["reward/starts_with_a/mean"] == b["reward/starts_with_a/mean"]  # same samples
        assert a["param_checksum"] == pytest.approx(b["param_checksum"], rel=1e-6, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-9)


def test_outputs_and_checkpoint_load_in_transformers(tiny_model, tmp_path):
    out = tmp_path / "run"
    console = []
    rows = run(tiny_model, out, "rollout=torch", "max_steps=3", "save_steps=2", "save_total_limit=1",
               "beta=0.04", "eval_steps=2", "eval_before_training=true", stdout=console)
    # the step-0 evaluation: its own row, before any update; the summary compares it with the last
    before, rows = rows[0], rows[1:]
    assert before["step"] == 0 and set(before) == {"step", "eval/tasks", "eval/with_stop", "eval/success_rate",
                                                   "eval/success_rate_low", "eval/success_rate_high",
                                                   "eval/completion_length", "eval/says_a"}, before
    # the 95% Wilson interval of the success rate over the 8 tasks (minigrpo.stats)
    assert (before["eval/success_rate_low"], before["eval/success_rate_high"]) == pytest.approx(
        wilson_interval(round(8 * before["eval/success_rate"]), 8))
    assert before["eval/with_stop"] == 0.0
    assert before["eval/tasks"] == 8 and 0 < before["eval/completion_length"] <= 8
    summary = [line for line in console[0].splitlines() if "held-out, 8 tasks, greedy, without stop strings" in line]
    assert len(summary) == 1 and f"success rate {before['eval/success_rate']:.2f} -> " \
        f"{rows[-1]['eval/success_rate']:.2f}" in summary[0], console[0][-2000:]
    for name in ("metrics.jsonl", "config.yaml", "curves.png", "completion_samples.txt",
                 "success_completion_samples.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.*"))
    keys = {
        "reward/total/mean", "reward/total/std", "reward/says_a/mean", "zero_spread_groups", "pg_loss",
        "kl_loss", "kl", "clip_fraction", "clip_low", "clip_high", "grad_norm", "lr",
        "completion/length_mean", "completion/length_max", "completion/truncated_fraction", "logprob_gap",
        "time/generate", "time/reward", "time/reference", "time/train", "time/push", "tokens_per_second",
        "completion/self_verification_rate", "batch/completions",
    }
    assert keys <= set(rows[0]), keys - set(rows[0])
    assert rows[0]["batch/completions"] == 4 * 8
    assert "eval/success_rate" in rows[1] and "eval/success_rate" in rows[2]
    assert "step 1 |" in (out / "completion_samples.txt").read_text()
    # save_total_limit=1: only the final checkpoint stays, and it is complete
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000003"], ckpts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = out / "checkpoints" / "step-000003" / "model"
    assert (model_dir / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    assert json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())["step"] == 3


def test_resume_gives_the_same_metrics(tiny_model, tmp_path):
    # 4 steps in one go vs 2 steps, then --resume for 2 more, both with the vLLM engine (resume
    # must push the restored weights into a fresh engine, verified by the probe).
    common = ("rollout=vllm", "beta=0.04", "learning_rate=1e-3")
    full = run(tiny_model, tmp_path / "full", *common, "max_steps=4")
    run(tiny_model, tmp_path / "split", *common, "max_steps=2")
    split = run(tiny_model, tmp_path / "split", *common, "max_steps=4", "--resume")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full, split):
        for key in ("reward/total/mean", "kl", "pg_loss", "grad_norm", "lr", "completion/length_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


def test_two_ranks_stay_identical_and_split_the_batch(tiny_model, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    rows = run(tiny_model, tmp_path / "ddp", "rollout=vllm", "max_steps=4", "beta=0.04", launcher=launcher)
    # the trainer raises if the replicas' weight checksums differ; a finished run proves they matched
    assert all(r["batch/completions"] == 4 * 8 for r in rows)  # 2 ranks x 2 prompts x 8
    assert all("param_checksum" in r for r in rows)
