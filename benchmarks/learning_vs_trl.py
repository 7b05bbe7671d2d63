"""Does minigrpo's GRPO teach as much as TRL's GRPOTrainer, in less time? One learning run per side.

    .venv/bin/pip install -e .[bench]      # once: adds TRL (pinned), changes no installed version
    .venv/bin/python benchmarks/learning_vs_trl.py [--steps 20] [--k 8] [--out outputs/learning_vs_trl]

Both sides start from the same checkpoint: the supervised warm-up of
recipes/countdown_cpu_solve_warmup.yaml (trained first when --start does not exist). Both train on the
same tasks in the same order: the train split of recipes/countdown_cpu_solve.yaml, in minigrpo's
schedule. Both use that recipe's rewards and weights, group size, prompts per step, micro-batches,
learning rate and schedule, AdamW betas, clipping, temperature, loss type and reward scaling, for
--steps optimizer steps. Settings without a counterpart passed to TRL are refused (see UNMATCHED).

Each side runs in its own process, one after the other:
- minigrpo through `examples/countdown.py` (the user's command);
- TRL through `_trl_side.py` (vLLM colocate in float32, as benchmarks/vs_trl.py explains).

Both are scored by `examples/evaluate_countdown.py` on the fixed held-out set countdown-3x99 (640
tasks, never trained on):
- greedy at the start (the shared checkpoint), at the middle and at the end;
- pass@k at the end;
- each side paired against the start, and TRL's end paired against minigrpo's end on the same
  tasks. Since both start from one checkpoint, that last difference is TRL's gain minus ours.

A step is timed as in vs_trl.py, from the start of its rollout to the end of its optimizer step
(and weight push), so checkpoints and evaluations are excluded.

It resumes from what is on disk, so a side may run in another session. Each stage writes one file
under --out and is skipped when that file is there. minigrpo's training continues from its latest
checkpoint (`--resume`, exact); TRL's restarts (it saves the model only). Delete a stage's file to
redo it. The table is printed again from the files at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPE = ROOT / "recipes" / "countdown_cpu_solve.yaml"
WARMUP_RECIPE = ROOT / "recipes" / "countdown_cpu_solve_warmup.yaml"
TASKS = "countdown-3x99"
SIDES = ("minigrpo", "trl")
LABELS = {"minigrpo": "minigrpo (vLLM)", "trl": "TRL (vLLM colocate)"}
# Environment of every process, as vs_trl.py (OMP_WAIT_POLICY=PASSIVE: see ENVIRONMENT.md).
ENV = {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# Recipe settings TRL's side gets (_trl_side.grpo_config_kwargs maps them onto GRPOConfig; the
# prompt settings shape the prompts file and vLLM's model length).
MATCHED = ("prompts_per_step", "num_generations", "gradient_accumulation_steps", "max_prompt_length",
           "max_completion_length", "beta", "temperature", "top_p", "top_k", "learning_rate",
           "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "adam_beta1", "adam_beta2", "weight_decay",
           "loss_type", "scale_rewards", "epsilon", "seed", "rewards", "reward_weights")
# Recipe settings whose TRL counterpart this benchmark does not set, or sets with other semantics:
# the recipe must leave each at the value where both sides agree, or the comparison would not be like
# for like. warmup_ratio: HF ramps from lr 0 (step / w) and its "constant" ignores warmup, minigrpo
# ramps (s + 1) / (w + 1). weight_decay: HF exempts biases and norms, minigrpo decays every parameter.
UNMATCHED = {"num_iterations": 1, "dynamic_sampling": False, "rollout_correction": "none",
             "entropy_coef": 0.0, "importance_sampling_level": "token", "epsilon_high": None,
             "advantage_eps": 1e-4, "stop": [], "lora_rank": 0, "dtype": "float32", "rollout": "vllm",
             "deepspeed": None, "warmup_ratio": 0.0, "weight_decay": 0.0}
# Loss types both normalize alike: "bnpo" is per micro-batch in TRL 1.16, per step in minigrpo.
SAME_LOSS = ("grpo", "dr_grpo")


def check_matched(cfg) -> None:
    """Refuse a recipe with a setting TRL's side would not get alike (see UNMATCHED, SAME_LOSS)."""
    wrong = {k: getattr(cfg, k) for k, v in UNMATCHED.items() if getattr(cfg, k) != v}
    if cfg.loss_type not in SAME_LOSS:
        wrong["loss_type"] = cfg.loss_type
    if wrong:
        raise SystemExit(f"learning_vs_trl: the recipe sets {wrong}, which TRL's side does not get alike; "
                         f"this benchmark compares only at {UNMATCHED} with loss_type in {SAME_LOSS}")


