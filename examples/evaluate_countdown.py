"""Evaluate a model on held-out Countdown tasks, with intervals that tell a gain from noise.

    python examples/evaluate_countdown.py --model smollm2-135m-instruct
    python examples/evaluate_countdown.py --model outputs/countdown-cpu/checkpoints/step-000030/model
    python examples/evaluate_countdown.py --model outputs/lora-run/checkpoints/step-000060   # LoRA: merged first
    python examples/evaluate_countdown.py --model ... --min-numbers 2 --max-numbers 3 --max-number 20  # a tier
    python examples/evaluate_countdown.py --model WARMUP --tasks countdown-3x99 --json warmup.json
    python examples/evaluate_countdown.py --model GRPO --tasks countdown-3x99 --compare warmup.json

Per number count and overall: greedy success (pass@1), pass@k (exactly --k samples per task at
temperature 1.0; 0 skips it), format rate and mean length, each rate with its 95% Wilson interval,
and an audit of the greedy completions' `<think>` arithmetic (how many written steps "a op b = c"
are right). The --json keeps every task's outcome and greedy completion. `--kl-to MODEL` adds
KL(this model || MODEL) per token, on one sample per task: how far training moved the policy.
`--compare` (a model, or the --json of an earlier evaluation on the same tasks) adds the paired
difference of this model minus that one, per task, with a 95% paired-bootstrap interval and McNemar's
exact p-value: for greedy success and for pass@k.

The tasks: `--tasks NAME`, a fixed held-out set (minigrpo/data/heldout.py; its file's SHA-256 is
checked) that a recipe naming it never trains on; otherwise the test split `examples/countdown.py`
holds out with the same recipe (same dataset, size, split, seed and generator difficulty; the
difficulty flags replace the recipe's). Completions come from the vLLM engine, generated twice when
the recipe has stop strings (--stop both): without them (what a user of the checkpoint gets: the
model must end its answer itself) and with them (as in training).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from datasets import Dataset

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as examples/countdown.py: before torch starts OpenMP

from minigrpo import Config  # noqa: E402
from minigrpo.batching import prepare_prompts  # noqa: E402
from minigrpo.data import R1_COUNTDOWN, load_heldout, load_recipe_tasks  # noqa: E402
from minigrpo.evaluation import arithmetic_audit, greedy_sampling, kl_estimates, summarize_outcomes, task_outcomes  # noqa: E402
from minigrpo.lora import adapter_folder, export_merged  # noqa: E402
from minigrpo.models import load_tokenizer, resolve_model, set_transformers_log_level  # noqa: E402
from minigrpo.rewards import Reward, equation_reward, format_reward  # noqa: E402
from minigrpo.rollout import make_engine  # noqa: E402
from minigrpo.stats import paired_difference  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu.yaml"
TIER_FLAGS = ("min_numbers", "max_numbers", "max_number", "max_target")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe whose test split (or engine settings) to use")
    p.add_argument("--tasks", help="a fixed held-out set (e.g. countdown-3x99) instead of the recipe's test split")
    p.add_argument("--num", type=int, help="evaluate the first NUM tasks (default: the recipe's test split 200, "
                                           "a held-out set all of it)")
    for flag in TIER_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=f"the generator's {flag} (default: the recipe's)")
    p.add_argument("--stop", choices=["both", "without", "with"], default="both",
                   help="generate without the recipe's stop strings, with them, or both (default)")
    p.add_argument("--k", type=int, default=8, help="pass@k: k samples per task at temperature 1.0 (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass@k samples")
    p.add_argument("--compare", help="a model, or the --json of an earlier evaluation, to compare with")
    p.add_argument("--samples", type=int, default=3, help="completions to print")
    p.add_argument("--json", help="write the result here (with every task's outcome, for --compare)")
    p.add_argument("--kl-to", help="a model (e.g. the starting checkpoint): estimate KL(this || that) per token "
                                   "on one sample per task at temperature 1.0 (two forward passes per task)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    tier = [f"generator_{k}={getattr(args, k)}" for k in TIER_FLAGS if getattr(args, k) is not None]
    cfg = Config.load(args.config, tier + args.overrides)  # checked before anything loads
    if args.k < 0:
        raise SystemExit(f"--k must be >= 0, got {args.k}")
    set_transformers_log_level(cfg.log_level)

    tasks = load_heldout(args.tasks) if args.tasks else list(load_recipe_tasks(cfg)["test"])
    tasks = [{"nums": t["nums"], "target": t["target"]} for t in tasks[:args.num or (None if args.tasks else 200)]]
    digest = hashlib.sha256(json.dumps(tasks).encode()).hexdigest()  # what --compare checks
    other = earlier_result(args.compare, digest) if args.compare and args.compare.endswith(".json") else None
    modes = {"both": (False, True), "without": (False,), "with": (True,)}[args.stop] if cfg.stop else (False,)
    result = {"model": args.model, "tasks": len(tasks), "tasks_from": args.tasks or "recipe test split",
              "tasks_sha256": digest, "difficulty": cfg.generator_difficulty(), "stop_strings": cfg.stop, "k": args.k,
              **evaluate_model(args.model, cfg, tasks, modes, args.k, args.seed, args.samples, args.kl_to)}
    if args.compare:
        other = other or earlier_result(args.compare, digest)  # a model: evaluated now, in its own process
        result["compared_with"] = other["model"]
        for mode in (m for m in ("without_stop", "with_stop") if m in result and m in other):
            result[mode]["paired"] = paired(other[mode]["outcomes"], result[mode]["outcomes"])
            print(f"=== {args.model} minus {other['model']}, {mode.replace('_', ' ')} strings")
            print(paired_table(result[mode]["paired"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("with_stop", "without_stop")}))


def model_folder(model: str, cfg: Config) -> Path:
    """A model folder vLLM and transformers load: a LoRA checkpoint's base with the adapter merged in."""
    adapter = adapter_folder(model)
    if adapter is not None:
        return export_merged(adapter, Path(tempfile.mkdtemp(prefix="minigrpo-merged-")), cfg.dtype)
    return resolve_model(model, cfg.model_cache_dir)


