"""Memory and disk, planned from the config and the model's config.json before anything loads
(`examples/countdown.py --plan`, and the check `train` makes on a GPU before loading the model).

Per GPU, in bytes, with P the model's parameters, T the trained ones (P, or LoRA's adapters), N the
training ranks, b the bytes of the training dtype (2 for bf16/fp16, 4 for float32):

    weights            P b (ZeRO-3: / N); Q-LoRA: the frozen base at 0.5625 bytes (4-bit + scales)
    gradients          T b (ZeRO-2/3: / N)
    fp32 gradients     16-bit: T 4, summed there over the micro-batches (ZeRO-1/2/3: / N at 2/3; and
                       at ZeRO-0 DeepSpeed's bf16 optimizer keeps an fp32 copy too)
    fp32 master        16-bit: T 4 (ZeRO-1/2/3: / N)
    AdamW              T 8 (ZeRO-1/2/3: / N)
    reference          beta > 0 without LoRA: P b (a whole copy on every GPU)
    activations        one micro-batch of L = max_prompt_length + max_completion_length tokens each:
                       with gradient checkpointing each layer keeps its input (L H b) plus one layer's
                       working set; without, every layer keeps ~(10 H + 3 I) L b. An ESTIMATE.
    LM-head chunk      3 x the chunk's float32 logits (~256 MB by default: logits, softmax, gradient)
    vLLM (colocated)   vllm_gpu_memory_utilization (0.5 by default) of the GPU, or its weights plus
                       vllm_kv_cache_gib. An ESTIMATE until a GPU run measures it. With vllm_sleep it
                       is freed while training, so it and the activations + LM-head chunk count once.

Checked on CPU against the bytes DeepSpeed holds (tests/test_plan.py): weights and AdamW (tiny model at
ZeRO-0 fp32 and ZeRO-2 bf16, SmolLM2-135M at ZeRO-0 fp32), gradients at ZeRO-0, the fp32 master at
ZeRO-2; the parameter counts against the loaded models. Not measured: gradients and the fp32
accumulation buffer at ZeRO-1/2/3, DeepSpeed's communication buckets, the activations and vLLM's share
(estimates until a GPU run checks them, docs/gpu.md); with Q-LoRA the base counts at 4 bits though the
embedding and head stay in the training dtype (an underestimate). A checkpoint holds the model (P b; LoRA: the adapter, T 4) and DeepSpeed's
state (16-bit: T 12 for the fp32 master and AdamW; float32: T 8), `save_total_limit` of them on disk.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from minigrpo.config import Config, load_deepspeed_config
from minigrpo.models import BUILTIN_MODELS
from minigrpo.scoring import CHUNK_LOGITS_BYTES

GiB = 2**30
SHIPPED = Path(__file__).resolve().parent / "data" / "model_configs"  # config.json of the recipes' models
def gpu_bytes(local_rank: int = 0) -> float | None:
    """This process's GPU memory in bytes, or None without CUDA."""
    import torch

    return float(torch.cuda.get_device_properties(local_rank).total_memory) if torch.cuda.is_available() else None


def model_config(cfg: Config, folder: Path | None = None):
    """The model's transformers config, with no model hub: from `folder` (the resolved model), a local
    folder named by cfg.model, one shipped for the recipes' models and the built-in one, or the Hugging
    Face cache. Its own class reads the file, so a model's own names (GPT-2's n_embd) resolve too."""
    from transformers import AutoConfig

    path = Path(folder or cfg.model).expanduser()
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    shipped = SHIPPED / f"{cfg.model.replace('/', '--')}.json"
    if shipped.is_file():
        return AutoConfig.for_model(**json.loads(shipped.read_text()))
    if cfg.model not in BUILTIN_MODELS:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model, "config.json")
        if isinstance(cached, str):
            return AutoConfig.from_pretrained(Path(cached).parent, trust_remote_code=cfg.trust_remote_code)
    raise FileNotFoundError(f"no config.json for {cfg.model!r}: pass a model folder, or download it once "
                            f"(`hf download {cfg.model} config.json`) so the hub cache holds it")


def count_parameters(config, cfg: Config) -> tuple[int, int]:
    """(all parameters, trained ones) of the model `config` (a transformers config) describes, built on
    the meta device (no memory), with the config's LoRA adapters if any."""
    import torch
    from transformers import AutoModelForCausalLM

    from minigrpo import lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        if cfg.lora_rank:
            lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trained


