"""minigrpo inside vLLM's own OpenAI-compatible server: a weight-transfer engine, a worker extension
and an authentication middleware. Runs in the server's processes only; the trainer side is
`server_engine.py`, the launch command `serve.py`.

- `TorchWeightTransferEngine`, backend "minigrpo": vLLM 0.32's RL router (`/init_weight_transfer_engine`,
  `/start_weight_update`, `/update_weights`, `/finish_weight_update`) moves weights through the
  engine chosen at launch (`--weight-transfer-config '{"backend": "minigrpo"}'`). vLLM's own engines
  are CUDA-only, so ours is a two-process torch.distributed group (trainer rank 0 = 0, the server's
  worker = 1) over the trainer's TCPStore: gloo between CPU processes, NCCL between GPUs; one packed
  uint8 broadcast per chunk (`packing.py`). The same code runs on both, and the CPU run is the tested one.
- `MinigrpoWorkerExtension` (`--worker-extension-cls`): our calls on the worker, reached through
  `/collective_rpc`: the exact bit sums of every weight the engine computes with (vLLM's
  `/weight_checker` hashes its own fused parameters, and on CPU the empty parameters left by
  packing, so it cannot be compared with the trainer's tensors), and the served settings the
  trainer checks when it joins.
- `RequireSecret` (`--middleware`): every HTTP request must carry `Authorization: Bearer <secret>`
  ($MINIGRPO_ROLLOUT_AUTHKEY). vLLM's `--api-key` guards /v1 only; the RL router and the dev
  endpoints (weight pushes, `/collective_rpc`) answer anyone who reaches the port.

Loaded in every vLLM process (API server, engine core, workers) by the `vllm.general_plugins`
entry point `minigrpo = "minigrpo.rollout.vllm_plugin:register"` (pyproject.toml), so the engine
core finds the backend when the worker builds its engine at model load. With vllm_engine.py, the
only file that touches vLLM internals; each coupling point says why.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# vLLM 0.32: the engine base class, its info dataclasses (parsed from the request JSON by
# `cls(**dict)`) and the factory the worker's `load_model` builds the configured engine with.
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from minigrpo import collectives
from minigrpo.rollout.packing import pack_layout, unpack
from minigrpo.rollout.push_check import to_wire
from minigrpo.rollout.serve import AUTHKEY_ENV, BACKEND, MIDDLEWARE
from minigrpo.rollout.vllm_engine import _finish_reload, _parameter_sums, _record_cpu_packing



def register() -> None:
    """The `vllm.general_plugins` entry point: called once in each vLLM process (a colocated
    engine's too), before any model loads. Registers the engine (the factory refuses a name
    twice, hence the check) and records the CPU packing of weights, which the exact check reads."""
    if BACKEND not in WeightTransferEngineFactory._registry:  # vLLM 0.32: no public "is registered"
        WeightTransferEngineFactory.register_engine(BACKEND, TorchWeightTransferEngine)
    if not torch.cuda.is_available():
        _record_cpu_packing()


@dataclass
class TorchInitInfo(WeightTransferInitInfo):
    """The body of `/init_weight_transfer_engine`: where the trainer's TCPStore listens."""

    master_address: str
    master_port: int
    timeout_s: float = 600.0
    backend: str = "gloo"  # the trainer's side of the group: "gloo" or "nccl" (both sides must agree)


@dataclass
class TorchUpdateInfo(WeightTransferUpdateInfo):
    """The body of one `/update_weights`: the chunk the trainer broadcasts next, as the specs of
    its packed layout (`packing.pack_layout`)."""

    names: list[str]
    shapes: list[list[int]]
    dtype_names: list[str]


