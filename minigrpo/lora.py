"""LoRA: low-rank adapters on a model's linear layers, and their files in peft's format.

Our own ~250 lines rather than the `peft` package: the adapters are one module class, the
reference is the same model with them switched off, and the push merges them into the weights the
rollout engine already takes. Parameter names stay the model's own (`...q_proj.weight`; the adapters
add `...q_proj.lora_A` / `...q_proj.lora_B`), so the chunked scoring path (`model.base_model`), the
weight push and the replica check need no wrapper-aware code. The files on disk are peft's
(`adapter_config.json`, `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight`),
so transformers, peft and vLLM load them.

Legend: r = lora_rank, s = lora_alpha / r. A LoRA linear computes
    y = x W^T + b + s * (x A^T) B^T,   A [r, in] (Kaiming-uniform), B [out, r] (zeros at the start)
so a fresh adapter changes nothing; merging writes W + s * B A.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from minigrpo import quantize

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Q-LoRA: the base's quantization the adapters were trained on (peft's files do not record it)
BASE_QUANTIZATION = "base_quantization.json"
_PEFT_PREFIX = "base_model.model."  # peft's names: base_model.model.<module path>.lora_A.weight


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; `enabled = False` is the base alone.

    It takes over the base layer's `weight` and `bias` Parameters (same objects, same names), so
    the module is a drop-in replacement wherever the Linear was."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in], frozen (Q-LoRA: bitsandbytes' packed 4-bit form)
        self.bias = base.bias  # [out] or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank  # s
        # a 4-bit base (bitsandbytes Linear4bit, minigrpo/quantize.py) computes, and the adapters
        # live, in its compute dtype
        self.compute_dtype = getattr(base, "compute_dtype", None) if quantize.is_4bit(base.weight) else None
        kw = dict(dtype=self.compute_dtype or base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is not None:
            y = quantize.linear_4bit(x, self.weight, self.bias, self.compute_dtype)  # [..., out]
        else:
            y = F.linear(x, self.weight, self.bias)  # [..., out]
        if not self.enabled:
            return y
        # s applied to the [..., r] product, not the [..., out] one: the same value, a smaller elementwise pass
        return y + F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)  # [..., r] -> [..., out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def default_targets(model: nn.Module) -> list[str]:
    """The leaf names of every `nn.Linear` inside the transformer blocks (q_proj, k_proj, ...,
    down_proj for Llama/Qwen2): the output head and embeddings stay untouched."""
    blocks = _blocks(model)
    return sorted({name.rsplit(".", 1)[-1] for b in blocks for name, m in b.named_modules() if isinstance(m, nn.Linear)})


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] | None = None) -> list[str]:
    """Freeze every parameter of `model` and put a `LoRALinear` on each Linear of its blocks whose
    leaf name is in `targets` (None: `default_targets`). Returns the adapted module paths.

    Raises:
        ValueError: rank < 1, or a target that matches no Linear of the blocks (a typo would
            otherwise train nothing).
    """
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    available = default_targets(model)
    targets = set(available if targets is None else targets)
    model.requires_grad_(False)
    matched = set()
    for block in _blocks(model):
        for path, module in list(block.named_modules()):
            leaf = path.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf in targets:
                parent = block.get_submodule(path.rsplit(".", 1)[0]) if "." in path else block
                setattr(parent, leaf, LoRALinear(module, rank, alpha))
                matched.add(leaf)
    if targets - matched:
        raise ValueError(f"lora_target_modules {sorted(targets - matched)} match no Linear in the model's blocks; "
                         f"it has {available}")
    return sorted(adapted_modules(model))


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (the reference policy: no second copy in memory)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name is an adapter's (`<path>.lora_A` / `<path>.lora_B`)."""
    return name.rpartition(".")[2] in ("lora_A", "lora_B")


def adapted_modules(model: nn.Module) -> set[str]:
    """Module paths of the model's `LoRALinear`s."""
    return {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged(named: Iterable[tuple[str, torch.Tensor]], adapted: set[str], scaling: float
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full weights in the base model's names from a stream of (name, tensor) that holds each
    adapted module's `weight`, `lora_A` and `lora_B` (in any order, possibly apart: a ZeRO-3
    gather's chunks may split a module; at most the parts of the modules in flight are held):
    `weight` becomes W + s * B A (computed in float32, cast back), the adapter tensors are dropped.

    Raises:
        ValueError: the stream ended with an adapted module missing a part.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        prefix, _, leaf = name.rpartition(".")
        if prefix not in adapted or leaf not in ("weight", "lora_A", "lora_B"):
            yield name, t
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = t
        if len(parts) == 3:
            w, a, b = parts["weight"], parts["lora_A"], parts["lora_B"]  # [out, in], [r, in], [out, r]
            yield f"{prefix}.weight", (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)  # [out, in]
            del pending[prefix]
    if pending:
        raise ValueError(f"adapted modules without all of weight/lora_A/lora_B: {sorted(pending)}")


def peft_names(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors from our names (`<path>.lora_A`) to peft's (`base_model.model.<path>.lora_A.weight`):
    A [r, in], B [out, r]; other tensors are left out."""
    return {f"{_PEFT_PREFIX}{name}.weight": t.contiguous() for name, t in named.items() if is_adapter_name(name)}


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float, targets: list[str],
                 base_model: str, quantize: str | None = None, dtype: str = "float32") -> None:
    """`folder/adapter_config.json` and `adapter_model.safetensors`, as peft writes a LoRA adapter;
    with a quantized base (Q-LoRA) also `base_quantization.json`, which `export_merged` reads: the
    scheme and `dtype`, the dtype the base was loaded in before quantizing (the 4-bit blocks' scales
    are computed from it, so the export must quantize from the same dtype to reproduce them)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if quantize is not None:
        (folder / BASE_QUANTIZATION).write_text(json.dumps({"lora_quantize": quantize, "dtype": dtype}))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "inference_mode": True,
    }, indent=1))


