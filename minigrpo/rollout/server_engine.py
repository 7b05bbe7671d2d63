"""Rollouts from a vLLM server in another process (scale-out layout): the client side, no vLLM here.

Two channels join the trainer and the server (minigrpo/rollout/server.py):
- requests: `multiprocessing.connection` (a TCP socket, authenticated by HMAC with a shared key
  before anything is unpickled), one per trainer rank. Messages are `(kind, payload)` tuples.
- weights: a two-process `torch.distributed` group (gloo on CPU, NCCL on GPU) joining trainer
  rank 0 (group rank 0) and the server (group rank 1). It is built from its own TCPStore, not by
  `init_process_group`, because the trainer's default group (its ranks) already exists.

A push, rank 0 only: ("push_begin", probe), then per chunk ("chunk", specs) followed by a
`broadcast` of the chunk packed into one uint8 buffer, then ("push_end", sums): the
`checksum.fingerprint` of every tensor as the trainer holds it. The server loads the tensors with VLLMEngine's in-place
reload, which checks every engine weight exactly against the tensors it received; the server then
checks those against the trainer's sums (so the transport is covered too) and the probe, and answers. Other ranks iterate
`named_tensors` (a ZeRO-3 gather is collective) and then wait for rank 0's outcome, so no rank
generates with the old weights. Every wait has a deadline (`timeout` seconds); a server that dies
or stops answering is a `RolloutServerError` naming it. Each rank also sends a heartbeat every
min(10, timeout/4) s from a thread, so the server can tell a lost trainer from a busy one.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Client

import torch
import torch.distributed as dist

from minigrpo import collectives
from minigrpo.checksum import fingerprint
from minigrpo.rollout.base import Probe, RolloutBatch, Sampling, WeightSyncError

AUTHKEY_ENV = "MINIGRPO_ROLLOUT_AUTHKEY"  # a secret string; the server and every trainer rank must share it
DEFAULT_BROADCAST_CHUNK_BYTES = 256 * 2**20
ALIGN = 64  # byte offset of every tensor in a packed chunk, so any dtype can view its slice


class RolloutServerError(RuntimeError):
    """The rollout server died, stopped answering, or refused a request."""


# ---------------------------------------------------------------------- shared with the server

def weight_backend() -> tuple[str, torch.device]:
    """Same code on both sides: NCCL between GPUs, gloo between CPU processes."""
    if torch.cuda.is_available():
        return "nccl", torch.device("cuda", torch.cuda.current_device())
    return "gloo", torch.device("cpu")


def weight_group(store: dist.Store, rank: int, timeout: float):
    """The 2-process group (trainer rank 0 = 0, server = 1) over `store`, built directly: the
    trainer's default group (its own ranks) already exists, so not `init_process_group`."""
    delta = datetime.timedelta(seconds=timeout)
    if weight_backend()[0] == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = delta
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    return dist.ProcessGroupGloo(store, rank, 2, delta)