def evaluate_model(model: str, cfg: Config, tasks: list[dict], modes, k: int, seed: int, samples: int,
                   kl_to: str | None = None) -> dict:
    """Per mode ("without_stop", "with_stop"): the summary (old keys kept: format_rate, success_rate,
    completion_length_mean, truncated_fraction, by_count) plus intervals, pass@k and every task's outcome;
    with `kl_to`, also `kl_to` (see kl_audit)."""
    path = model_folder(model, cfg)
    tokenizer = load_tokenizer(path)
    columns = {"nums": [t["nums"] for t in tasks], "target": [t["target"] for t in tasks]}
    prompts = prepare_prompts(Dataset.from_dict(columns), tokenizer, R1_COUNTDOWN, cfg.max_prompt_length)
    memory = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization, "kv_cache_gib": cfg.vllm_kv_cache_gib}
    engine = make_engine("vllm", path, dtype=cfg.dtype, seed=cfg.seed, log_level=cfg.log_level,
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                         enforce_eager=cfg.vllm_enforce_eager, **{k: v for k, v in memory.items() if v is not None})
    rewards = [Reward(format_reward), Reward(equation_reward)]
    groups = [str(len(t["nums"])) for t in tasks]
    out = {}
    for with_stop in modes:
        o = task_outcomes(engine, prompts, rewards, "equation_reward", greedy_sampling(cfg, stop=with_stop), k, seed)
        s = summarize_outcomes(o, groups)
        name = "with_stop" if with_stop else "without_stop"
        out[name] = {
            "format_rate": s["all"]["format"]["rate"], "success_rate": s["all"]["success"]["rate"],
            "completion_length_mean": s["all"]["completion_length_mean"],
            "truncated_fraction": s["all"]["truncated_fraction"],
            "by_count": {g: {"tasks": r["success"]["tasks"], "format_rate": r["format"]["rate"],
                             "success_rate": r["success"]["rate"]} for g, r in s.items() if g != "all"},
            "summary": s,
            "think_arithmetic": arithmetic_audit(o.texts, o.success),  # of the greedy completions
            "outcomes": {"success": o.success, "format": o.format, f"pass@{k}": o.pass_k},
            "texts": o.texts,  # the greedy completions, for audits
        }
        print(f"=== {model}, {name.replace('_', ' ')} strings {cfg.stop if with_stop else ''}")
        for i in range(min(samples, len(tasks))):
            print(f"--- task {tasks[i]['nums']} -> {tasks[i]['target']}\n{o.texts[i]}\n")
        print(table(s, k))
        print(audit_line(out[name]["think_arithmetic"]))
    if kl_to:
        out["kl_to"] = {"model": kl_to, **kl_audit(engine, prompts, path, model_folder(kl_to, cfg), cfg, seed)}
        print(f"KL({model} || {kl_to}) per token, {out['kl_to']['tokens']} sampled tokens: "
              f"k1 {out['kl_to']['k1']:.4f}, k3 {out['kl_to']['k3']:.4f} nats")
    return out