def read_adapter_config(folder: Path) -> dict:
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{folder}: only plain LoRA adapters are supported, got {config}")
    return config


def load_adapter_into(model: nn.Module, folder: Path) -> dict:
    """Add the adapters of `folder` (peft format) to `model` and load their weights; returns its config.

    Raises:
        ValueError: the adapter file misses an adapted module or has one the model lacks.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    add_adapters(model, config["r"], config["lora_alpha"], config["target_modules"])
    tensors = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    expected = {f"{_PEFT_PREFIX}{n}.weight" for n in params if n.rpartition(".")[2] in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        raise ValueError(f"{folder}: adapter tensors do not match the model: missing "
                         f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
    with torch.no_grad():
        for key, t in tensors.items():
            params[key[len(_PEFT_PREFIX):-len(".weight")]].copy_(t)
    return config


def merge_into_base(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain Linear holding W + s B A: a model transformers saves as usual."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=module.weight.dtype, device=module.weight.device)
            with torch.no_grad():
                w = module.weight.float() + module.scaling * (module.lora_B.float() @ module.lora_A.float())
                linear.weight.copy_(w.to(module.weight.dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, linear)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder's transformer blocks: `model.get_decoder().layers` (transformers' causal LMs:
    Llama, Qwen2, Mistral, ...). Not "the largest ModuleList": in a mixture of experts that is one
    layer's experts, in a vision-language model possibly the vision tower.

    Raises:
        ValueError: the model exposes no decoder layers this way.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__}: no decoder layers (model.get_decoder().layers) to put adapters in")
    return list(layers)


def adapter_folder(path: str | Path) -> Path | None:
    """The adapter folder of a LoRA checkpoint (`step-N/` or `step-N/adapter/`), or None for anything else."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    return None


def export_merged(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the base model with the adapter of `adapter_dir` merged in, as a plain Hugging Face
    folder (weights and tokenizer) that transformers and vLLM load. The base is the adapter's
    `base_model_name_or_path` (a local folder or a name `minigrpo.models.resolve_model` knows)."""
    from minigrpo.models import load_causal_lm, load_tokenizer, resolve_model

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = read_adapter_config(adapter_dir)
    base = resolve_model(config["base_model_name_or_path"])
    quantized = adapter_dir / BASE_QUANTIZATION
    if quantized.is_file():  # Q-LoRA: what the engine sampled from, dequantize(W_4bit) + s B A
        recorded = json.loads(quantized.read_text())
        # quantized from the training dtype; checkpoints written before it was recorded: from the
        # export's dtype, as the export then did (exact for runs trained in that dtype)
        _export_quantized(base, adapter_dir, out_dir, dtype, recorded["lora_quantize"], recorded.get("dtype", dtype))
    else:
        model = load_causal_lm(base, dtype)
        load_adapter_into(model, adapter_dir)
        merge_into_base(model).save_pretrained(out_dir)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    return out_dir


def _export_quantized(base: Path, adapter_dir: Path, out_dir: Path, dtype: str, quant: str, trained_dtype: str) -> None:
    """The merged weights of a Q-LoRA adapter over the 4-bit base, computed as the weight push does
    (the base loaded in `trained_dtype` and quantized as in training, dequantized, adapters merged),
    then cast to `dtype` and written as a plain folder: the tensors in one safetensors file, the
    base's own config (it has no quantization_config: the result is full precision)."""
    import shutil

    from safetensors.torch import save_file

    from minigrpo.models import load_causal_lm

    model = load_causal_lm(base, trained_dtype, quantize=quant, device="cpu")
    config = load_adapter_into(model, adapter_dir)
    tensors = merged(quantize.dequantized(model.named_parameters()), adapted_modules(model),
                     config["lora_alpha"] / config["r"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, dtype)
    save_file({name: t.to(cast).contiguous() for name, t in tensors}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out_dir / name)