class TorchWeightTransferEngine(WeightTransferEngine[TorchInitInfo, TorchUpdateInfo]):
    """Receives weights over a torch.distributed broadcast and loads them with vLLM's layerwise
    reload (what works on CPU, where linear layers compute with packed copies and a plain
    `load_weights` finds empty parameters). One worker (group rank 1): no tensor parallelism."""

    init_info_cls = TorchInitInfo
    update_info_cls = TorchUpdateInfo
    supports_draft_weight_update = False

    group = None

    def init_transfer_engine(self, init_info: TorchInitInfo) -> None:
        if init_info.backend != collectives.pair_backend():
            raise RuntimeError(f"the trainer's weight channel is {init_info.backend}, this server's "
                               f"{collectives.pair_backend()}: both on GPUs (NCCL) or both on CPUs (gloo)")
        # vLLM 0.32: parallel_config.world_size = tensor x pipeline parallel workers of this engine
        if self.parallel_config.world_size != 1:
            raise RuntimeError(f"weight transfer {BACKEND!r} serves one worker; this server has "
                               f"{self.parallel_config.world_size} (tensor parallelism is not supported)")
        timeout = datetime.timedelta(seconds=init_info.timeout_s)
        store = dist.TCPStore(init_info.master_address, init_info.master_port, 2, is_master=False, timeout=timeout)
        self.group, self.timeout = collectives.pair_group(store, 1, init_info.timeout_s), init_info.timeout_s

    def start_weight_update(self) -> None:
        # vLLM 0.32: puts every layer on the meta device and wraps its weight loaders; a layer is
        # re-materialized, loaded and re-packed once all of its weights arrived.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # vLLM 0.32: the base class parses the request body, then calls receive_weights; its worker
        # drops the update on any error without finalizing it, which would leave layers on the meta
        # device. So on any error here (a bad body too) the old weights of unfinished layers are put back.
        try:
            super().update_weights(update_info)
        except Exception:
            self.finish_weight_update()
            raise

    def receive_weights(self, update_info: TorchUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("update_weights before init_weight_transfer_engine")
        specs = list(zip(update_info.names, [tuple(s) for s in update_info.shapes], update_info.dtype_names, strict=True))
        buffer = torch.empty(pack_layout(specs)[1], dtype=torch.uint8, device=self.device)  # fresh: vLLM keeps views
        collectives.broadcast_in(self.group, buffer, 0, self.timeout, "a weight chunk's broadcast from the trainer")
        self.model.load_weights(iter(unpack(buffer, specs)))

    def finish_weight_update(self) -> None:
        # finalize_layerwise_reload puts back the old weights of layers that received nothing, and
        # the tied LM head's packed copy is re-made (see vllm_engine._finish_reload).
        _finish_reload(_WorkerView(self))

    def shutdown(self) -> None:
        self.group = None


class _WorkerView:
    """What vllm_engine's reload helpers read from a worker, from the engine's own fields."""

    def __init__(self, engine: TorchWeightTransferEngine):
        self.vllm_config, self.model_config, self._model = engine.vllm_config, engine.model_config, engine.model
        self.model_runner = self

    def get_model(self):
        return self._model


class MinigrpoWorkerExtension:
    """Mixed into vLLM's worker class (vLLM 0.32 appends it to the worker's bases and refuses a
    name the worker already has, hence the prefix). Called through `/collective_rpc`."""

    def minigrpo_parameter_sums(self, hf_names: list[str]) -> dict:
        return to_wire(_parameter_sums(self, hf_names))  # big ints as strings (msgpack)

    def minigrpo_served(self) -> dict:
        """What the trainer checks when it joins a server: the settings it generates with."""
        mc = self.model_config
        transfer = getattr(self.vllm_config, "weight_transfer_config", None)  # vLLM 0.32: None without the flag
        return {"model": mc.model, "dtype": str(mc.dtype).removeprefix("torch."), "max_model_len": mc.max_model_len,
                "logprobs_mode": str(mc.logprobs_mode), "weight_transfer": getattr(transfer, "backend", None),
                "world_size": self.parallel_config.world_size}


class RequireSecret:
    """ASGI middleware (vLLM 0.32 `--middleware` adds a class with `app.add_middleware(cls)`):
    refuses every HTTP request, on every path, without `Authorization: Bearer $MINIGRPO_ROLLOUT_AUTHKEY`.
    A server started without the secret in its environment refuses to start."""

    def __init__(self, app):
        secret = os.environ.get(AUTHKEY_ENV)
        if not secret:
            raise RuntimeError(f"{MIDDLEWARE} needs ${AUTHKEY_ENV}: the secret every request must carry")
        self.app, self.digest = app, hashlib.sha256(secret.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.digest)
            if not ok:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b'{"error": "Unauthorized: this minigrpo rollout server needs its secret"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
