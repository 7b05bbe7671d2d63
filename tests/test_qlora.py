"""Q-LoRA (`lora_quantize: nf4`, minigrpo/quantize.py): adapters on bitsandbytes' 4-bit base. The
math of a 4-bit LoRA linear, the reference (4-bit base, adapters off), the merged weights the engine
receives (dequantized base + adapters), and runs through the trainer on the tiny model: it learns
with every push checked exactly, resumes exactly at ZeRO-0 and ZeRO-2, exports a plain model,
and runs in bfloat16. bitsandbytes >= 0.46 runs 4-bit on CPUs, so all of it runs here."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from minigrpo import lora, quantize
from minigrpo.config import Config, ConfigError
from minigrpo.models import load_causal_lm
from minigrpo.scoring import completion_logprobs
from test_lora import BLOCK_LINEARS, COMPLETIONS, PROMPTS, lora_model_dir, run  # noqa: F401 (fixture)

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parent.parent


def quantized(model_dir, dtype=torch.float32):
    return load_causal_lm(model_dir, dtype, quantize="nf4", device="cpu")


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def logprobs(model):
    with torch.no_grad():
        return completion_logprobs(model, PROMPTS, COMPLETIONS)  # [2, 4]


def test_a_4bit_lora_linear_is_the_dequantized_base_plus_the_adapter(lora_model_dir):
    model = quantized(lora_model_dir)
    assert lora.default_targets(model) == BLOCK_LINEARS  # bitsandbytes' Linear4bit is an nn.Linear
    names = lora.add_adapters(model, 4, 8.0)
    assert len(names) == 2 * 7
    randomize_b(model)
    layer = model.get_submodule(names[0])
    assert quantize.is_4bit(layer.weight) and layer.weight.dtype == torch.uint8
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # the compute dtype
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter_name(n) for n in trainable)
    x = torch.randn(3, 5, layer.in_features)
    w = quantize.dequantize(layer.weight)  # [out, in]
    assert w.shape == (layer.out_features, layer.in_features) and w.dtype == torch.float32
    expected = F.linear(x, w, layer.bias) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # NF4 is a real approximation of the weights (~7% relative error per weight on this model)
    original = load_causal_lm(lora_model_dir).get_submodule(names[0]).weight
    assert 0.01 < ((w - original).norm() / original.norm()).item() < 0.2
    # the gradients through the 4-bit matmul are those of the dequantized formula, for the adapters
    # and for the input (what flows on to earlier layers)
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    up = torch.randn(3, 5, layer.out_features)  # a non-uniform upstream gradient
    (layer(x1) * up).sum().backward()
    ((F.linear(x2, w, layer.bias) + layer.scaling * (x2 @ a.T) @ b.T) * up).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0
    torch.testing.assert_close(layer.lora_A.grad, a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_reference_is_the_4bit_base_and_the_push_is_the_model_sampled(lora_model_dir):
    """Adapters off = a separately loaded 4-bit base, bit for bit (NF4 quantization is deterministic);
    the merged weights (what the push sends) loaded into the plain model give the Q-LoRA model's
    log-probs."""
    model = quantized(lora_model_dir)
    lora.add_adapters(model, 4, 8.0)
    randomize_b(model)
    with lora.adapters_disabled(model):
        off = logprobs(model)
    assert torch.equal(off, logprobs(quantized(lora_model_dir)))
    on = logprobs(model)
    assert (on - off).abs().max() > 1e-3  # the adapters matter
    weights = dict(lora.merged(quantize.dequantized(model.named_parameters()), lora.adapted_modules(model),
                               model.get_submodule(sorted(lora.adapted_modules(model))[0]).scaling))
    assert not any(lora.is_adapter_name(n) for n in weights) and all(t.dtype == torch.float32 for t in weights.values())
    plain = load_causal_lm(lora_model_dir)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, missing  # tied to the embeddings
    torch.testing.assert_close(logprobs(plain), on, atol=1e-5, rtol=1e-5)


def test_qlora_settings_are_checked_before_loading():
    with pytest.raises(ConfigError, match="needs lora_rank > 0"):
        Config(lora_quantize="nf4")
    with pytest.raises(ConfigError, match="must be nf4"):
        Config(lora_rank=8, lora_quantize="int8")
    with pytest.raises(ConfigError, match="ZeRO stage 0-2"):
        Config(lora_rank=8, lora_quantize="nf4", deepspeed=str(ROOT / "recipes" / "deepspeed_zero3.json"))
    Config(lora_rank=8, lora_quantize="nf4", deepspeed=str(ROOT / "recipes" / "deepspeed_zero2.json"))


QLORA = ("rollout=vllm", "lora_rank=8", "lora_alpha=16", "learning_rate=1e-2", "beta=0.04", "lora_quantize=nf4")


@pytest.mark.slow
def test_qlora_learns_with_every_push_checked(lora_model_dir, tmp_path):
    """30 steps with vLLM: every push (dequantized base + adapters, the first before step 1) is
    checked exactly, and the engine's log-probs stay within float noise of the trainer's."""
    rows = run(lora_model_dir, tmp_path / "learn", *QLORA)
    curve = [round(r["reward/says_a/mean"], 3) for r in rows]
    assert rows[0]["reward/says_a/mean"] < 0.1 and sum(curve[-5:]) / 5 > 0.8, curve
    assert rows[-1]["kl"] > 0  # the reference (the 4-bit base) is used
    gaps = [r["logprob_gap"] for r in rows if isinstance(r["logprob_gap"], float)]
    assert gaps and max(gaps) < 1e-3, gaps


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["0", "2"])
def test_qlora_resumes_exactly_and_exports(lora_model_dir, tmp_path, stage):
    common = (*QLORA, "max_steps=4") + (() if stage == "0" else (f"deepspeed={ROOT}/recipes/deepspeed_zero2.json",))
    ranks = 1 if stage == "0" else 2
    full = run(lora_model_dir, tmp_path / "full", *common, "save_steps=2", ranks=ranks)
    # resumed from a copy of the run's step-2 checkpoint, as test_zero.py does (a separate 2-step run
    # cost one more launch; the assertions compare step 4 only)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    resumed = run(lora_model_dir, tmp_path / "resumed", *common, "save_steps=2", "--resume", ranks=ranks)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("reward/says_a/mean", "kl", "grad_norm", "param_checksum"):
        assert resumed[3][key] == pytest.approx(full[3][key], rel=1e-6, abs=1e-9), key
    folder = tmp_path / "full" / "checkpoints" / "step-000004"
    adapter = folder / "adapter"
    assert not (folder / "model").exists()
    assert json.loads((adapter / lora.BASE_QUANTIZATION).read_text()) == {"lora_quantize": "nf4", "dtype": "float32"}
    if stage == "0":
        # the export is what the engine sampled from: the Q-LoRA model's log-probs, in a plain folder
        out = lora.export_merged(adapter, tmp_path / "merged")
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        exported = load_causal_lm(out)
        qlora = quantized(lora_model_dir)
        lora.load_adapter_into(qlora, adapter)
        torch.testing.assert_close(logprobs(exported), logprobs(qlora), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_qlora_in_bfloat16(lora_model_dir, tmp_path):
    """bf16 compute over the 4-bit base (the GPU setting), on CPU with the torch engine: finite
    losses, the reference used, adapters in bf16."""
    rows = run(lora_model_dir, tmp_path / "bf16", "rollout=torch", "dtype=bfloat16", "lora_rank=8", "lora_alpha=16",
               "learning_rate=1e-2", "beta=0.04", "lora_quantize=nf4", "max_steps=3")
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in rows)
    assert rows[-1]["kl"] > 0
    # the export quantizes the base from bf16, as training did, then casts: a float32 export holds
    # bf16 values (quantized from float32 instead, the dequantized blocks would not be)
    adapter = tmp_path / "bf16" / "checkpoints" / "step-000003" / "adapter"
    assert json.loads((adapter / lora.BASE_QUANTIZATION).read_text()) == {"lora_quantize": "nf4", "dtype": "bfloat16"}
    out = lora.export_merged(adapter, tmp_path / "merged", dtype="float32")
    tensors = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(torch.equal(t, t.to(torch.bfloat16).float()) for t in tensors.values())