def trl_settings(cfg, start: str, out: Path, steps: int, threads: int) -> dict:
    """The settings file of TRL's side: the recipe's MATCHED settings, where to read its prompts and
    where to save its model (at the middle and the end)."""
    return {**{k: getattr(cfg, k) for k in MATCHED}, "model_path": start, "steps": steps,
            "save_steps": steps // 2, "threads": threads, "output_dir": str(out / "trl"),
            "prompts_file": str(out / "trl_prompts.jsonl"),
            # TRL's colocated KV cache: a fraction of the NUMA node on CPU (about 2 GiB here,
            # as minigrpo's CPU default vllm_kv_cache_gib).
            "vllm_gpu_memory_utilization": 0.3}


def checkpoint(side: str, out: Path, step: int) -> Path:
    """The model folder each side saved at `step`."""
    if side == "minigrpo":
        return out / "minigrpo" / "checkpoints" / f"step-{step:06d}" / "model"
    return out / "trl" / f"checkpoint-{step}"


# ------------------------------------------------------------------------------------- stages


def check_manifest(out: Path, identity: dict) -> None:
    """The stage files in `out` belong to one run: refuse to mix them with another's settings."""
    path = out / "run.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != identity:
            changed = {k: (earlier.get(k), v) for k, v in identity.items() if earlier.get(k) != v}
            raise SystemExit(f"learning_vs_trl: {out} holds a run with other settings {changed} (was, now); "
                             f"use another --out or delete it")
    else:
        path.write_text(json.dumps(identity, indent=1))


def run(cmd: list[str], log: Path, threads: int) -> None:
    """One stage in a fresh process (vLLM and DeepSpeed keep global state), output in `log`; a
    failure ends the benchmark with the end of that log."""
    env = dict(os.environ, **ENV, OMP_NUM_THREADS=str(threads))
    print(f"[learning_vs_trl] {' '.join(cmd[1:3])} ... (log: {log}; load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores)", flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            code = child.wait()
        finally:  # Ctrl-C or a kill of this process ends the stage too
            if child.poll() is None:
                child.terminate()
                child.wait()
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"[learning_vs_trl] FAILED (exit {code}): {' '.join(cmd)}\nend of {log}:\n{tail}")
    print(f"[learning_vs_trl]   done in {time.perf_counter() - t:.0f} s", flush=True)


def evaluate(model: Path, result: Path, k: int, out: Path, threads: int, compare: Path | None = None,
             kl_to: str | None = None) -> None:
    if result.exists():
        return
    cmd = [sys.executable, "examples/evaluate_countdown.py", "--config", str(RECIPE), "--tasks", TASKS,
           "--model", str(model), "--k", str(k), "--samples", "0", "--json", str(result)]
    cmd += (["--compare", str(compare)] if compare else []) + (["--kl-to", kl_to] if kl_to else [])
    run(cmd, out / f"{result.stem}.log", threads)


def train_minigrpo(start: str, out: Path, steps: int, threads: int) -> None:
    run_dir = out / "minigrpo"
    if checkpoint("minigrpo", out, steps).exists():
        return
    cmd = [sys.executable, "examples/countdown.py", "--config", str(RECIPE), "--model", start,
           "--output-dir", str(run_dir), f"max_steps={steps}", f"save_steps={steps // 2}",
           "eval_num_samples=0"]  # TRL's side has no in-run evaluation either
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    run(cmd + (["--resume"] if resume else []), out / "minigrpo.log", threads)


def train_trl(cfg, start: str, out: Path, steps: int, threads: int) -> None:
    result = out / "trl.json"
    if result.exists():
        return
    from transformers import AutoTokenizer
    from vs_trl import in_minigrpo_order

    from minigrpo.data import load_recipe_tasks

    settings = trl_settings(cfg, start, out, steps, threads)
    prompts = in_minigrpo_order(load_recipe_tasks(cfg)["train"], AutoTokenizer.from_pretrained(start),
                                cfg.prompts_per_step, steps, cfg.seed)
    prompts.to_json(settings["prompts_file"])
    (out / "trl_settings.json").write_text(json.dumps(settings, indent=1))
    run([sys.executable, str(HERE / "_trl_side.py"), str(out / "trl_settings.json"), str(result), "--vllm"],
        out / "trl.log", threads)


