"""rollout=vllm_server on the tiny task: 2 training ranks (torchrun, gloo) + 1 vLLM server process.

The trainer verifies every push with a probe and raises on a mismatch, and it raises if the ranks'
weights diverge, so a finished run proves the broadcast weights arrived. The failure tests start
the server by hand (the documented command) so they know its pid, then kill one side and time
how long the other takes to notice.
"""

import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_task import build_tiny_model

from minigrpo.config import Config, ConfigError
from minigrpo.rollout.server_engine import pack_layout, unpack

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tests" / "tiny_task.py")
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}
TIMEOUT = 30  # vllm_server_timeout in the failure tests, seconds
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def slow(test):
    return pytest.mark.slow(needs_vllm(test))


def torchrun(port: int) -> tuple:
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port))


def train(model, out, *overrides, launcher=(sys.executable,), env=ENV):
    proc = subprocess.run([*launcher, SCRIPT, str(model), str(out), *overrides], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return rows, proc.stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead too


def test_packed_chunk_round_trips_mixed_dtypes_without_copies():
    # offsets are rounded up to 64 bytes: a [3] bf16 (6 B) at 0, a [2, 2] fp32 (16 B) at 64,
    # a 0-d int64 (8 B) at 128: 192 bytes in all
    tensors = [("a", torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16)), ("b", torch.arange(4.0).view(2, 2)),
               ("c", torch.tensor(7))]
    specs = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors]
    offsets, total = pack_layout(specs)
    assert (offsets, total) == ([0, 64, 128], 192)
    buf = torch.zeros(total, dtype=torch.uint8)
    for (_, t), off in zip(tensors, offsets, strict=True):
        buf[off: off + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8)
    out = unpack(buf, specs)
    assert [n for n, _ in out] == ["a", "b", "c"]
    for (_, want), (_, got) in zip(tensors, out, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # views of the buffer


def test_server_config_keys_are_checked():
    assert Config(rollout="vllm_server", vllm_server_port=8470).vllm_server_timeout == 600.0
    bad = (("vllm_server_port", 70000), ("vllm_server_timeout", 0), ("vllm_server_tensor_parallel_size", 0))
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            Config(rollout="vllm_server", **{key: value})


def test_a_server_on_a_gpu_machine_gets_gpus_no_training_rank_uses():
    from minigrpo.rollout.server_engine import RolloutServerError, server_gpus

    # the seed's node: ranks on GPUs 0-2 (CUDA_VISIBLE_DEVICES=0,1,2), the server on 3
    assert server_gpus("3", 1, "0,1,2", 3) == "3"
    assert server_gpus(" 6, 7", 2, None, 4) == "6,7"  # ranks on 0-3 when nothing is set
    with pytest.raises(RolloutServerError, match="needs GPUs of its own"):  # it would share rank 0's GPU
        server_gpus(None, 1, "0,1,2", 3)
    with pytest.raises(RolloutServerError, match=r"includes GPU\(s\) \['2'\] that training ranks use"):
        server_gpus("2,3", 1, "0,1,2", 3)
    with pytest.raises(RolloutServerError, match=r"1 GPU\(s\) for tensor_parallel_size 2"):
        server_gpus("3", 2, "0,1,2", 3)
    assert Config(rollout="vllm_server", vllm_server_devices="3").vllm_server_devices == "3"


@slow
def test_server_checks_every_push_exactly_transport_included(tiny_model, tmp_path, monkeypatch):
    """The trainer sends the bits sums of its tensors; the server checks its engine's weights against
    the tensors it received, and those against the trainer's sums. One byte flipped on the way (in
    the broadcast buffer, after the trainer summed the tensor) is a WeightSyncError naming it."""
    from transformers import AutoModelForCausalLM

    from minigrpo import collectives
    from minigrpo.rollout import WeightSyncError
    from minigrpo.rollout.server_engine import VLLMServerEngine

    server, port, env = start_server(tiny_model, tmp_path)
    monkeypatch.setenv("MINIGRPO_ROLLOUT_AUTHKEY", env["MINIGRPO_ROLLOUT_AUTHKEY"])
    engine = None
    try:
        engine = VLLMServerEngine(tiny_model, port=port, timeout=TIMEOUT, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        engine.push_weights(model.named_parameters(), None)  # clean: passes the exact checks
        assert engine.last_checksum_seconds > 0
        broadcast = collectives.broadcast_in

        def flip_a_byte(group, buffer, src, timeout, what):
            buffer[100] ^= 1  # inside the first tensor of the chunk
            return broadcast(group, buffer, src, timeout, what)

        monkeypatch.setattr(collectives, "broadcast_in", flip_a_byte)
        with pytest.raises(WeightSyncError, match="arrived different from what the trainer sent"):
            engine.push_weights(model.named_parameters(), None)
    finally:
        if engine is not None:
            engine.close()
        server.kill()


@slow
def test_two_ranks_and_a_server_stay_in_sync(tiny_model, tmp_path):
    rows, stdout = train(tiny_model, tmp_path / "run", "rollout=vllm_server", "max_steps=3", "beta=0.04",
                         f"vllm_server_timeout={10 * TIMEOUT}", launcher=torchrun(29541))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["batch/completions"] == 4 * 8 for r in rows)  # 2 ranks x 2 prompts x 8, all served
    assert max(r["logprob_gap"] for r in rows) < 1e-3  # both ranks sampled from the pushed weights
    assert all("param_checksum" in r for r in rows)  # the trainer raises if the replicas diverged
    pid = int(re.search(r"started the rollout server \(pid (\d+)\)", stdout).group(1))
    assert not alive(pid)  # the trainer's server ends with the trainer


@slow
def test_server_layout_gives_the_colocated_metrics(tiny_model, tmp_path):
    # One rank each, same seed. The sampling seed of every request is set by the trainer
    # (Sampling.seed), and the server runs the same vLLM build and settings as the colocated
    # engine, one request batch at a time, so the samples and every metric agree.
    common = ("max_steps=3", "beta=0.04", "eval_steps=3")
    colocated, _ = train(tiny_model, tmp_path / "colocated", "rollout=vllm", *common)
    served, _ = train(tiny_model, tmp_path / "served", "rollout=vllm_server", *common)
    for a, b in zip(colocated, served, strict=True):
        for key in ("reward/total/mean", "pg_loss", "kl", "grad_norm", "completion/length_mean",
                    "param_checksum", "eval/success_rate"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])


