"""Weights on the wire: named tensors packed into one uint8 buffer per broadcast, and back.

A chunk is described by its specs, `(name, shape, dtype name)` per tensor, which travel as JSON
(the `/update_weights` body); the bytes travel in one broadcast. Every tensor starts at a multiple
of `ALIGN` bytes, so any dtype can view its slice of the buffer in place. Used by the trainer side
(`server_engine.py`) and by the server side (`vllm_plugin.py`): one layout, one definition.
"""

from __future__ import annotations

import torch

ALIGN = 64  # byte offset of every tensor in a packed chunk


def pack_layout(specs: list[tuple[str, tuple[int, ...], str]]) -> tuple[list[int], int]:
    """Byte offsets of each (name, shape, dtype) in a packed chunk, and the chunk's size."""
    offsets, size = [], 0
    for _, shape, dtype in specs:
        offsets.append(size)
        nbytes = _numel(shape) * getattr(torch, dtype).itemsize
        size += -(-nbytes // ALIGN) * ALIGN
    return offsets, size


def specs_of(chunk: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in chunk]


def pack(chunk: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The tensors of `chunk` copied into one fresh uint8 buffer [bytes] on `device`, at `pack_layout`'s offsets."""
    offsets, total = pack_layout(specs_of(chunk))
    buf = torch.empty(total, dtype=torch.uint8, device=device)  # [bytes]
    for (_, t), off in zip(chunk, offsets, strict=True):
        flat = t.detach().reshape(-1).view(torch.uint8)
        buf[off: off + flat.numel()].copy_(flat)
    return buf


def unpack(buffer: torch.Tensor, specs) -> list[tuple[str, torch.Tensor]]:
    """Views of a received uint8 buffer as the named tensors (no copies)."""
    offsets, _ = pack_layout(specs)
    out = []
    for (name, shape, dtype), off in zip(specs, offsets, strict=True):
        dt = getattr(torch, dtype)
        n = _numel(shape) * dt.itemsize
        out.append((name, buffer[off: off + n].view(dt).view(shape)))
    return out


def chunks(named_tensors, max_bytes: int):
    """Group (name, tensor) pairs into lists of about `max_bytes` (a bigger tensor goes alone)."""
    chunk, size = [], 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"push_weights got {type(tensor).__name__} for {name!r}, expected a tensor")
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor.detach()))
        size += nbytes
    if chunk:
        yield chunk


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