# ------------------------------------------------------------------------------------- the table


def step_times(side: str, out: Path) -> list[dict]:
    """Per step: seconds and completions generated, from each side's own record."""
    if side == "minigrpo":
        rows = [json.loads(x) for x in (out / "minigrpo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        by_step = {r["step"]: r for r in rows if "time/step" in r}  # a resumed run rewrites its steps
        return [{"step": s, "seconds": r["time/step"], "completions": r["batch/completions"]}
                for s, r in sorted(by_step.items())]
    res = json.loads((out / "trl.json").read_text())
    settings = json.loads((out / "trl_settings.json").read_text())
    per_step = settings["prompts_per_step"] * settings["num_generations"]  # TRL generates exactly this
    return [{"step": s["step"], "seconds": s["seconds"], "completions": per_step} for s in res["steps"]]


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"eval-{name}.json").read_text())


def _cell(e: dict, key: str = "success") -> str:
    s = e["summary"]["all"][key]
    return f"{s['rate']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def _frac(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(out: Path, steps: int, k: int) -> dict:
    """Print the benchmark's tables from the stage files in `out`; return them as a dict."""
    table = {"start": _load(out, "start")["without_stop"]["summary"]["all"]}
    timing = {side: step_times(side, out) for side in SIDES}
    table.update(_success_table(out, steps, timing))
    table["paired"] = _paired_block(out, steps, k)
    table["audit"] = _audit_block(out)
    end = {side: _load(out, f"end-{side}")["without_stop"] for side in SIDES}
    if f"pass@{k}" in end["trl"]["summary"]["all"]:
        print(f"\n== pass@{k} at the end (temperature 1.0) ==")
        for side in SIDES:
            print(f"  {LABELS[side]:22s} {_cell(end[side], f'pass@{k}')}")
    walls = {side: sum(t["seconds"] for t in timing[side]) for side in SIDES}
    print(f"\n== training time, {steps} steps (sum of step times) ==")
    for side in SIDES:
        print(f"  {LABELS[side]:22s} {walls[side]:7.0f} s")
    print(f"  TRL / minigrpo: {walls['trl'] / walls['minigrpo']:.2f}x")
    table["step_seconds_total"] = walls
    return table


