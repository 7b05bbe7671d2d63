"""The memory and disk plan (minigrpo/plan.py, `examples/countdown.py --plan`): parameter counts from
config.json alone, the weights/gradients/optimizer terms against what DeepSpeed really holds on CPU,
every shipped recipe planned, and a run that cannot fit refused with the numbers and what to change."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo import Config
from minigrpo.plan import GiB, check_plan, count_parameters, model_config, parse_bytes, plan_memory

ROOT = Path(__file__).resolve().parent.parent


def test_parameter_counts_from_config_json_alone():
    # the model cards' totals: Qwen2.5-0.5B 0.49B, 1.5B 1.54B, 3B 3.09B; SmolLM2-135M 134.5M (ENVIRONMENT.md)
    counts = {m: count_parameters(model_config(Config(model=m)), Config())[0]
              for m in ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct",
                        "smollm2-135m-instruct")}
    assert counts == {"Qwen/Qwen2.5-0.5B-Instruct": 494_032_768, "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
                      "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688, "smollm2-135m-instruct": 134_515_008}


def test_lora_counts_only_the_adapters_as_trained(tiny_model):
    config = model_config(Config(model=str(tiny_model)))
    total, trained = count_parameters(config, Config(lora_rank=4))
    # 2 layers x (q, k, v, o: 4 x (128 + 128) + gate, up: 2 x (128 + 256) + down: (256 + 128)) x rank 4
    assert trained == 2 * (4 * 256 + 2 * 384 + 384) * 4 == 17_408
    assert total == 332_288 + trained


@pytest.mark.slow
def test_the_count_is_the_loaded_models(model_path, tiny_model):
    from minigrpo.models import load_causal_lm

    for folder in (tiny_model, model_path):
        loaded = sum(p.numel() for p in load_causal_lm(folder).parameters())
        assert count_parameters(model_config(Config(model=str(folder))), Config())[0] == loaded


def _measured(model, stage, dtype):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_checks.py"), "alloc", str(model), stage, dtype],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[7:])


@pytest.mark.slow
@pytest.mark.parametrize("model, stage, dtype", [("tiny", "0", "float32"), ("tiny", "2", "bfloat16"),
                                                 ("smollm2", "0", "float32")])
def test_weights_gradients_and_optimizer_terms_are_what_deepspeed_holds(tiny_model, model_path, model, stage, dtype):
    """One rank, after one optimizer step, bytes measured from the tensors themselves (engine_checks.alloc):
    the tiny model at ZeRO-0 fp32 and ZeRO-2 bf16, SmolLM2-135M at ZeRO-0 fp32 (~2 GB of states)."""
    folder = Path(tiny_model if model == "tiny" else model_path)
    m = _measured(folder, stage, dtype)
    cfg = Config(dtype=dtype, deepspeed=None if stage == "0" else str(ROOT / "recipes" / "deepspeed_zero2.json"),
                 rollout="torch", prompts_per_step=1, num_generations=2, gradient_accumulation_steps=1)
    t = plan_memory(cfg, 1, 80 * GiB, model_config(Config(model=str(folder)))).terms
    assert t["weights"] == m["weights"] and t["AdamW states"] == m["adam"]
    if stage == "0":  # fp32 at ZeRO-0: the module's own gradients, no master copy
        assert t["gradients"] == m["module_gradients"] and "fp32 master weights" not in t and m["fp32_master"] == 0
    else:  # bf16 at ZeRO-2: DeepSpeed's fp32 partition is the master copy; gradients live in its buffers
        assert t["fp32 master weights"] == m["fp32_master"]


def _plan(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "countdown.py"), "--plan", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.process
@pytest.mark.parametrize("recipe, ranks", [("countdown_cpu.yaml", 1), ("countdown_cpu_learn.yaml", 1),
                                           ("countdown_cpu_solve.yaml", 1), ("qwen2.5-1gpu-countdown.yaml", 1),
                                           ("qwen2.5-3b-countdown.yaml", 4)])
def test_every_shipped_recipe_plans_and_fits_its_gpus(recipe, ranks):
    proc = _plan("--config", f"recipes/{recipe}", "--gpu-memory", "80GB", "--world-size", str(ranks))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "fits" in proc.stdout and "AdamW states" in proc.stdout and "per checkpoint" in proc.stdout


@pytest.mark.process
def test_a_run_that_cannot_fit_is_refused_with_the_numbers_and_what_to_change(tmp_path):
    # the 1-GPU recipe with the 3B model: ~86 GiB planned on an 80 GiB GPU (issue 24)
    proc = _plan("--config", "recipes/qwen2.5-1gpu-countdown.yaml", "model=Qwen/Qwen2.5-3B-Instruct", "--gpu-memory", "80GB")
    assert proc.returncode == 2 and "DOES NOT FIT" in proc.stdout and "to fit, try: beta=0" in proc.stdout, proc.stdout
    cfg = Config.load(str(ROOT / "recipes" / "qwen2.5-1gpu-countdown.yaml"),
                      ["model=Qwen/Qwen2.5-3B-Instruct", f"output_dir={tmp_path}", "save_total_limit=1"])
    config = model_config(cfg)
    # checkpoints of 1 byte: the memory is judged here, not this machine's free disk (tested below)
    plan = dataclasses.replace(plan_memory(cfg, 1, 80 * GiB, config), checkpoint_bytes=1)
    with pytest.raises(MemoryError, match=r"(?s)does not fit this GPU.*fp32 master weights.*86.40 GiB of 80.0 GiB.*to fit, try"):
        check_plan(cfg, plan, 1, 80 * GiB)  # what train() does on a GPU, before loading
    forced = Config.load(str(ROOT / "recipes" / "qwen2.5-1gpu-countdown.yaml"),
                         ["model=Qwen/Qwen2.5-3B-Instruct", f"output_dir={tmp_path}", "save_total_limit=1",
                          "memory_check=false"])
    check_plan(forced, dataclasses.replace(plan_memory(forced, 1, 80 * GiB, config), checkpoint_bytes=1), 1,
               80 * GiB)  # --force: planned, not refused
    check_plan(cfg, plan, 1, None)  # no GPU (this machine): memory is not judged
    # the disk: 40 GiB per 3B checkpoint, a thousand kept (and one more while saving) fit no disk here
    many = Config.load(str(ROOT / "recipes" / "qwen2.5-3b-countdown.yaml"), [f"output_dir={tmp_path}", "save_total_limit=1000"])
    with pytest.raises(RuntimeError, match=r"1000 checkpoints of 40.2 GiB kept \(one more while saving, 0 on disk"):
        check_plan(many, plan_memory(many, 4, 80 * GiB, config), 4, None)


def test_the_disk_check_counts_the_checkpoint_being_written_and_a_resumed_runs_own(tmp_path):
    """save_total_limit are kept and one more exists while a new one is written; a resumed run's own
    checkpoints are already on the disk, so they are not asked for again."""
    from minigrpo.plan import check_disk
    import shutil

    free = shutil.disk_usage(tmp_path).free
    cfg = Config(output_dir=str(tmp_path / "run"), save_total_limit=2)
    plan = plan_memory(cfg, 1, 80 * GiB, model_config(Config(model="smollm2-135m-instruct")))
    big = dataclasses.replace(plan, checkpoint_bytes=free / 2.5)  # 3 of them (2 kept + 1 being written) do not fit
    with pytest.raises(RuntimeError, match="need"):
        check_disk(big, cfg.output_dir)
    for step in (1, 2):  # a run that already wrote its 2 checkpoints: only the one being written is needed
        (tmp_path / "run" / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    check_disk(big, cfg.output_dir)


def test_a_model_the_plan_reads_by_its_own_config_class(tmp_path):
    """GPT-2 names its sizes n_embd, n_layer, n_head (and no intermediate size): its own config class
    resolves them (issue-24 review: the plan had read config.json's keys and failed on such models)."""
    from transformers import GPT2Config

    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64).save_pretrained(tmp_path)
    cfg = Config(model=str(tmp_path), rollout="torch")
    plan = plan_memory(cfg, 1, 80 * GiB, model_config(cfg))
    # parameters: wte 100x64 + wpe 64x64 + 2 blocks x (2 LayerNorms 4x64 + attn 64x192 + 192 + 64x64 + 64
    #             + MLP 64x256 + 256 + 256x64 + 64) + final LayerNorm 2x64 (the head is tied)
    params = 100 * 64 + 64 * 64 + 2 * (4 * 64 + 64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64) + 2 * 64
    assert plan.terms["weights"] == 4 * params and plan.terms["AdamW states"] == 8 * params


def test_gpu_memory_is_read_as_gib():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == parse_bytes("80g") == 80 * GiB and parse_bytes("1024") == 1024


def test_a_sleeping_vllm_and_the_training_working_set_count_once():
    cfg = Config.load(str(ROOT / "recipes" / "qwen2.5-1gpu-countdown.yaml"))
    config = model_config(cfg)
    awake = plan_memory(cfg, 1, 80 * GiB, config)
    asleep = plan_memory(Config.load(str(ROOT / "recipes" / "qwen2.5-1gpu-countdown.yaml"), ["vllm_sleep=true"]), 1,
                         80 * GiB, config)
    t = awake.terms
    assert asleep.total == pytest.approx(awake.total - min(t["vLLM, colocated (estimate)"],
                                                           t["activations (estimate)"] + t["LM-head chunk"]))
    assert asleep.overlap > 0 == awake.overlap
