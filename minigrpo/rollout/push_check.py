"""The exact push check: does every weight a vLLM engine computes with equal the pushed tensors?

Pure: it compares numbers, and imports neither vLLM nor anything heavy, so the trainer side of the
server layout (no vLLM in that process) and the colocated engine run the same check. The numbers
come from the engine's workers (`vllm_engine._parameter_sums`, reached in-process by
`collective_rpc` or over HTTP through the worker extension in `vllm_plugin.py`) and from
`checksum.fingerprint` of each tensor the trainer pushed.
"""

from __future__ import annotations

import torch

from minigrpo.checksum import fused_row_weighted_sum
from minigrpo.rollout.base import Probe, WeightSyncError

# vLLM 0.32 stacks a fused parameter's parts along dim 0 in this order (QKVParallelLinear: q, k, v;
# MergedColumnParallelLinear: shard 0, 1, ...): the order the row-weighted check concatenates them in
FUSED_ORDER = {"q": 0, "k": 1, "v": 2}


def check_engine_sums(workers: list[dict], sent: dict[str, tuple[int, int, int, int]]) -> None:
    """Compare every weight the engine computes with, exactly, with the tensors pushed into it.

    `sent`: Hugging Face name -> `checksum.fingerprint` of the tensor the trainer pushed.
    `workers`: one `_parameter_sums` result per engine worker. Each sums the bits of its parameters
    (and of the packed copies a CPU engine computes with, see `vllm_engine._record_cpu_packing`).
    vLLM's fused parameters (qkv_proj = q, k, v; gate_up_proj = gate, up) sum to the sum of their
    parts; vocabulary padding is zeros, which add nothing. A parameter a worker holds whole (the
    numel that was sent) must also have the row-weighted sum of its parts concatenated in vLLM's
    fused order, which a transposed load or swapped parts (q and k, gate and up) change. Under
    tensor parallelism the shards of a split parameter add up over workers to the whole, with a KV
    head that R workers share counted R times (bits sums only: a shard's row positions are its
    own). A parameter that got no tensor, a tensor that reached no parameter, or any differing sum
    is a `WeightSyncError`."""
    targets = workers[0]["targets"]  # HF name -> (engine parameter, shard id); same on every worker
    unplaced = sorted(n for n in sent if targets.get(n) is None)
    if unplaced:
        raise WeightSyncError(f"cannot verify the push: no vLLM parameter takes {unplaced[:5]}"
                              + (f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else ""))
    parts: dict[str, list[tuple[str, object]]] = {}  # engine parameter -> [(HF name, shard id)]
    for hf_name, (name, shard) in targets.items():
        parts.setdefault(name, []).append((hf_name, shard))
    problems = []
    for entry, (_, _, _, param, _) in sorted(workers[0]["sums"].items()):
        if param not in parts:
            problems.append(f"{entry} received nothing")
            continue
        got = [w["sums"][entry] for w in workers]  # per worker: (bits sum, numel, KV replicas, param, row-weighted)
        ordered = sorted(parts[param], key=lambda part: FUSED_ORDER.get(part[1], part[1] or 0))
        whole = sum(sent[h][0] for h, _ in ordered)
        if all(numel == sum(sent[h][1] for h, _ in ordered) for _, numel, *_ in got):  # every worker holds it whole
            weighted = fused_row_weighted_sum([sent[h] for h, _ in ordered])
            bad = [bits for bits, *_ in got if bits != whole]
            moved = [w for *_, w in got if w != weighted]
            if bad:
                problems.append(f"{entry}: engine {bad[0]} != pushed {whole}")
            elif moved:
                problems.append(f"{entry}: the pushed elements are in other places (row-weighted sum {moved[0]} "
                                f"!= {weighted}: transposed, or fused parts swapped)")
            continue
        replicas = got[0][2]
        expected = sum(sent[h][0] * (replicas if shard in ("k", "v") else 1) for h, shard in parts[param])
        total = sum(bits for bits, *_ in got)
        if total != expected:
            problems.append(f"{entry}: engine {total} != pushed {expected}")
    if problems:
        raise WeightSyncError(f"{len(problems)} engine weight(s) differ from the pushed ones: "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))


def check_probe(engine, probe: Probe, name: str = "vLLM") -> None:
    """Score `probe.token_ids` with `engine`; raise `WeightSyncError` if any log-prob is off by more
    than the probe's atol (the check of what an exact parameter check cannot see, see `Probe`)."""
    if len(probe.expected) != len(probe.token_ids) - 1:
        raise ValueError(f"probe has {len(probe.token_ids)} tokens but {len(probe.expected)} expected values")
    got = torch.tensor(engine.score([list(probe.token_ids)])[0], dtype=torch.float64)  # [L-1]
    diff = (got - torch.tensor(probe.expected, dtype=torch.float64)).abs().max().item()
    if not diff <= probe.atol:  # also catches NaN
        raise WeightSyncError(f"{name}: probe logprobs differ from the policy's by {diff:.3g} > atol {probe.atol}")


def to_wire(result: dict) -> dict:
    """A `_parameter_sums` result as JSON/msgpack can carry it: vLLM's msgpack link refuses ints over
    64 bits, and our sums exceed that, so they travel as strings; tuples become lists."""
    return {"targets": {k: (list(v) if v is not None else None) for k, v in result["targets"].items()},
            "sums": {k: [str(bits), numel, replicas, param, str(weighted)]
                     for k, (bits, numel, replicas, param, weighted) in result["sums"].items()}}


def from_wire(result: dict) -> dict:
    """The inverse of `to_wire`."""
    return {"targets": {k: (tuple(v) if v is not None else None) for k, v in result["targets"].items()},
            "sums": {k: (int(bits), numel, replicas, param, int(weighted))
                     for k, (bits, numel, replicas, param, weighted) in result["sums"].items()}}
