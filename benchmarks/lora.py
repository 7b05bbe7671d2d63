"""LoRA vs full fine-tuning on the phase benchmark's setting (phases.MEASURED_SETTING: beta 0.04, so
the reference pass matters), both sides measured in one run of this script, each in its own process, one after the other.

    .venv/bin/python benchmarks/lora.py                       # 4 steps per side, lora_rank 16
    .venv/bin/python benchmarks/lora.py --steps 3 lora_rank=8 lora_alpha=16

Per side, two runs of examples/countdown.py:
- `rollout=vllm` (the default): seconds per step and per phase (mean of the steps after the first,
  which carries warm-up), and the whole process's peak resident memory (trainer + the colocated
  vLLM engine with its KV cache);
- `rollout=torch` (no vLLM in the process; generation uses the policy itself), 2 steps: the
  process's peak resident memory is then the trainer's own (models, optimizer state, activations).
Prints each side's figures and the ratios full / LoRA. Targets (issue #15): training phase >= 1.3x
faster, the trainer's peak >= 35% lower. Linux only (reads /proc/self/status).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("generate", "reward", "reference", "train", "push")


from phases import MEASURED_SETTING  # noqa: E402  (benchmarks/ is the script's folder)


def run_side(overrides: list[str], steps: int, rollout: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_lora_side.py"), "--max-steps", str(steps),
           "--output-dir", str(out), "--rollout", rollout, "eval_num_samples=0", "vllm_enforce_eager=true",
           *MEASURED_SETTING, *overrides]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    peak = int(next(line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_BYTES")).split()[1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] if len(rows) > 1 else rows
    times = {ph: sum(r["time/" + ph] for r in rows) / len(rows) for ph in (*PHASES, "step")}
    return {"peak_gib": peak / 2**30, "seconds": times, "steps_averaged": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for the LoRA side (default lora_rank=16)")
    args = p.parse_args()
    lora_side = ["lora_rank=16", "lora_alpha=32", *args.overrides]
    result = {}
    for name, overrides in (("full", ["lora_rank=0"]), ("lora", lora_side)):
        timed = run_side(overrides, args.steps, "vllm")
        trainer = run_side(overrides, 2, "torch")
        result[name] = {**timed["seconds"], "process_peak_gib": timed["peak_gib"], "trainer_peak_gib": trainer["peak_gib"]}
        print(json.dumps({name: result[name]}), flush=True)
    f, lo = result["full"], result["lora"]
    print(f"\n{'':<22}{'full':>10}{'LoRA':>10}{'full/LoRA':>11}")
    for key in (*PHASES, "step"):
        print(f"{key + ' (s)':<22}{f[key]:>10.2f}{lo[key]:>10.2f}{f[key] / max(lo[key], 1e-9):>10.2f}x")
    for key in ("trainer_peak_gib", "process_peak_gib"):
        print(f"{key:<22}{f[key]:>10.2f}{lo[key]:>10.2f}   LoRA {1 - lo[key] / f[key]:+.0%} lower")
    print(json.dumps({"ratios": {"train_speedup": f["train"] / lo["train"], "step_speedup": f["step"] / lo["step"],
                                 "trainer_peak_reduction": 1 - lo["trainer_peak_gib"] / f["trainer_peak_gib"],
                                 "process_peak_reduction": 1 - lo["process_peak_gib"] / f["process_peak_gib"]}}))


if __name__ == "__main__":
    main()