def start_server(model, tmp_path, timeout=TIMEOUT):
    """The documented command, on a free port read back from --ready-file."""
    key = secrets.token_hex(16)
    ready, log = tmp_path / "ready.json", open(tmp_path / "server.log", "w")
    env = {**ENV, "MINIGRPO_ROLLOUT_AUTHKEY": key}
    server = subprocess.Popen(
        [sys.executable, "-m", "minigrpo.rollout.server", "--model", str(model), "--port", "0", "--dtype", "float32",
         "--timeout", str(timeout), "--enforce-eager", "--kv-cache-gib", "0.25", "--max-model-len", "24",
         "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    return server, json.loads(ready.read_text())["port"], env


def start_trainer(model, out, port, env, master_port):
    """2 ranks on the hand-started server, in their own session so the test can stop them all."""
    err = open(out.parent / "trainer.err", "w")
    return subprocess.Popen([*torchrun(master_port), SCRIPT, str(model), str(out), "rollout=vllm_server",
                             "max_steps=200", f"vllm_server_port={port}", f"vllm_server_timeout={TIMEOUT}"],
                            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)


def wait_for_steps(out, proc, n=1, limit=600):
    deadline = time.monotonic() + limit
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, (out.parent / "trainer.err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)


def stop_trainer(proc, server_log: Path):
    """Kill torchrun and its ranks (each in a session of its own; pids from the server's log):
    after a failure torchrun may be gone already, leaving a stopped or blocked rank behind."""
    for pid in re.findall(r"connected \(pid (\d+)\)", server_log.read_text()):
        try:
            if str(server_log.parent) in Path(f"/proc/{pid}/cmdline").read_text():  # still our rank
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_lost_server_is_a_clear_error_within_the_deadline(tiny_model, tmp_path, how):
    # killed: the connection closes and the next request fails at once; frozen (SIGSTOP): the
    # next request or broadcast times out after vllm_server_timeout. Either way + torchrun
    # tearing down the other rank, which may sit in a collective until then.
    server, port, env = start_server(tiny_model, tmp_path)
    out = tmp_path / "run"
    trainer = start_trainer(tiny_model, out, port, env, 29542 if how == signal.SIGKILL else 29545)
    try:
        wait_for_steps(out, trainer)
        os.kill(server.pid, how)
        lost = time.monotonic()
        trainer.wait(timeout=TIMEOUT + 90)
        seconds = time.monotonic() - lost
    finally:
        stop_trainer(trainer, tmp_path / "server.log")
        server.kill()
    stderr = (tmp_path / "trainer.err").read_text()
    assert trainer.returncode != 0
    assert f"RolloutServerError: rollout server 127.0.0.1:{port} (pid {server.pid})" in stderr, stderr[-3000:]
    print(f"server {signal.Signals(how).name} -> trainer exited with a RolloutServerError after {seconds:.1f} s")
    assert seconds < (TIMEOUT if how == signal.SIGKILL else TIMEOUT + 45)


@slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_server_exits_when_a_training_rank_is_lost(tiny_model, tmp_path, how):
    # killed: its connection closes, the server exits at once; frozen (SIGSTOP): its heartbeat
    # stops, the server exits after --timeout seconds of silence.
    server, port, env = start_server(tiny_model, tmp_path)
    out = tmp_path / "run"
    trainer = start_trainer(tiny_model, out, port, env, 29543 if how == signal.SIGKILL else 29544)
    try:
        wait_for_steps(out, trainer)
        rank1 = int(re.search(r"rank 1 of 2 connected \(pid (\d+)\)", (tmp_path / "server.log").read_text()).group(1))
        os.kill(rank1, how)
        lost = time.monotonic()
        server.wait(timeout=TIMEOUT + 30)
        seconds = time.monotonic() - lost
    finally:
        stop_trainer(trainer, tmp_path / "server.log")
        server.kill()
    log = (tmp_path / "server.log").read_text()
    assert server.returncode == 3, log[-3000:]
    assert "rank 1 " in log.split("the job is over")[0].splitlines()[-1]
    print(f"rank 1 {signal.Signals(how).name} -> server exited after {seconds:.1f} s")
    assert seconds < (TIMEOUT if how == signal.SIGKILL else TIMEOUT + 5)  # + our polling, a heartbeat period
