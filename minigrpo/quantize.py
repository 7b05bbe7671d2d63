"""Q-LoRA's 4-bit base: the only file in minigrpo that imports bitsandbytes.

With `lora_quantize: nf4` the base model is loaded by transformers with bitsandbytes' NF4 4-bit
weights (double quantization, as the Q-LoRA paper and the seed notebook) for every Linear of the
transformer blocks; the output head and embeddings stay in `dtype`. The adapters (minigrpo/lora.py)
stay in `dtype` and train; the reference is the 4-bit base with the adapters off.

What the rollout engine samples from is the dequantized base plus the adapters: the engine loads
the full-precision checkpoint, so before step 1 and after every update the trainer pushes
dequantize(W_4bit) + s * B A for the adapted Linears and dequantize(W_4bit) for the rest. The exact
push check compares the bits of those tensors on both sides. On this CPU the trainer's own forward
computes with the same dequantized values (bitsandbytes 0.50's default CPU path dequantizes, then
multiplies), so engine and trainer agree as closely as without quantization. Elsewhere they may
not quite: where no gradient is needed (the reference pass, old log-probs, the first block under
LoRA) matmul_4bit takes gemm_4bit, which on CUDA can be a fused kernel (and on CPUs with
AVX512-BF16 a bf16 one, which `no_cpu_repacking` turns off). The weight-push probe measures the
engine/trainer gap at start-up, and `logprob_gap` every step, so a drift shows.

Checked against bitsandbytes 0.50.2 on CPU only (quantize, dequantize, matmul_4bit) and
transformers 5.19's BitsAndBytesConfig; the CUDA kernels are `make test-gpu`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

QUANT_TYPES = ("nf4",)


def quantization_config(dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for a 4-bit NF4 base computing in `dtype`. The blocks'
    Linears are quantized; transformers keeps `lm_head` in `dtype` (its default skip list)."""
    _require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def no_cpu_repacking(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes 0.50's CPU fast path in every Linear4bit of `model`: on a CPU with
    AVX512-BF16, a forward in eval mode without gradients (the reference pass, evaluation) repacks
    the weight in place into a bf16 layout and computes in bf16. Measured here: log-probs ~1e-2 off
    the fp32 computation, and `dequantize` then returns bf16 tensors the push would send."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes 0.50: Linear4bit's switch
            module.support_avx512bf16_for_cpu = False
    return model


def is_4bit(t: torch.Tensor) -> bool:
    """Whether `t` is a bitsandbytes 4-bit weight (a Params4bit: packed uint8 data plus a quant_state)."""
    return getattr(t, "quant_state", None) is not None


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
                ) -> torch.Tensor:
    """x W^T + b for a 4-bit W, as bitsandbytes' Linear4bit computes it in `compute_dtype` (without
    its CPU fast path: `no_cpu_repacking`). x [..., in] -> [..., out]."""
    import bitsandbytes as bnb

    inp_dtype = x.dtype
    bias = None if bias is None else bias.to(compute_dtype)
    return bnb.matmul_4bit(x.to(compute_dtype), weight, bias=bias, quant_state=weight.quant_state).to(inp_dtype)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The full-precision [out, in] tensor a 4-bit weight stands for (in its original dtype)."""
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(weight.data, weight.quant_state)


def dequantized(named: Iterable[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) with every 4-bit weight dequantized and everything else detached."""
    for name, p in named:
        yield name, dequantize(p) if is_4bit(p) else p.detach()


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "bitsandbytes":
            raise
        raise ImportError("lora_quantize: nf4 needs bitsandbytes: pip install 'minigrpo[qlora]' "
                          "(bitsandbytes>=0.50 runs 4-bit on CPUs as well as GPUs)") from None
