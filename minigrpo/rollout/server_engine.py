"""Rollouts from vLLM's own OpenAI-compatible server (the scale-out layout): the trainer's side, no vLLM here.

Two channels join the trainer and the server (started by `serve.py`, extended by `vllm_plugin.py`):
- HTTP, one client per trainer rank, every request with the shared secret and a timeout:
  `/v1/completions` with token-id prompts (one request per prompt, so every completion gets the
  seed the colocated engine gives it; a rank sends its requests at once and vLLM's scheduler
  batches them with the other ranks'), the RL router (`/pause`, `/start_weight_update`, ...) and
  `/collective_rpc` to our worker extension.
- weights, trainer rank 0 only: a two-process torch.distributed group (gloo on CPU, NCCL on GPU)
  that the server's weight-transfer engine joins through `/init_weight_transfer_engine`.

A push, rank 0: `/pause?mode=wait` (in-flight requests finish; the prefix cache is cleared) ->
`/start_weight_update` -> per chunk, `/update_weights` with its specs while the packed bytes are
broadcast -> `/finish_weight_update` with the new weight version -> the exact check: the worker's
bit sums (`minigrpo_parameter_sums`) against the `checksum.fingerprint` of every tensor as the trainer
holds it, so a byte changed in transport, a tensor skipped or a one-ulp difference is a
`WeightSyncError` -> `/resume` -> the probe. Other ranks iterate `named_tensors` (a ZeRO-3 gather is
collective) and wait for rank 0's outcome, so no rank generates with the old weights.

A dead server is a `RolloutServerError` naming it at the next request; a frozen one after
`timeout` seconds. Generation requests are retried once after a dropped connection (seeded
requests give the same completions); weight requests never are.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

import torch
import torch.distributed as dist

from minigrpo import collectives
from minigrpo.checksum import fingerprint
from minigrpo.rollout.base import Probe, RolloutBatch, Sampling, WeightSyncError, vllm_requests
from minigrpo.rollout.packing import chunks, pack, specs_of
from minigrpo.rollout.push_check import check_engine_sums, check_probe, from_wire
from minigrpo.rollout.serve import AUTHKEY_ENV, BACKEND, check_host, server_command, server_env

DEFAULT_BROADCAST_CHUNK_BYTES = 256 * 2**20
# Straight to the server: urllib's default opener sends requests (and our secret) through any
# HTTP_PROXY in the environment, which clusters often set, and loopback is not always in no_proxy.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MAX_CONCURRENT_REQUESTS = 64  # per rank; vLLM's scheduler batches what arrives


class RolloutServerError(RuntimeError):
    """The rollout server died, stopped answering, refused a request, or does not serve what we train."""


class _ServerFailed(RolloutServerError):
    """The server answered a weight-transfer request with an error."""


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


class VLLMServerEngine:
    """A `RolloutEngine` whose vLLM is a server in another process; see the module docstring.

    port None or 0: trainer rank 0 starts `python -m minigrpo.rollout.serve` on this machine, on
    `host` (loopback unless `allow_remote`), with a fresh secret handed to the other ranks; it is
    stopped when the trainer ends, however it ends. Otherwise join the server at host:port with
    the secret in $MINIGRPO_ROLLOUT_AUTHKEY; a joined server is never stopped by us. Either way the
    server must serve `model_path` with our settings (checked once, on rank 0, before anything else).
    `max_model_len`: the longest sequence the trainer asks for. `log_path`: where a server we start
    writes its log (the trainer puts it in the run's output_dir; None: a temporary folder, removed
    when the server ended well). The other options are the server's launch settings when we start it.
    """

    shares_policy_weights = False

    def __init__(self, model_path, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 600.0,
                 tensor_parallel_size: int = 1, devices: str | None = None, allow_remote: bool = False,
                 log_path: str | os.PathLike | None = None,
                 push_chunk_bytes: int = DEFAULT_BROADCAST_CHUNK_BYTES, dtype: str | None = None,
                 max_model_len: int | None = None, log_level: str = "warning", **launch):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if push_chunk_bytes < 1:
            raise ValueError(f"push_chunk_bytes must be >= 1, got {push_chunk_bytes}")
        self.timeout, self.chunk_bytes = float(timeout), push_chunk_bytes
        self.rank, self.world = collectives.rank(), collectives.world_size()
        self.child: subprocess.Popen | None = None
        self.group = self.store = self.log_path = None
        self.weight_version = 0
        self._closed = False
        self.dtype = dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        status = {}
        if self.rank == 0:
            try:
                if port:
                    secret = os.environ.get(AUTHKEY_ENV)
                    if not secret:
                        raise RolloutServerError(f"joining the rollout server at {host}:{port} needs the secret it "
                                                 f"was started with in ${AUTHKEY_ENV}")
                    status = {"base": f"http://{_url_host(host)}:{port}", "secret": secret, "pid": None, "log": None}
                else:
                    check_host(host, allow_remote)
                    status = self._start(model_path, host, tensor_parallel_size, devices, dtype, max_model_len,
                                         log_level, log_path, launch)
                self._set_server(status)
                self.served = self._check_served(model_path, max_model_len)
                self._open_weight_channel()
            except Exception as err:  # noqa: BLE001 told to the other ranks too, so none waits forever
                self._stop_child()
                status = {"error": f"{type(err).__name__}: {err}"}
        if self.world > 1:  # the secret goes over the job's own group, never on a command line
            status = collectives.broadcast_object(status, src=0)
        if "error" in status:
            raise RolloutServerError(f"rank {self.rank}: the rollout server: {status['error']}")
        if self.rank != 0:
            self._set_server(status)
            self.served = self._get("/v1/models")["data"][0]["id"]
        atexit.register(self.close)

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> RolloutBatch:
        """`sampling.n` completions for each of the P prompts, prompt-major (N = P*G)."""
        bodies = [{
            "model": self.served, "prompt": p, "n": n, "max_tokens": sampling.max_tokens,
            # every field sent: the server's defaults must not decide the sampling
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop": list(sampling.stop), "stop_token_ids": list(sampling.stop_token_ids),
            "seed": seed,  # the colocated engine's (base.vllm_requests)
            "logprobs": 0, "return_token_ids": True, "include_stop_str_in_output": True, "skip_special_tokens": True,
        } for p, n, seed in vllm_requests(prompt_ids, sampling)]
        answers = self._concurrently("/v1/completions", bodies, retry=True)
        prompts, ids, texts, lps, reasons = [], [], [], [], []
        for body, answer in zip(bodies, answers, strict=True):
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            if len(choices) != body["n"]:
                raise RolloutServerError(f"{self.name} returned {len(choices)} completions for a request of {body['n']}")
            for c in choices:
                tokens, lp = c["token_ids"], c["logprobs"]["token_logprobs"]
                if c["prompt_token_ids"] != body["prompt"]:
                    raise RolloutServerError(f"{self.name} answered a request with another prompt's completions")
                if len(lp) != len(tokens) or c["finish_reason"] not in ("stop", "length"):
                    raise RolloutServerError(f"{self.name}: {len(lp)} logprobs for {len(tokens)} tokens, "
                                             f"finish reason {c['finish_reason']!r}")
                prompts.append(body["prompt"])
                ids.append(tokens)
                texts.append(c["text"])
                lps.append(lp)
                reasons.append(c["finish_reason"])
        return RolloutBatch(prompts, ids, texts, lps, reasons, group_size=sampling.n)

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probability of tokens 1..L-1 of each sequence under the server's weights (temperature 1)."""
        if any(len(seq) < 2 for seq in token_ids):
            raise ValueError("score needs sequences of at least 2 tokens")
        # vLLM 0.32: prompt logprobs are log_softmax of the raw logits whatever the logprobs mode,
        # and a request asking for them recomputes its prefix (no cached KV of older weights).
        bodies = [{"model": self.served, "prompt": list(s), "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": 0} for s in token_ids]
        answers = self._concurrently("/v1/completions", bodies, retry=True)
        scores = []
        for seq, answer in zip(token_ids, answers, strict=True):
            steps = answer["choices"][0]["prompt_logprobs"]  # [L]: None for token 0, then {"token id": {...}}
            scores.append([steps[t][str(seq[t])]["logprob"] for t in range(1, len(seq))])
        return scores

    # ------------------------------------------------------------------ weight push

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], probe: Probe | None,
                     version: int | None = None) -> None:
        """Rank 0 sends the weights through vLLM's weight-transfer API and checks them; every rank
        must call this (it iterates `named_tensors`, a collective under ZeRO-3) and every rank
        raises what rank 0 got: `WeightSyncError` for a failed check, `RolloutServerError` else.
        The server's weight version becomes `version` (the trainer's step), or the last one + 1."""
        version = self.weight_version + 1 if version is None else version
        outcome, tensors = None, iter(named_tensors)
        if self.rank == 0:
            try:
                self._push(tensors, probe, version)
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
        self.weight_version = version

    def _push(self, named_tensors, probe: Probe | None, version: int) -> None:
        start = time.perf_counter()
        sent, hashing = {}, 0.0

        def fingerprinted(items):
            nonlocal hashing
            for name, tensor in items:
                t = time.perf_counter()
                sent[name] = fingerprint(tensor)  # as the trainer holds it: the check covers the transport
                hashing += time.perf_counter() - t
                yield name, tensor

        # vLLM 0.32: mode=wait lets in-flight requests finish with the old weights; the caches of the
        # old weights are cleared before /pause returns (clear_cache, its default, marked deprecated)
        self._post("/pause?mode=wait")
        try:
            self._post("/start_weight_update")
            try:
                for chunk in chunks(fingerprinted(named_tensors), self.chunk_bytes):
                    specs = specs_of(chunk)
                    info = {"names": [s[0] for s in specs], "shapes": [list(s[1]) for s in specs],
                            "dtype_names": [s[2] for s in specs]}
                    buf = pack(chunk, self.device)  # [bytes]
                    self._while_posting("/update_weights", {"update_info": info}, lambda failed, buf=buf: collectives.broadcast_in(
                        self.group, buf, 0, self.timeout, f"the weight broadcast to {self.name}", stop=failed))
            except _ServerFailed:
                raise  # the server's engine has ended the update itself (vllm_plugin: update_weights)
            except Exception as err:
                # our side failed: the server's layers may sit on the meta device until the update ends
                _cleanup(err, self._post, "/finish_weight_update")
                raise
            self._post("/finish_weight_update", {"weight_version": str(version)})
            self.last_broadcast_seconds = time.perf_counter() - start
            t = time.perf_counter()
            # vLLM 0.32 /collective_rpc: {"results": [one per worker]}
            answer = self._post("/collective_rpc", {"method": "minigrpo_parameter_sums", "args": [sorted(sent)]})
            check_engine_sums([from_wire(r) for r in answer["results"]], sent)
            self.last_checksum_seconds = hashing + time.perf_counter() - t  # both sides' sums
        except Exception as err:
            _cleanup(err, self._post, "/resume")  # the error that ended the push is the one raised
            raise
        self._post("/resume")
        if probe is not None:
            self.verify(probe)
        self.last_push_seconds = time.perf_counter() - start

    def verify(self, probe: Probe) -> None:
        """Score `probe.token_ids`; raise `WeightSyncError` if any logprob is off by more than atol."""
        check_probe(self, probe, self.name)

    def _open_weight_channel(self) -> None:
        """Our TCPStore and group rank 0; the server's engine joins as rank 1 through
        `/init_weight_transfer_engine`, posted on a thread because both sides block until the other
        is there. The store takes a free port itself (no gap between choosing and binding it)."""
        delta, address = datetime.timedelta(seconds=self.timeout), self._address_seen_by_server()
        self.store = dist.TCPStore(address, 0, 2, True, delta, wait_for_workers=False)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        info = {"master_address": address, "master_port": self.store.port,
                "timeout_s": self.timeout, "backend": collectives.pair_backend()}

        def open_group():
            self.group = collectives.pair_group(self.store, 0, self.timeout)

        self._while_posting("/init_weight_transfer_engine", {"init_info": info}, lambda failed: open_group())

    def _while_posting(self, path: str, body: dict, work) -> None:
        """POST on a thread while `work(failed)` runs here: both block until the other side joins
        in. `failed()` tells `work` that the POST already failed, so it need not wait longer; that
        error is raised as a `_ServerFailed`."""
        result = {}

        def post():
            try:
                result["answer"] = self._post(path, body)
            except RolloutServerError as err:  # raised below, in the caller's thread
                result["error"] = err

        thread = threading.Thread(target=post, daemon=True, name=f"post {path}")
        thread.start()
        try:
            work(lambda: "error" in result)
        except (RuntimeError, TimeoutError) as err:
            thread.join(timeout=5)
            if "error" in result:  # the server's answer says why our side failed
                raise _ServerFailed(str(result["error"])) from err
            raise RolloutServerError(f"{self.name}: {path} did not complete: {type(err).__name__}: {err}") from err
        thread.join(timeout=self.timeout)
        if "error" in result:
            raise _ServerFailed(str(result["error"]))
        if thread.is_alive():
            raise RolloutServerError(f"{self.name} did not answer {path} within {self.timeout:.0f} s (vllm_server_timeout)")

    # ------------------------------------------------------------------ joining

    def _check_served(self, model_path, max_model_len: int | None) -> str:
        """Refuse a server that does not serve what this trainer trains, the way it needs it."""
        models = self._get("/v1/models")["data"]
        served = models[0]["id"]
        try:
            self._get("/is_paused")
        except RolloutServerError as err:
            raise RolloutServerError(f"{self.name} has no RL router ({err}); start it with "
                                     "python -m minigrpo.rollout.serve (it sets VLLM_SERVER_DEV_MODE=1)") from None
        try:
            info = self._post("/collective_rpc", {"method": "minigrpo_served"})["results"][0]
        except RolloutServerError as err:
            raise RolloutServerError(f"{self.name} lacks minigrpo's worker extension ({err}); start it with "
                                     "python -m minigrpo.rollout.serve") from None
        problems = []
        ours = str(model_path).rstrip("/")
        if info["model"].rstrip("/") != ours and os.path.basename(info["model"].rstrip("/")) != os.path.basename(ours):
            problems.append(f"model {info['model']} (the trainer trains {ours})")
        if info["dtype"] != self.dtype:
            problems.append(f"dtype {info['dtype']} (the trainer's rollout dtype is {self.dtype})")
        if max_model_len and info["max_model_len"] < max_model_len:
            problems.append(f"max_model_len {info['max_model_len']} (< max_prompt_length + max_completion_length "
                            f"= {max_model_len})")
        if info["logprobs_mode"] != "processed_logprobs":
            problems.append(f"logprobs mode {info['logprobs_mode']} (needs processed_logprobs: the log-probs of the "
                            "distribution sampled from)")
        if info["world_size"] != 1:
            problems.append(f"{info['world_size']} workers (the weight-transfer engine {BACKEND!r} serves one)")
        if info["weight_transfer"] != BACKEND:
            problems.append(f"weight transfer {info['weight_transfer']!r} (needs {BACKEND!r})")
        if problems:
            raise RolloutServerError(f"{self.name} serves " + "; ".join(problems))
        return served

    def _address_seen_by_server(self) -> str:
        """This machine's address on the route to the server (the store's address it connects to)."""
        host = self.base.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]

    # ------------------------------------------------------------------ HTTP

    def _get(self, path: str):
        return self._request("GET", path, None, retry=True)

    def _post(self, path: str, body: dict | None = None):
        return self._request("POST", path, body, retry=False)

    def _concurrently(self, path: str, bodies: list[dict], retry: bool) -> list:
        if len(bodies) == 1:
            return [self._request("POST", path, bodies[0], retry)]
        pool = ThreadPoolExecutor(min(len(bodies), MAX_CONCURRENT_REQUESTS))
        try:
            return list(pool.map(lambda b: self._request("POST", path, b, retry), bodies))
        finally:  # after an error, the queued requests are not sent (each would wait its own timeout)
            pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, method: str, path: str, body: dict | None, retry: bool):
        """One HTTP request with the secret and a `timeout`; a lost connection is retried once when
        `retry` (the request is safe to send twice). Errors name the server and what it answered."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        for attempt in (0, 1):
            req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
            try:
                with _HTTP.open(req, timeout=self.timeout) as r:
                    text = r.read().decode()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:1000]
                if err.code == 401:
                    raise RolloutServerError(f"{self.name} refused our secret: set ${AUTHKEY_ENV} to the one it was "
                                             "started with") from None
                raise RolloutServerError(f"{self.name} answered {method} {path.split('?')[0]} with {err.code}: {detail}") from None
            except (TimeoutError, socket.timeout):
                raise RolloutServerError(f"{self.name} did not answer {method} {path.split('?')[0]} within "
                                         f"{self.timeout:.0f} s (vllm_server_timeout)") from None
            except (urllib.error.URLError, ConnectionError, HTTPException) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise RolloutServerError(f"{self.name} did not answer {method} {path.split('?')[0]} within "
                                             f"{self.timeout:.0f} s (vllm_server_timeout)") from None
                if attempt == 0 and retry and not self._child_exited():
                    time.sleep(1.0)
                    continue
                raise RolloutServerError(f"{self.name} {self._state()} ({type(reason).__name__}: {reason})") from None

    def _state(self) -> str:
        if self._child_exited():
            return f"exited with code {self.child.returncode}" + (f"; its log: {self.log_path}" if self.log_path else "")
        return "is not reachable (it exited, crashed or is not listening)"

    def _child_exited(self) -> bool:
        return self.child is not None and self.child.poll() is not None

    def _set_server(self, status: dict) -> None:
        self.base, self.secret, self.pid, self.log_path = status["base"], status["secret"], status["pid"], status["log"]
        self.name = f"rollout server {self.base}" + (f" (pid {self.pid})" if self.pid else "")

    # ------------------------------------------------------------------ a server we start

    def _start(self, model_path, host, tensor_parallel_size, devices, dtype, max_model_len, log_level, log_path,
               launch) -> dict:
        env = server_env(secrets.token_hex(32), log_level)
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = server_gpus(
                devices, tensor_parallel_size, os.environ.get("CUDA_VISIBLE_DEVICES"),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if log_path is None:
            self._folder = tempfile.mkdtemp(prefix="minigrpo-rollout-")
            self.log_path = os.path.join(self._folder, "server.log")
        else:  # kept, with the run's other outputs
            self._folder, self.log_path = None, str(log_path)
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        launch = {k: v for k, v in launch.items() if k in _LAUNCH_OPTIONS}
        cmd = server_command(str(model_path), host=host, port=port, dtype=dtype or self.dtype,
                             max_model_len=max_model_len, log_level=log_level, **launch)
        supervisor = [sys.executable, "-m", "minigrpo.rollout.serve", "--watch-pid", str(os.getpid()), "--"]
        with open(self.log_path, "w") as log:
            # The supervisor kills the server's process group once this process is gone, however it
            # ends; in a session of its own, so that a signal to this job's process group (Ctrl-C,
            # a kill of the whole group) does not stop it before it has done so.
            self.child = subprocess.Popen([*supervisor, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        atexit.register(self._stop_child)
        print(f"[minigrpo] starting vLLM's server for the rollouts (pid {self.child.pid}); its log: {self.log_path}",
              flush=True)
        status = {"base": f"http://{_url_host(host)}:{port}", "secret": env[AUTHKEY_ENV], "pid": self.child.pid,
                  "log": self.log_path}
        self._set_server(status)
        deadline = time.monotonic() + self.timeout
        while True:
            if self._child_exited():
                raise RolloutServerError(f"{self.name} exited with code {self.child.returncode} while starting:\n"
                                         f"{_tail(self.log_path)}")
            try:
                _HTTP.open(urllib.request.Request(
                    self.base + "/health", headers={"Authorization": f"Bearer {self.secret}"}), timeout=5).close()
                return status
            except (urllib.error.URLError, ConnectionError, HTTPException, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RolloutServerError(f"{self.name} was not ready within {self.timeout:.0f} s (vllm_server_timeout):\n"
                                         f"{_tail(self.log_path)}")
            time.sleep(0.5)

    def _stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # the supervisor kills the server's process group
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()

    def close(self) -> None:
        """Stop a server we started (a joined one is left running) and drop the weight channel."""
        if self._closed:
            return
        self._closed = True
        self.group = self.store = None
        if self.child is not None:
            self._stop_child()
            if self._folder and self.child.returncode in (0, 143, -signal.SIGTERM):  # keep a failed server's log
                shutil.rmtree(self._folder, ignore_errors=True)


# Launch settings `serve.server_command` takes besides those named in VLLMServerEngine's signature.
_LAUNCH_OPTIONS = ("seed", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "trust_remote_code",
                   "enable_prefix_caching")


def _cleanup(err: BaseException, post, path: str) -> None:
    """A clean-up request after `err`: its own failure is added to `err` as a note, never raised in
    its place (the first error says what went wrong)."""
    try:
        post(path)
    except RolloutServerError as failed:
        err.add_note(f"then {path} failed too: {failed}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