def pack_layout(specs: list[tuple[str, tuple[int, ...], str]]) -> tuple[list[int], int]:
    """Byte offsets of each (name, shape, dtype) in a packed chunk, and the chunk's size."""
    offsets, size = [], 0
    for _, shape, dtype in specs:
        offsets.append(size)
        nbytes = _numel(shape) * getattr(torch, dtype).itemsize
        size += -(-nbytes // ALIGN) * ALIGN
    return offsets, size


def unpack(buffer: torch.Tensor, specs) -> list[tuple[str, torch.Tensor]]:
    """Views of a received uint8 buffer as the named tensors (no copies)."""
    offsets, _ = pack_layout(specs)
    out = []
    for (name, shape, dtype), off in zip(specs, offsets, strict=True):
        dt = getattr(torch, dtype)
        n = _numel(shape) * dt.itemsize
        out.append((name, buffer[off: off + n].view(dt).view(shape)))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def server_gpus(devices: str | None, tensor_parallel_size: int, trainer_visible: str | None, local_ranks: int) -> str:
    """CUDA_VISIBLE_DEVICES for a server the trainer starts on a GPU machine: `devices`, checked.

    The server inherits the trainer's environment, so without this it would share rank 0's GPU,
    and NCCL refuses a group of two processes on one device (the weight channel). `trainer_visible`
    and `local_ranks` say which GPUs this node's training ranks use (rank r: the r-th visible one)."""
    how = ("set vllm_server_devices to GPUs no training rank uses (e.g. vllm_server_devices=3 with "
           "CUDA_VISIBLE_DEVICES=0,1,2 for the ranks), or start the server by hand on its own GPU and "
           "set vllm_server_port (README: Running on GPUs)")
    if not devices:
        raise RolloutServerError(f"on a GPU machine the rollout server needs GPUs of its own: {how}")
    wanted = [d.strip() for d in devices.split(",") if d.strip()]
    visible = [d.strip() for d in trainer_visible.split(",")] if trainer_visible else [str(i) for i in range(local_ranks)]
    shared = sorted(set(wanted) & set(visible[:local_ranks]))
    if shared:
        raise RolloutServerError(f"vllm_server_devices={devices} includes GPU(s) {shared} that training ranks use: {how}")
    if len(wanted) < tensor_parallel_size:
        raise RolloutServerError(f"vllm_server_devices={devices} has {len(wanted)} GPU(s) for tensor_parallel_size "
                                 f"{tensor_parallel_size}")
    return ",".join(wanted)


# ---------------------------------------------------------------------- the client

class VLLMServerEngine:
    """A `RolloutEngine` whose vLLM runs in a server process; see the module docstring.

    port None or 0: trainer rank 0 starts `python -m minigrpo.rollout.server` on this machine
    (killed when this process exits) and the other ranks connect after it is ready; the shared
    key is made here and handed over. Otherwise connect to a running server at host:port, with
    the key in $MINIGRPO_ROLLOUT_AUTHKEY. `vllm_options` (dtype, seed, ...) only matter when this
    class starts the server.
    """

    shares_policy_weights = False

    def __init__(self, model_path, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 600.0,
                 tensor_parallel_size: int = 1, devices: str | None = None,
                 push_chunk_bytes: int = DEFAULT_BROADCAST_CHUNK_BYTES, **vllm_options):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.chunk_bytes = float(timeout), push_chunk_bytes
        self.rank, self.world = collectives.rank(), collectives.world_size()
        self.child: subprocess.Popen | None = None
        self.group = self.store = None
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        status = {}
        if self.rank == 0:
            try:
                if port:
                    key = os.environ.get(AUTHKEY_ENV)
                    if not key:
                        raise RolloutServerError(f"connecting to the rollout server at {host}:{port} needs the key it "
                                                 f"was started with in ${AUTHKEY_ENV}")
                    status = {"host": host, "port": port, "key": key, "pid": None}
                else:
                    status = self._start_server(model_path, tensor_parallel_size, devices, vllm_options)
            except Exception as err:  # told to the other ranks too, so none waits forever
                status = {"error": f"{type(err).__name__}: {err}"}
        if self.world > 1:  # the barrier after which the other ranks connect
            status = collectives.broadcast_object(status, src=0)
        if "error" in status:
            raise RolloutServerError(f"rank {self.rank}: the rollout server could not start: {status['error']}")
        self.host, self.port, self.pid = status["host"], status["port"], status["pid"]
        self.name = f"rollout server {self.host}:{self.port}" + (f" (pid {self.pid})" if self.pid else "")
        self.conn = self._connect(status["key"].encode())
        info = self._call("hello", {"rank": self.rank, "world_size": self.world, "pid": os.getpid()})
        self.pid = info["pid"]
        self.name = f"rollout server {self.host}:{self.port} (pid {self.pid})"
        if vllm_options.get("dtype") and info["dtype"] != vllm_options["dtype"]:
            raise RolloutServerError(f"{self.name} runs {info['dtype']}, the trainer {vllm_options['dtype']}")
        if self.rank == 0:  # the weight channel: the server hosts its store on a fresh port
            store_port = self._call("weights_group", None)["store_port"]
            delta = datetime.timedelta(seconds=self.timeout)
            self.store = self._guard(dist.TCPStore, self.host, store_port, 2, False, delta)
            self.group = self._guard(weight_group, self.store, 0, self.timeout)
            self.device = weight_backend()[1]
        threading.Thread(target=self._heartbeat, daemon=True, name="rollout-heartbeat").start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ protocol

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> RolloutBatch:
        """`sampling.n` completions for each of the P prompts, prompt-major (N = P*G)."""
        return self._call("generate", (prompt_ids, sampling))

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probability of tokens 1..L-1 of each sequence under the server's weights (temperature 1)."""
        return self._call("score", token_ids)

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], probe: Probe | None) -> None:
        """Rank 0 broadcasts the weights to the server, which loads and verifies them; every rank
        must call this (it iterates `named_tensors`, a collective under ZeRO-3) and every rank
        raises what rank 0 got: `WeightSyncError` for a failed probe, `RolloutServerError` else."""
        outcome, tensors = None, iter(named_tensors)
        if self.rank == 0:
            try:
                self._push(tensors, probe)
            except Exception as err:  # noqa: BLE001 every rank raises it below, after the collectives
                outcome = (type(err).__name__, str(err))
        for _ in tensors:  # other ranks, or rank 0 after a failed push: a ZeRO-3 gather is collective
            pass
        if self.world > 1:  # also keeps the other ranks from generating before the new weights are in
            outcome = collectives.broadcast_object(outcome, src=0)
        if outcome is not None:
            kind, msg = outcome
            where = "" if self.rank == 0 else "(rank 0's push) "
            raise (WeightSyncError if kind == "WeightSyncError" else RolloutServerError)(f"{where}{kind}: {msg}")

    def _push(self, named_tensors, probe) -> None:
        start = time.perf_counter()
        self._send("push_begin", probe)
        chunk, size, sent, hashing = [], 0, {}, 0.0
        for name, tensor in named_tensors:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"push_weights got {type(tensor).__name__} for {name!r}, expected a tensor")
            t = time.perf_counter()
            sent[name] = fingerprint(tensor)  # the server checks what arrived and loaded against it
            hashing += time.perf_counter() - t
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and size + nbytes > self.chunk_bytes:
                self._broadcast(chunk)
                chunk, size = [], 0
            chunk.append((name, tensor.detach()))
            size += nbytes
        if chunk:
            self._broadcast(chunk)
        self.last_broadcast_seconds = time.perf_counter() - start
        answer = self._call("push_end", sent)  # the server loads, verifies, answers
        self.last_push_seconds = time.perf_counter() - start
        self.last_checksum_seconds = hashing + answer["checksum_seconds"]  # both sides' sums

    def _broadcast(self, chunk: list[tuple[str, torch.Tensor]]) -> None:
        specs = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in chunk]
        offsets, total = pack_layout(specs)
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)  # [bytes]
        for (_, t), off in zip(chunk, offsets, strict=True):
            flat = t.reshape(-1).view(torch.uint8)
            buf[off: off + flat.numel()].copy_(flat)
        self._send("chunk", specs)
        self._guard(collectives.broadcast_in, self.group, buf, 0, self.timeout, f"the weight broadcast to {self.name}")

    def close(self) -> None:
        """Say goodbye (the server exits once every rank has) and stop a server we started."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._send("bye", None)
            self.conn.close()
        except (OSError, RolloutServerError):
            pass  # already gone
        if self.child is not None:
            try:
                self.child.wait(timeout=min(self.timeout, 30))
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
            if self.child.returncode == 0:  # keep the log of a server that failed
                shutil.rmtree(self._folder, ignore_errors=True)

    # ------------------------------------------------------------------ plumbing

    def _start_server(self, model_path, tensor_parallel_size: int, devices: str | None, vllm_options: dict) -> dict:
        env = dict(os.environ)
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = server_gpus(
                devices, tensor_parallel_size, os.environ.get("CUDA_VISIBLE_DEVICES"),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        key = secrets.token_hex(32)
        self._folder = folder = tempfile.mkdtemp(prefix="minigrpo-rollout-")
        ready, log_path = os.path.join(folder, "ready.json"), os.path.join(folder, "server.log")
        cmd = [sys.executable, "-m", "minigrpo.rollout.server", "--model", str(model_path), "--port", "0",
               "--timeout", str(self.timeout), "--connect-timeout", str(self.timeout),
               "--tensor-parallel-size", str(tensor_parallel_size), "--ready-file", ready]
        for k, v in vllm_options.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, bool):
                cmd += [flag] if v else []
            elif v is not None:
                cmd += [flag, str(v)]
        with open(log_path, "w") as log:  # the key goes by environment, not on the command line
            env[AUTHKEY_ENV] = key
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self._kill_child)
        print(f"[minigrpo] started the rollout server (pid {self.child.pid}); log: {log_path}", flush=True)
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(ready):
            if self.child.poll() is not None:
                raise RolloutServerError(f"the rollout server (pid {self.child.pid}) exited with code "
                                         f"{self.child.returncode} while starting:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                self._kill_child()
                raise RolloutServerError(f"the rollout server (pid {self.child.pid}) was not ready within "
                                         f"{self.timeout:.0f} s (vllm_server_timeout):\n{_tail(log_path)}")
            time.sleep(0.2)
        with open(ready) as f:
            port = json.load(f)["port"]
        return {"host": "127.0.0.1", "port": port, "key": key, "pid": self.child.pid}

    def _kill_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()

    def _connect(self, key: bytes):
        deadline = time.monotonic() + self.timeout
        while True:  # a server started by hand may still be loading
            try:
                return Client((self.host, self.port), authkey=key)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise RolloutServerError(f"{self.name}: connection refused for {self.timeout:.0f} s") from None
                time.sleep(1.0)

    def _send(self, kind: str, payload) -> None:
        with self._send_lock:
            self._guard(self.conn.send, (kind, payload))

    def _call(self, kind: str, payload):
        """Send a request and wait at most `timeout` seconds for its answer."""
        self._send(kind, payload)
        if not self._guard(self.conn.poll, self.timeout):
            raise RolloutServerError(f"{self.name} did not answer {kind!r} within {self.timeout:.0f} s "
                                     f"(vllm_server_timeout)")
        status, value = self._guard(self.conn.recv)
        if status == "ok":
            return value
        if status == "WeightSyncError":
            raise WeightSyncError(f"{self.name}: {value}")
        raise RolloutServerError(f"{self.name} failed on {kind!r}: {value}")

    def _guard(self, fn, *args):
        """Call fn; a lost connection or a timed-out broadcast becomes an error naming the server."""
        try:
            return fn(*args)
        except (EOFError, OSError, RuntimeError) as err:
            if isinstance(err, (RolloutServerError, WeightSyncError)):
                raise
            if self.child is not None and self.child.poll() is not None:
                state = f"exited with code {self.child.returncode}"
            elif isinstance(err, (EOFError, ConnectionError)):
                state = "closed the connection (it exited or crashed)"
            else:
                state = "is not answering"
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise RolloutServerError(f"{self.name} {state} ({detail})") from err

    def _heartbeat(self) -> None:
        """A ping every few seconds, so the server can tell a lost trainer from a busy one."""
        interval = min(10.0, self.timeout / 4)
        while not self._closed.wait(interval):
            try:
                with self._send_lock:
                    self.conn.send(("ping", None))
            except OSError:
                return  # the next request reports it


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