def _success_table(out: Path, steps: int, timing: dict) -> dict:
    """Step, greedy success per side with its interval, completions generated, seconds per step."""
    start = _load(out, "start")["without_stop"]
    print(f"\n== held-out greedy success, {TASKS} ({start['summary']['all']['success']['tasks']} tasks), "
          f"95% Wilson intervals; seconds per step ==")
    print(f"  {'step':>4s}  {'minigrpo':>24s}  {'TRL':>24s}  {'completions':>11s}  {'s/step mg':>9s}  {'s/step TRL':>10s}")
    print(f"  {0:>4d}  {_cell(start):>24s}  {_cell(start):>24s}  {0:>11d}  {'':>9s}  {'':>10s}")
    rows = {}
    for step, name in ((steps // 2, "mid"), (steps, "end")):
        e = {side: _load(out, f"{name}-{side}")["without_stop"] for side in SIDES}
        upto = {side: [t for t in timing[side] if t["step"] <= step] for side in SIDES}
        done = {side: sum(t["completions"] for t in upto[side]) for side in SIDES}
        secs = {side: sum(t["seconds"] for t in upto[side]) / len(upto[side]) for side in SIDES}
        print(f"  {step:>4d}  {_cell(e['minigrpo']):>24s}  {_cell(e['trl']):>24s}  "
              f"{done['minigrpo']:>5.0f}/{done['trl']:<5.0f}  {secs['minigrpo']:>9.1f}  {secs['trl']:>10.1f}")
        rows[name] = {side: e[side]["summary"]["all"] for side in SIDES}
    print("  (completions: minigrpo/TRL, generated up to that step; s/step: mean over steps 1..step)")
    return rows


def _paired_block(out: Path, steps: int, k: int) -> dict:
    """Each side's gain over the start, and TRL's minus ours at the middle and the end, paired per task."""
    from minigrpo.stats import paired_difference

    e = {name: _load(out, name)["without_stop"] for name in
         ("start", "mid-minigrpo", "mid-trl", "end-minigrpo", "end-trl")}
    print(f"\n== gains on the same {TASKS} tasks: paired difference [95% bootstrap], McNemar p ==")
    rows = {}
    for name, a, b in (("minigrpo end - start", "end-minigrpo", "start"), ("TRL end - start", "end-trl", "start"),
                       (f"TRL - minigrpo, step {steps // 2}", "mid-trl", "mid-minigrpo"),
                       ("TRL gain - minigrpo gain", "end-trl", "end-minigrpo")):
        oa, ob = e[a]["outcomes"], e[b]["outcomes"]
        for key in ["success"] + [key for key in (f"pass@{k}",) if oa.get(key) and ob.get(key)]:
            d = paired_difference(ob[key], oa[key])  # a's rate minus b's
            rows[f"{name}, {key}"] = d
            print(f"  {name:26s} {key:8s} {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]  "
                  f"p {d['mcnemar_p']:.2g}  ({d['only_b']} tasks solved only by the first, {d['only_a']} only by "
                  f"the second)")
    return rows


def _audit_block(out: Path) -> dict:
    """Beside the gain: greedy length, the <think> arithmetic, KL to the start (end evaluations)."""
    print("\n== audit beside the gain: greedy length, <think> arithmetic, KL to the start (per token, nats) ==")
    print(f"  {'evaluation':18s} {'length':>6s} {'steps right':>14s} {'solved, sound':>13s} {'KL k3':>7s} {'KL k1':>7s}")
    rows = {}
    for name in ("start", *(f"{when}-{side}" for when in ("mid", "end") for side in SIDES)):
        full = _load(out, name)
        e, kl, a = full["without_stop"], full.get("kl_to", {}), full["without_stop"].get("think_arithmetic", {})
        rows[name] = {"length": e["completion_length_mean"], **a, "kl_to_start": kl}
        right = f"{a['steps_correct']}/{a['steps_written']}" if a else "-"
        print(f"  {name:18s} {e['completion_length_mean']:6.1f} {right:>14s} {_frac(a.get('solved_sound')):>13s} "
              f"{_frac(kl.get('k3')):>7s} {_frac(kl.get('k1')):>7s}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default: the recipe's)")
    p.add_argument("--k", type=int, default=8, help="pass@k at the end (0: skip)")
    p.add_argument("--start", default="outputs/countdown-solve-warmup/model",
                   help="the shared starting checkpoint (trained by the warm-up recipe when missing)")
    p.add_argument("--out", default="outputs/learning_vs_trl", help="every stage's result and log")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of every stage")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a stage's process is ended with this one
    sys.path.insert(0, str(HERE))  # vs_trl, for the prompt order

    from minigrpo import Config

    cfg = Config.load(str(RECIPE))
    check_matched(cfg)
    steps = args.steps or cfg.max_steps
    if steps < 2 or args.k < 0:
        p.error("--steps must be >= 2 (a middle and an end) and --k >= 0")
    out = Path(args.out).resolve()  # the stages run with the repository as their directory
    out.mkdir(parents=True, exist_ok=True)
    start = str(Path(args.start).resolve())
    check_manifest(out, {"steps": steps, "k": args.k, "start": start,
                         "recipe_sha256": hashlib.sha256(RECIPE.read_bytes()).hexdigest()})
    if not (Path(start) / "config.json").exists():
        if Path(args.start) != Path(p.get_default("start")):
            p.error(f"--start {args.start}: no model there")
        run([sys.executable, "examples/countdown_warmup.py", "--config", str(WARMUP_RECIPE)], out / "warmup.log",
            args.threads)

    evaluate(Path(start), out / "eval-start.json", 0, out, args.threads)
    train_minigrpo(start, out, steps, args.threads)
    train_trl(cfg, start, out, steps, args.threads)
    for side in SIDES:
        evaluate(checkpoint(side, out, steps // 2), out / f"eval-mid-{side}.json", 0, out, args.threads,
                 compare=out / "eval-start.json")
        evaluate(checkpoint(side, out, steps), out / f"eval-end-{side}.json", args.k, out, args.threads,
                 compare=out / "eval-start.json", kl_to=start)
    table = report(out, steps, args.k)
    (out / "results.json").write_text(json.dumps({"steps": steps, "k": args.k, "start": start, **table}, indent=1))


if __name__ == "__main__":  # vLLM starts worker processes by spawn: the guard is required
    main()