def kl_audit(engine, prompts, path: Path, other: Path, cfg: Config, seed: int, micro_batch: int = 16) -> dict:
    """KL(model at `path` || model at `other`) per completion token (`evaluation.kl_estimates`), on one
    completion per task sampled from the model at temperature 1.0 (no stop strings), both models' log-probs
    computed by transformers in `cfg.dtype` (the engine's own log-probs would mix in its numerics)."""
    import torch

    from minigrpo.models import load_causal_lm
    from minigrpo.rollout import Sampling
    from minigrpo.scoring import completion_logprobs

    batch = engine.generate(prompts.ids, Sampling(n=1, max_tokens=cfg.max_completion_length, temperature=1.0,
                                                  seed=seed + 1))
    pad = load_tokenizer(path).pad_token_id or 0
    _, mask, _ = batch.padded(pad)  # [B, T] real completion tokens
    n, t = mask.shape
    logprobs = []
    for folder in (path, other):
        model, rows = load_causal_lm(folder, cfg.dtype), torch.zeros(n, t)  # [B, T]
        with torch.no_grad():
            for i in range(0, n, micro_batch):
                lp = completion_logprobs(model, prompts.ids[i:i + micro_batch], batch.completion_ids[i:i + micro_batch],
                                         pad_id=pad, share_prompts=False)  # [b, T_chunk]
                rows[i:i + lp.shape[0], :lp.shape[1]] = lp
        logprobs.append(rows)
        del model
    return kl_estimates(logprobs[0], logprobs[1], mask)


def earlier_result(other: str, digest: str) -> dict:
    """The --json of an earlier evaluation, or a fresh one of the model `other` (in its own process:
    vLLM keeps global state) with the same arguments; refused unless it is on the same tasks."""
    if not other.endswith(".json"):
        path = Path(tempfile.mkdtemp(prefix="minigrpo-eval-")) / "other.json"
        argv = _drop(sys.argv[1:], ("--model", "--json", "--compare", "--samples"))
        subprocess.run([sys.executable, __file__, "--model", other, *argv, "--json", str(path), "--samples", "0"],
                       check=True)
        other = str(path)
    result = json.loads(Path(other).read_text())
    if result.get("tasks_sha256") != digest:
        raise SystemExit(f"--compare {other}: evaluated on other tasks (sha256 {result.get('tasks_sha256')}, "
                         f"these are {digest}); evaluate both with the same --tasks/--num/recipe")
    return result


def _drop(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without each flag in `flags` and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def paired(a: dict, b: dict) -> dict:
    """B minus A per outcome both measured (greedy success, pass@k)."""
    return {name: paired_difference(a[name], b[name]) for name in ("success", *[n for n in b if n.startswith("pass@")])
            if a.get(name) is not None and b.get(name) is not None}


def table(s: dict, k: int) -> str:
    """Rates per number count and overall, success and pass@k with their 95% Wilson intervals."""
    def ci(r, name):
        return f"[{r[name]['low']:.3f}, {r[name]['high']:.3f}]" if name in r else "-"

    def pct(r, name):
        return f"{r[name]['rate']:.3f}" if name in r else "-"

    pk = f"pass@{k}"
    lines = [f"{'numbers':>8} {'tasks':>6} {'format':>7} {'success':>8} {'success 95%':>16} {pk:>7} {pk + ' 95%':>16}"
             "   length"]
    for g, r in s.items():
        lines.append(f"{g:>8} {r['success']['tasks']:>6} {pct(r, 'format'):>7} {pct(r, 'success'):>8} "
                     f"{ci(r, 'success'):>16} {pct(r, pk):>7} {ci(r, pk):>16}"
                     f"   {r['completion_length_mean']:.0f} ({r['truncated_fraction']:.0%} cut by the length limit)")
    return "\n".join(lines)


def audit_line(a: dict) -> str:
    """The `<think>` arithmetic audit of the greedy completions, in one line."""
    def frac(x):
        return "-" if x is None else f"{x:.3f}"

    return (f"<think> arithmetic: {a['steps_correct']} of {a['steps_written']} written steps right "
            f"({frac(a['step_accuracy'])}); {frac(a['with_steps'])} of completions write steps; "
            f"solved ones with every step right: {frac(a['solved_sound'])}")


def paired_table(p: dict) -> str:
    return "\n".join(f"{name:>10}: {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] on {d['tasks']} tasks "
                     f"(only this one {d['only_b']}, only the other {d['only_a']}; McNemar p {d['mcnemar_p']:.3g})"
                     for name, d in p.items())


if __name__ == "__main__":  # vLLM starts worker processes by spawn: the guard is required
    main()
