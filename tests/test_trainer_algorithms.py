"""The loss options through the trainer on the tiny task: the convergence test still learns, and
its sign-flipped twin still does not, with each option on; their metrics are logged; two ranks
run them; dynamic sampling keeps groups with a spread, resumes exactly, and leaves ranks with
fewer groups running ghost micro-batches; a resume that would change the schedule is refused."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_task import LEARN_STEPS, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tests" / "tiny_task.py")

OPTIONS = {
    "truncated-IS+entropy": ("rollout_correction=token_truncate", "entropy_coef=0.001"),
    "GSPO+2-iterations+sequence-mask": ("importance_sampling_level=sequence", "num_iterations=2",
                                        "rollout_correction=sequence_mask"),
    "DAPO-dynamic-sampling": ("dynamic_sampling=true", "dynamic_sampling_max_rounds=3",
                              "rollout_correction=token_truncate"),
}


def launch(model, out, *args, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                     str(ranks), "--master_port", free_port()]
    return subprocess.run([*launcher, SCRIPT, str(model), str(out), *args], capture_output=True, text=True, env=env,
                          timeout=1500)


def run(model, out, *args, ranks: int = 1) -> list[dict]:
    proc = launch(model, out, *args, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def tail_mean(rows, key, k=5):
    return sum(r[key] for r in rows[-k:]) / k


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_still_learns_and_flipped_twin_still_does_not(tiny_model, tmp_path, options):
    rows = run(tiny_model, tmp_path / "learn", "rollout=vllm", f"max_steps={LEARN_STEPS}", *options)
    curve = [round(r["reward/says_a/mean"], 3) for r in rows]
    assert rows[0]["reward/says_a/mean"] < 0.1 and tail_mean(rows, "reward/says_a/mean") > 0.8, curve
    computed = [r for r in rows if r["skipped_micro_batches"] < 1]  # steps with a forward pass
    assert computed and all(r["rollout_is/weight_mean"] > 0.9 for r in computed)  # fp32: engine ~ trainer
    assert all(r["rollout_is/ratio_max"] < 1.01 for r in computed)
    if "entropy_coef=0.001" in options:
        assert all(0 < r["entropy"] < 11 for r in computed)  # log(49,152) = 10.8 is the ceiling
        assert rows[-1]["entropy"] < rows[0]["entropy"]  # it learned to say "a": sharper
    flipped = run(tiny_model, tmp_path / "flip", "rollout=vllm", f"max_steps={LEARN_STEPS}", "--reward=says_a_negated",
                  *options)
    assert -tail_mean(flipped, "reward/says_a_negated/mean") < 0.05, [r["reward/says_a_negated/mean"] for r in flipped]


def test_two_ranks_run_the_options_with_the_batch_std_over_both(tiny_model, tmp_path):
    rows = run(tiny_model, tmp_path / "ddp", "rollout=torch", "max_steps=3", "scale_rewards=batch", "loss_type=bnpo",
               "entropy_coef=0.01", "rollout_correction=token_truncate", "beta=0.04", ranks=2)
    # the trainer raises if the replicas' weights differ; a finished run proves they matched
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["batch/completions"] == 4 * 8  # prompts_per_step 4 over both ranks, 8 each
        assert 0 < r["entropy"] < 11 and r["rollout_is/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert r["entropy_loss"] < 0  # a bonus: it lowers the loss


def test_resuming_with_another_schedule_is_refused(tiny_model, tmp_path):
    common = ("rollout=torch", "lr_scheduler_type=cosine")
    run(tiny_model, tmp_path / "cos", *common, "max_steps=1")
    proc = launch(tiny_model, tmp_path / "cos", *common, "max_steps=3", "--resume")
    assert proc.returncode != 0 and "different schedule" in proc.stderr and "max_steps" in proc.stderr, proc.stderr[-2000:]
    # constant, no warmup (the tiny task's defaults): max_steps does not move the learning rate, so a
    # run of 2 steps resumed with max_steps=3 goes on; checked in the next test, whose split run does so


SPARSE = ("--reward=starts_with_a", "success_reward=starts_with_a", "rollout=torch", "gradient_accumulation_steps=4",
          "dynamic_sampling=true", "save_steps=1", "save_total_limit=5")


def test_dynamic_sampling_keeps_spread_groups_and_resumes_exactly(tiny_model, tmp_path):
    """A sparse reward (~1 in 6 completions): most groups score all 0. Rounds are drawn until the
    step has its 4 groups with a spread (at most 3); the checkpoint holds the data position after
    every round drawn; a run stopped after step 2 and resumed draws what the uninterrupted one drew."""
    full = run(tiny_model, tmp_path / "full", *SPARSE, "dynamic_sampling_max_rounds=3", "max_steps=3")
    rounds = [r["dynamic/rounds"] for r in full]
    assert max(rounds) > 1, rounds  # the sparse reward made it draw more
    for r in full:
        assert r["dynamic/prompts_drawn"] == 4 * r["dynamic/rounds"]
        assert r["dynamic/groups_kept"] == 4 or r["dynamic/rounds"] == 3, r  # short only at the bound
        assert r["batch/completions"] == 8 * r["dynamic/groups_kept"]
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["data_position"] == 4 * sum(rounds)
    run(tiny_model, tmp_path / "split", *SPARSE, "dynamic_sampling_max_rounds=3", "max_steps=2")
    split = run(tiny_model, tmp_path / "split", *SPARSE, "dynamic_sampling_max_rounds=3", "max_steps=3", "--resume")
    assert [r["step"] for r in split] == [1, 2, 3]  # a constant schedule extends (the test above)
    assert len(full) == len(split)
    for a, b in zip(full, split):
        for key in ("dynamic/rounds", "reward/starts_with_a/mean", "param_checksum", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)


@pytest.mark.parametrize("ranks, stage", [(1, 0), (2, 0), (2, 3)])
def test_a_rank_left_short_runs_ghost_micro_batches(tiny_model, tmp_path, ranks, stage):
    """One round only: a rank keeps whatever groups had a spread, often fewer than its share, and
    runs its remaining micro-batches as ghosts (exact zero gradients), so every rank runs the
    same number of micro-batches (two ranks: the replica check passes at every step). At ZeRO-3
    a ghost runs dummy passes (the same parameter gathers as a real micro-batch), and the torch
    engine generates in lockstep with the policy's partitioned parameters."""
    ds = (f"deepspeed={ROOT / 'recipes' / f'deepspeed_zero{stage}.json'}",) if stage else ()
    rows = run(tiny_model, tmp_path / "run", *SPARSE, "dynamic_sampling_max_rounds=1", "max_steps=4", *ds, ranks=ranks)
    kept = [r["dynamic/groups_kept"] for r in rows]
    assert min(kept) < 4, kept  # some step was short
    assert all(r["dynamic/rounds"] == 1 for r in rows)
    trained = [r for r in rows if r["dynamic/groups_kept"] > 0]
    assert trained and all(r["grad_norm"] > 0 for r in trained)


