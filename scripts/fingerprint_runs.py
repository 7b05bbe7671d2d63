"""Fingerprint the trainer's behaviour: short runs of the tiny task (tests/tiny_task.py) under option sets
that reach every branch of the step, reduced to what must not change when the code is only reorganized.

    python scripts/fingerprint_runs.py OUT_DIR                 # runs every set, writes OUT_DIR/fingerprint.json
    python scripts/fingerprint_runs.py --compare A.json B.json # exit 1 and name each difference

A fingerprint holds, per run, every logged metric except the wall-clock ones (time/*, tokens_per_second),
compared exactly (floats as their repr), and a SHA-256 of every file of every checkpoint and of
completion_samples.txt. Two fingerprints of the same code are identical on this machine (the runs are
seeded and deterministic on CPU), so a difference after a refactor is a change of behaviour. Used to
check that splitting `train` into phases changed nothing (docs/design.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "tiny_task.py")
ZERO3 = f"deepspeed={ROOT / 'recipes' / 'deepspeed_zero3.json'}"
SPARSE = ("--reward=starts_with_a", "success_reward=starts_with_a", "dynamic_sampling=true",
          "gradient_accumulation_steps=4")
COMMON = ("max_steps=3", "save_steps=2", "save_total_limit=3")

# name -> (ranks, options); each set is there for the branches it reaches
RUNS = {
    # vLLM engine, KL reference, old log-probs (2 iterations), evaluation before and during training
    "vllm-kl-iterations": (1, ("rollout=vllm", "beta=0.04", "num_iterations=2", "eval_steps=2",
                               "eval_before_training=true")),
    # dynamic sampling over rounds, the batch std, zero-advantage skips, ghost micro-batches
    "dapo-batch-std": (1, ("rollout=torch", *SPARSE, "dynamic_sampling_max_rounds=2", "scale_rewards=batch",
                           "loss_type=bnpo")),
    # LoRA: the reference is the policy with its adapters off; Dr. GRPO's normalization
    "lora-kl": (1, ("rollout=torch", "lora_rank=4", "lora_alpha=8", "beta=0.04", "num_iterations=2",
                    "loss_type=dr_grpo")),
    # GSPO with the sequence mask, entropy bonus
    "gspo-correction-entropy": (1, ("rollout=torch", "importance_sampling_level=sequence",
                                    "rollout_correction=sequence_mask", "entropy_coef=0.01")),
    # two ranks at ZeRO-3: ghost forwards/backwards in lockstep, KL, replica checks
    "zero3-2ranks-dapo-kl": (2, ("rollout=torch", *SPARSE, "dynamic_sampling_max_rounds=1", "beta=0.04", ZERO3)),
    # two ranks at ZeRO-3 with LoRA: the reference's ghost pass with adapters off
    "zero3-2ranks-lora": (2, ("rollout=torch", *SPARSE, "dynamic_sampling_max_rounds=1", "beta=0.04",
                              "num_iterations=2", "lora_rank=4", ZERO3)),
}
WALL_CLOCK = ("time/", "tokens_per_second")


def launch(model: Path, out: Path, ranks: int, args: tuple[str, ...]) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_task import free_port

    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(ranks), "--master_port", free_port()]
    proc = subprocess.run([*launcher, TINY, str(model), str(out), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run {out.name} failed:\n{proc.stderr[-4000:]}")


def fingerprint(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: repr(v) for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows]
    files = sorted(p for p in [*(out / "checkpoints").rglob("*"), out / "completion_samples.txt"] if p.is_file())
    return {"metrics": metrics,
            "files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append(f"{name}: only in one fingerprint")
            continue
        ma, mb = a[name]["metrics"], b[name]["metrics"]
        if len(ma) != len(mb):
            diffs.append(f"{name}: {len(ma)} vs {len(mb)} logged rows")
        for ra, rb in zip(ma, mb):
            for k in sorted(set(ra) | set(rb)):
                if ra.get(k) != rb.get(k):
                    diffs.append(f"{name} step {ra.get('step')}: {k} {ra.get(k)} vs {rb.get(k)}")
        fa, fb = a[name]["files"], b[name]["files"]
        diffs += [f"{name}: {f} differs" for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
    return diffs


def main(argv: list[str]) -> None:
    if argv[:1] == ["--compare"]:
        a, b = (json.loads(Path(p).read_text()) for p in argv[1:3])
        diffs = compare(a, b)
        print("\n".join(diffs) or f"identical: {len(a)} runs, every metric and checkpoint file")
        raise SystemExit(1 if diffs else 0)
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_task import build_tiny_model

    # one path for every fingerprint: LoRA checkpoints record their base model's path
    model = Path(tempfile.gettempdir()) / "minigrpo-fingerprint-model"
    if not model.exists():
        build_tiny_model(model)  # seeded: the same bytes every time
    result = {}
    for name, (ranks, options) in RUNS.items():
        print(f"[fingerprint] {name}", flush=True)
        launch(model, out / name, ranks, (*COMMON, *options))
        result[name] = fingerprint(out / name)
    (out / "fingerprint.json").write_text(json.dumps(result, indent=1))
    print(f"[fingerprint] wrote {out / 'fingerprint.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