@dataclasses.dataclass(frozen=True)
class Plan:
    terms: dict[str, float]  # bytes per GPU, by what holds them
    gpu_bytes: float
    max_fraction: float
    checkpoint_bytes: float  # one checkpoint on disk
    kept_checkpoints: int
    kv: str  # whether vLLM's KV cache holds a step's sequences
    advice: list[str]  # what to change when it does not fit
    overlap: float = 0.0  # bytes of two terms that never coexist (vllm_sleep: vLLM's share vs training's working set)

    @property
    def total(self) -> float:
        return sum(self.terms.values()) - self.overlap

    @property
    def fits(self) -> bool:
        return self.total <= self.max_fraction * self.gpu_bytes


def plan_memory(cfg: Config, world_size: int, gpu_bytes: float, config,
                params: tuple[int, int] | None = None) -> Plan:
    """The per-GPU plan of a run of `cfg` on `world_size` training ranks of `gpu_bytes` each; `config`:
    the model's transformers config (`model_config`)."""
    total, trained = params or count_parameters(config, cfg)
    text = config.get_text_config()
    H, layers, V = text.hidden_size, text.num_hidden_layers, text.vocab_size
    I = getattr(text, "intermediate_size", None) or 4 * H  # GPT-2 style configs: 4 H unless n_inner  # noqa: E741
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    b = 4 if cfg.dtype == "float32" else 2
    sixteen = b == 2
    stage = int((load_deepspeed_config(cfg.deepspeed).get("zero_optimization") or {}).get("stage", 0))
    n = world_size
    layout = cfg.layout(world_size)
    frozen = total - trained
    t = {}
    if cfg.lora_quantize:
        t["weights"] = frozen * 0.5625 + trained * b
    else:
        t["weights"] = total * b / (n if stage == 3 else 1)
    t["gradients"] = trained * b / (n if stage >= 2 else 1)
    if sixteen:
        t["fp32 gradients"] = trained * 4 / (n if stage >= 2 else 1)
        t["fp32 master weights"] = trained * 4 / (n if stage >= 1 else 1)
    t["AdamW states"] = trained * 8 / (n if stage >= 1 else 1)
    if cfg.beta > 0 and not cfg.lora_rank:
        t["reference model"] = total * b
    tokens = layout.micro_batch * (cfg.max_prompt_length + cfg.max_completion_length)
    one_layer = tokens * (10 * H + 3 * I) * b
    t["activations (estimate)"] = layers * tokens * H * b + one_layer if cfg.gradient_checkpointing else layers * one_layer
    chunk = cfg.logprob_chunk_tokens * V * 4 if cfg.logprob_chunk_tokens else CHUNK_LOGITS_BYTES
    t["LM-head chunk"] = 3 * chunk
    kv_per_token = 2 * layers * kv_heads * head_dim * b
    vllm, kv = _vllm(cfg, layout, gpu_bytes, total * b, kv_per_token)
    if vllm:
        t["vLLM, colocated (estimate)"] = vllm
    overlap = 0.0
    if cfg.vllm_sleep:  # vLLM's share is freed while the activations and the LM-head chunk exist
        overlap = min(vllm, t["activations (estimate)"] + t["LM-head chunk"])
    checkpoint = (trained * 4 if cfg.lora_rank else total * b) + trained * (12 if sixteen else 8)
    advice = _advice(cfg, stage, n)
    return Plan(t, gpu_bytes, cfg.memory_max_fraction, checkpoint, cfg.save_total_limit, kv, advice, overlap)


def _vllm(cfg: Config, layout, gpu_bytes: float, weight_bytes: float, kv_per_token: int) -> tuple[float, str]:
    """(bytes colocated vLLM takes on a training GPU, 0 for the server or rollout=torch; whether its KV
    cache holds the sequences of one generate call: a rank's, or every rank's on the server)."""
    if cfg.rollout == "torch":
        return 0.0, "rollout: torch (no vLLM)"
    taken = 0.0
    if cfg.rollout == "vllm" and cfg.vllm_kv_cache_gib is not None:
        taken = weight_bytes + cfg.vllm_kv_cache_gib * GiB
        budget = cfg.vllm_kv_cache_gib * GiB
    elif cfg.rollout == "vllm":
        taken = (cfg.vllm_gpu_memory_utilization or 0.5) * gpu_bytes
        budget = taken - weight_bytes - GiB  # its weights and ~1 GiB of its own
    else:  # the server's own GPU
        budget = cfg.vllm_server_gpu_memory_utilization * gpu_bytes - weight_bytes - GiB
    seqs = (layout.prompts_per_rank if cfg.rollout == "vllm" else cfg.prompts_per_step) * cfg.num_generations
    length = cfg.max_prompt_length + cfg.max_completion_length
    need = seqs * length * kv_per_token
    fits = "all at once" if budget >= need else f"{max(int(budget // (need / seqs)), 0)} at a time"
    return taken, (f"vLLM's KV cache: {max(budget, 0) / GiB:.1f} GiB for {seqs} sequences of up to {length} tokens "
                   f"({need / GiB:.2f} GiB): {fits}")


