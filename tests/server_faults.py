"""Faults injected into vLLM's server (tests only): a worker extension that extends minigrpo's.

The test starts the server with `--worker-extension-cls server_faults.FaultyExtension` (PYTHONPATH
=tests) and switches a fault on through `/collective_rpc test_set_fault`: the next pushes then load
the weights wrongly, as a broken loader would, and the exact check must say so.

  skip   one tensor of the push is left out
  ulp    one element of one tensor is loaded one ulp off
  stale  the tied LM head's packed copy is not re-made after the push (vLLM-CPU packs it once)
"""

import torch

from minigrpo.rollout import vllm_plugin
from minigrpo.rollout.packing import unpack

NAME = "model.layers.1.self_attn.k_proj.weight"
_fault = {"kind": None}
_receive, _finish = vllm_plugin.TorchWeightTransferEngine.receive_weights, vllm_plugin._finish_reload


def _faulty_unpack(buffer, specs):
    out = unpack(buffer, specs)
    if _fault["kind"] == "skip":
        out = [(n, t) for n, t in out if n != NAME]
    elif _fault["kind"] == "ulp":
        out = [(n, _one_ulp(t) if n == NAME else t) for n, t in out]
    return out


def _one_ulp(t):
    t = t.clone()
    t.view(-1)[7] = torch.nextafter(t.view(-1)[7], torch.tensor(float("inf")))
    return t


def _finish_reload(view):
    if _fault["kind"] != "stale":
        return _finish(view)
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(view.vllm_config):  # without the re-pack of the tied head
        finalize_layerwise_reload(view.get_model(), view.model_config)


vllm_plugin.unpack = _faulty_unpack  # the names the engine looks up at call time
vllm_plugin._finish_reload = _finish_reload


class FaultyExtension(vllm_plugin.MinigrpoWorkerExtension):
    def test_set_fault(self, kind):
        _fault["kind"] = kind
        return kind
