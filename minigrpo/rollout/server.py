"""The rollout server: `VLLMEngine` in its own process, serving one training job's ranks.

    export MINIGRPO_ROLLOUT_AUTHKEY=$(python -c "import secrets; print(secrets.token_hex(32))")
    python -m minigrpo.rollout.server --model PATH --port 8470 [--tensor-parallel-size N] ...
    # then, with the same key in the environment: train with rollout=vllm_server vllm_server_port=8470

The trainer (rollout=vllm_server) starts one itself when vllm_server_port is 0/null; the wire
protocol is in server_engine.py. Requests are served one at a time, in arrival order. vLLM is
imported only through VLLMEngine (vllm_engine.py), whose generate/push/verify code is reused as is:
the weights broadcast to us are fed to `VLLMEngine.push_weights` as a generator, so they are loaded
with its in-place reload chunk by chunk while they arrive.

The server serves ONE job and exits when it is over: every rank said goodbye (exit 0), or a rank's
connection closed without it, or a rank sent nothing (not even its heartbeat) for --timeout
seconds, or no trainer connected within --connect-timeout seconds (exit 3). A server that outlived
its job would hold the job's trained weights, while a fresh trainer assumes the base weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import sys
import threading
import time
from multiprocessing.connection import Listener, wait

import torch
import torch.distributed as dist

from minigrpo import collectives
from minigrpo.rollout.base import WeightSyncError
from minigrpo.rollout.server_engine import (
    AUTHKEY_ENV, RolloutServerError, pack_layout, unpack, weight_backend, weight_group,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigrpo.rollout.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the trainer's `model`: HF folder, hub name or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=0, help="0: any free port (written to --ready-file)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a trainer rank may stay silent, and any one transfer may take (default 600)")
    p.add_argument("--connect-timeout", type=float, default=1800.0,
                   help="seconds to wait for the trainer's first connection (default 1800)")
    p.add_argument("--ready-file", help="write {port, pid} here (JSON) once serving")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-gib", type=float)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="vLLM's own messages below this level are hidden")
    args = p.parse_args(argv)
    key = os.environ.get(AUTHKEY_ENV)
    if not key:
        p.error(f"set ${AUTHKEY_ENV} to a secret (every trainer rank needs the same one), e.g. "
                "python -c \"import secrets; print(secrets.token_hex(32))\"")
    if args.tensor_parallel_size > 1 and not torch.cuda.is_available():
        p.error("--tensor-parallel-size > 1 needs GPUs")

    from minigrpo.models import resolve_model
    os.environ["VLLM_LOGGING_LEVEL"] = args.log_level.upper()  # vLLM 0.32 reads it when first imported
    from minigrpo.rollout.vllm_engine import VLLMEngine  # the one file that imports vLLM

    model = resolve_model(args.model)  # as the trainer does: a folder, a hub name or the built-in default
    engine = VLLMEngine(
        model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code, tensor_parallel_size=args.tensor_parallel_size,
        log_level=args.log_level,
    )
    dtype = str(engine.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    listener = Listener((args.host, args.port), authkey=key.encode())
    port = listener.address[1]
    if args.ready_file:  # written whole, then renamed: the trainer never reads half a file
        with open(args.ready_file + ".tmp", "w") as f:
            json.dump({"port": port, "pid": os.getpid()}, f)
        os.replace(args.ready_file + ".tmp", args.ready_file)
    _log(f"serving {model} ({dtype}) on {args.host}:{port}, pid {os.getpid()}")
    return Server(engine, listener, args.host, args.timeout, dtype).run(args.connect_timeout)


class Server:
    def __init__(self, engine, listener, host: str, timeout: float, dtype: str):
        self.engine, self.listener, self.host, self.timeout, self.dtype = engine, listener, host, timeout, dtype
        self.new: queue.Queue = queue.Queue()
        self.ranks: dict = {}  # connection -> trainer rank
        self.seen: dict = {}  # connection -> time of its last message
        self.world = None
        self.group = self.store = None
        self.device = weight_backend()[1]

    def run(self, connect_timeout: float) -> int:
        threading.Thread(target=self._accept, daemon=True, name="accept").start()
        started = time.monotonic()
        while True:
            while not self.new.empty():
                conn = self.new.get()
                self.ranks[conn], self.seen[conn] = None, time.monotonic()
            if not self.ranks:
                if self.world is not None:
                    _log("every rank said goodbye; exiting")
                    return 0
                if time.monotonic() - started > connect_timeout:
                    _log(f"no trainer connected within {connect_timeout:.0f} s; exiting")
                    return 3
            for conn in wait(list(self.ranks), timeout=1.0):
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    if self.ranks[conn] is None:  # never joined the job (refused, or left at once)
                        del self.ranks[conn], self.seen[conn]
                        continue
                    return self._lost(conn, "closed its connection without saying goodbye")
                self.seen[conn] = time.monotonic()
                if kind == "bye":
                    conn.close()
                    del self.ranks[conn], self.seen[conn]
                    continue
                try:
                    self._handle(conn, kind, payload)
                except (EOFError, OSError, RuntimeError) as err:  # the client's channel broke mid-request
                    return self._lost(conn, f"failed during {kind!r}: {type(err).__name__}: {err}")
            for conn in list(self.ranks):  # silence, heartbeats included, that is not just unread
                if time.monotonic() - self.seen[conn] > self.timeout and not wait([conn], timeout=0):
                    return self._lost(conn, f"sent nothing (not even a heartbeat) for {self.timeout:.0f} s")

    def _handle(self, conn, kind: str, payload) -> None:
        if kind == "ping":
            return
        if kind == "hello":
            if self.world not in (None, payload["world_size"]) or payload["rank"] in self.ranks.values():
                joined = sorted(r for r in self.ranks.values() if r is not None)
                conn.send(("error", f"this server serves one job; got {payload} after ranks {joined}"))
                conn.close()
                del self.ranks[conn], self.seen[conn]
                return
            self.world, self.ranks[conn] = payload["world_size"], payload["rank"]
            _log(f"rank {payload['rank']} of {self.world} connected (pid {payload['pid']})")
            conn.send(("ok", {"pid": os.getpid(), "dtype": self.dtype}))
        elif kind == "generate":
            prompt_ids, sampling = payload
            try:
                batch = self.engine.generate(prompt_ids, sampling)
            except (ValueError, RuntimeError) as err:  # a bad request is the client's error, not ours
                conn.send(("error", f"{type(err).__name__}: {err}"))
                return
            conn.send(("ok", batch))
        elif kind == "score":
            try:
                scores = self.engine.score(payload)
            except ValueError as err:
                conn.send(("error", f"{type(err).__name__}: {err}"))
                return
            conn.send(("ok", scores))
        elif kind == "weights_group":  # rank 0 only: our store on a fresh port, then both join
            delta = datetime.timedelta(seconds=self.timeout)
            self.store = dist.TCPStore(self.host, 0, 2, is_master=True, timeout=delta, wait_for_workers=False)
            conn.send(("ok", {"store_port": self.store.port}))
            self.group = weight_group(self.store, 1, self.timeout)
        elif kind == "push_begin":
            self._receive_push(conn, payload)
        else:
            conn.send(("error", f"unknown request {kind!r}"))

    def _receive_push(self, conn, probe) -> None:
        """Feed the broadcast chunks to VLLMEngine.push_weights as they arrive, then answer."""
        if self.group is None:
            raise RolloutServerError("push before the weight group was set up")
        ended, trainer_sums = False, None

        def arriving():
            nonlocal ended, trainer_sums
            while True:
                if not conn.poll(self.timeout):
                    raise _ChannelLost(f"no weight chunk for {self.timeout:.0f} s")
                try:
                    kind, specs = conn.recv()
                except (EOFError, OSError) as err:
                    raise _ChannelLost(f"{type(err).__name__}: {err}") from err
                if kind == "push_end":
                    ended, trainer_sums = True, specs
                    return
                if kind == "chunk":
                    yield from self._receive_chunk(specs)
                elif kind != "ping":
                    raise _ChannelLost(f"expected a weight chunk, got {kind!r}")

        start = time.perf_counter()
        try:
            received = self.engine.push_weights(arriving(), probe)  # engine weights == received, exactly
            if received != trainer_sums:  # received == what the trainer sent
                wrong = sorted(n for n in set(received) | set(trainer_sums) if received.get(n) != trainer_sums.get(n))
                raise WeightSyncError(f"{len(wrong)} tensor(s) arrived different from what the trainer sent: {wrong[:5]}")
        except _ChannelLost:
            raise
        except Exception as err:  # noqa: BLE001 a failed load or probe: read the rest of the push, answer it
            while not ended:  # keeps the channel in step: take (and drop) what is still coming
                for _ in arriving():
                    pass
            kind = "WeightSyncError" if isinstance(err, WeightSyncError) else "error"
            conn.send((kind, f"{type(err).__name__}: {err}"))
            return
        seconds = time.perf_counter() - start
        _log(f"weights received, loaded and verified in {seconds:.2f} s")
        conn.send(("ok", {"seconds": seconds, "checksum_seconds": self.engine.last_checksum_seconds}))

    def _receive_chunk(self, specs) -> list:
        buf = torch.empty(pack_layout(specs)[1], dtype=torch.uint8, device=self.device)  # fresh: vLLM keeps views
        try:
            collectives.broadcast_in(self.group, buf, 0, self.timeout, "a weight chunk's broadcast")
        except (RuntimeError, TimeoutError) as err:  # the sender died or the broadcast timed out
            raise _ChannelLost(f"weight broadcast failed: {err}") from err
        return unpack(buf, specs)

    def _lost(self, conn, what: str) -> int:
        _log(f"rank {self.ranks.get(conn)} {what}; the job is over, exiting")
        return 3

    def _accept(self) -> None:
        while True:
            try:
                self.new.put(self.listener.accept())
            except Exception as err:  # noqa: BLE001 a wrong key or a port scan: refuse it, keep listening
                _log(f"refused a connection: {type(err).__name__}: {err}")


class _ChannelLost(RuntimeError):
    """The trainer's request channel or weight broadcast broke during a push."""


def _log(msg: str) -> None:
    print(f"[minigrpo rollout server] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    code = main()
    if code == 3:
        # The job is lost: skip vLLM's teardown at interpreter exit (about 10 s here), which has
        # nothing left to save; the OS frees the memory (and the GPUs) of a process that exits.
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