def _advice(cfg: Config, stage: int, ranks: int) -> list[str]:
    """What lowers the plan, most effective first."""
    advice = []
    if stage < 3 and ranks > 1:
        advice.append("deepspeed=recipes/deepspeed_zero3.json (shards weights, gradients and AdamW over the ranks)")
    if not cfg.gradient_checkpointing:
        advice.append("gradient_checkpointing=true")
    if cfg.beta > 0 and not cfg.lora_rank:
        advice.append("beta=0 (no reference model)")
    if cfg.rollout == "vllm":
        advice.append("a smaller vllm_gpu_memory_utilization, or rollout=vllm_server on a GPU of its own")
    if not cfg.lora_rank:
        advice.append("lora_rank=16 (trains adapters only)")
    return advice + ["more gradient_accumulation_steps (smaller micro-batches)"]


def format_plan(plan: Plan, cfg: Config, world_size: int) -> str:
    lines = [f"memory per GPU: {cfg.model}, {world_size} training rank(s), {cfg.dtype}, "
             f"ZeRO-{(load_deepspeed_config(cfg.deepspeed).get('zero_optimization') or {}).get('stage', 0)}"]
    lines += [f"  {name:<28} {v / GiB:8.2f} GiB" for name, v in plan.terms.items()]
    if plan.overlap:
        lines.append(f"  {'vLLM asleep while training':<28} {-plan.overlap / GiB:8.2f} GiB  (vllm_sleep: not at once)")
    lines.append(f"  {'total':<28} {plan.total / GiB:8.2f} GiB of {plan.gpu_bytes / GiB:.1f} GiB "
                 f"({plan.total / plan.gpu_bytes:.0%}; limit {plan.max_fraction:.0%}): "
                 + ("fits" if plan.fits else "DOES NOT FIT"))
    lines.append(f"  {plan.kv}")
    lines.append(f"disk: {plan.checkpoint_bytes / GiB:.1f} GiB per checkpoint, up to {plan.kept_checkpoints} kept: "
                 f"{plan.checkpoint_bytes * plan.kept_checkpoints / GiB:.1f} GiB "
                 f"({plan.checkpoint_bytes * (plan.kept_checkpoints + 1) / GiB:.1f} GiB while a new one is written)")
    if not plan.fits:
        lines.append("to fit, try: " + "; ".join(plan.advice))
    return "\n".join(lines)


def check_plan(cfg: Config, plan: Plan, world_size: int, gpu_bytes: float | None) -> None:
    """Refuse, before any model loads, a run whose checkpoints do not fit the free disk, or (given the
    GPU's memory, and unless memory_check is off) whose planned memory does not fit the GPU."""
    check_disk(plan, cfg.output_dir)
    if gpu_bytes is not None and cfg.memory_check and not plan.fits:
        raise MemoryError("the planned memory does not fit this GPU (memory_check=false, or --force, runs it "
                          "anyway):\n" + format_plan(plan, cfg, world_size))


def check_disk(plan: Plan, output_dir: str) -> None:
    """Refuse a run whose checkpoints cannot fit the free disk of its output folder: save_total_limit are
    kept, and one more exists while a new one is written (checkpoint.save prunes after it); the run's own
    checkpoints already on disk (a resume) count as written."""
    folder = Path(output_dir).resolve()
    existing = len(list((folder / "checkpoints").glob("step-*"))) if (folder / "checkpoints").is_dir() else 0
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = max(plan.kept_checkpoints + 1 - existing, 1) * plan.checkpoint_bytes
    if need > free:
        raise RuntimeError(f"{output_dir}: {plan.kept_checkpoints} checkpoints of {plan.checkpoint_bytes / GiB:.1f} GiB "
                           f"kept (one more while saving, {existing} on disk already) need {need / GiB:.1f} GiB more; "
                           f"{free / GiB:.1f} GiB are free (lower save_total_limit)")


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '141g' or a number of bytes (GB and GiB both read as GiB: GPU memory is quoted so)."""
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    return float(s[:-1]) * GiB if s.endswith("g") else float(s)