def test_rollout_correction_weights_what_the_math_predicts_for_a_known_engine_mismatch(tiny_model, tmp_path):
    """In fp32 the engine's and trainer's log-probs agree (rho ~ 1), so the runs above would pass with
    the correction disconnected (issue 24). Here tests/faulty_run.py makes the engine report every
    token's log-prob D higher than it is, so log rho = trainer - engine = -D exactly (to fp32 noise):
    - token_truncate, D = -1: rho = e = 2.718 > cap 2 on every token: all truncated, weight 2;
    - token_truncate, D = +0.5: rho = e^-0.5 = 0.6065 under the cap: none truncated, weight 0.6065;
    - sequence_mask, D = +1: a sequence's log rho = -length, |.| >= 1 > log 2: every sequence masked,
      weight 0, so nothing is learned (beta 0): the weights stay as they were."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}

    def faulty(out, *args):
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "faulty_run.py"), str(tiny_model), str(out),
                               "rollout=vllm", "max_steps=2", *args], capture_output=True, text=True, env=env,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    for r in faulty(tmp_path / "up", "--shift-engine-logprobs=-1", "rollout_correction=token_truncate"):
        assert r["rollout_is/truncated_fraction"] == 1.0 and r["rollout_is/weight_mean"] == pytest.approx(2.0)
        assert r["rollout_is/ratio_max"] == pytest.approx(math.e, rel=1e-4)
    for r in faulty(tmp_path / "down", "--shift-engine-logprobs=0.5", "rollout_correction=token_truncate"):
        assert r["rollout_is/truncated_fraction"] == 0.0
        assert r["rollout_is/weight_mean"] == pytest.approx(math.exp(-0.5), rel=1e-4)
    rows = faulty(tmp_path / "mask", "--shift-engine-logprobs=1", "rollout_correction=sequence_mask")
    assert all(r["rollout_is/masked_fraction"] == 1.0 and r["rollout_is/weight_mean"] == 0.0 for r in rows)
    assert all(r["grad_norm"] == 0.0 for r in rows) and rows[0]["param_checksum"] == rows[1]["param_checksum"]
