"""Atomic checkpoints: `checkpoints/step-000010/` exists only once it is complete.

A checkpoint folder holds:
    model/                 Hugging Face folder (config, safetensors, tokenizer): loads as-is in
                           transformers (`from_pretrained`) and vLLM. Full fine-tuning only.
    adapter/               LoRA only, instead of model/: the adapter in peft's format
                           (adapter_config.json, adapter_model.safetensors) plus the tokenizer;
                           with Q-LoRA also base_quantization.json (the 4-bit scheme and the
                           dtype the base was quantized from); `examples/export_merged.py`
                           writes the merged model.
    deepspeed/             DeepSpeed engine state: optimizer, LR schedule, (ZeRO) partitions
                           (with LoRA: the adapters and their optimizer state only).
    trainer_state.json     step, data position, skipped-step counters, and the settings that fix
                           the data order (checked on resume).
    rng_rank{r}.json / .safetensors   each rank's Python, NumPy and torch RNG states.

Writes go to `step-000010.tmp/` and are renamed when every rank has finished, so a run killed
mid-write leaves only a `.tmp` folder, which `latest_checkpoint` ignores and the next save removes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minigrpo import collectives, lora

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = output_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_rng(folder: Path, rank: int) -> None:
    np_state = np.random.get_state()
    json.dump(
        {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        open(folder / f"rng_rank{rank}.json", "w"),
    )
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))


def load_rng(folder: Path, rank: int) -> None:
    import ast

    state = json.load(open(folder / f"rng_rank{rank}.json"))
    random.setstate(_to_tuple(ast.literal_eval(state["python"])))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    tensors = load_file(str(folder / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def prune(output_dir: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; remove older ones and stale .tmp folders."""
    root = output_dir / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _NAME.match(p.name)))
    for _, p in found[:-keep]:
        shutil.rmtree(p)
    for p in root.glob("step-*.tmp"):  # half-written by a killed run: never complete, never used
        shutil.rmtree(p)


def save(output_dir: Path, step: int, policy, tokenizer, state: dict, rank: int, keep: int,
         adapter: dict | None = None, ahead: list | None = None) -> Path:
    """Write checkpoint `step` atomically; every rank calls it (the DeepSpeed save and the ZeRO-3
    gather are collective). `adapter` (LoRA): `lora.save_adapter`'s keyword arguments (rank, alpha,
    targets, base_model, quantize, dtype). `ahead` (async_generation): this rank's batches generated
    ahead of training (`Ahead.to_json`), written as ahead_rank{rank}.json."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():  # this step's, left by a run killed mid-write (prune removes the others)
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    collectives.barrier()
    policy.save_checkpoint(str(tmp / "deepspeed"), client_state=state)
    weights = {}
    wanted = None if adapter is None else lora.is_adapter_name  # LoRA: gather (ZeRO-3) and keep only the adapters
    for name, tensor in policy.full_weights(select=wanted):  # collective under ZeRO-3: every rank iterates
        if rank == 0:  # only rank 0 writes, so only it keeps a (CPU) copy; GPUs hold one chunk at most
            weights[name] = tensor.to("cpu", copy=True)
    if rank == 0:
        if adapter is None:
            policy.module.save_pretrained(tmp / "model", state_dict=weights)
            tokenizer.save_pretrained(tmp / "model")
        else:
            lora.save_adapter(tmp / "adapter", lora.peft_names(weights), **adapter)
            tokenizer.save_pretrained(tmp / "adapter")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    save_rng(tmp, rank)
    if ahead is not None:
        (tmp / f"ahead_rank{rank}.json").write_text(json.dumps(ahead))
    collectives.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # the commit point: before it the checkpoint does not exist
        prune(output_dir, keep)
    collectives.barrier()
    return final


def read_state(folder: Path) -> dict:
    """The trainer state of a checkpoint (step, data position, the settings resume checks)."""
    return json.loads((folder / "trainer_state.json").read_text())


def read_ahead(folder: Path, rank: int) -> list:
    """This rank's batches generated ahead of the checkpoint (async_generation); none in a checkpoint
    of a synchronous run, which then continues with generation ahead from its next step."""
    path = folder / f"ahead_rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else []


def restore(folder: Path, policy, rank: int) -> dict:
    """Load weights, optimizer, schedule and this rank's RNG; returns the trainer state."""
    state = read_state(folder)
    policy.load_checkpoint(str(folder / "deepspeed"))
    load_rng(folder, rank)
    return state
