"""Seconds per step and per phase of the layouts, in one run: 2 training ranks (torchrun, gloo) with
(1) the home-made rollout server minigrpo had until 2026-12-07 (its code, from a git commit),
(2) vLLM's own server, synchronous, (3) vLLM's server with async_generation, and (4) colocated vLLM
(each rank its own engine) as the reference. The default recipe and model, the same steps.

    .venv/bin/python benchmarks/layouts.py                       # 4 steps each, all four layouts
    .venv/bin/python benchmarks/layouts.py --steps 6 --only vllm_server async
    .venv/bin/python benchmarks/layouts.py --summarize outputs/layouts

Each layout runs `examples/countdown.py` once, one after the other (one timed job at a time), with
the held-out evaluation off. Prints per layout: start-up (the wall time that is not a step), the mean
seconds of each phase and of the step over the steps after the first, and the step time relative
to the synchronous server. `generate` is the time the step waited for its completions: with
async_generation, what training did not hide. Writes outputs/layouts/<layout>/ (metrics, stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("generate", "reward", "reference", "train", "push")
HOME_MADE_COMMIT = "5db4022"  # the last main with minigrpo/rollout/server.py (issue 23 replaced it)
LAYOUTS = {
    "home_made": ["rollout=vllm_server"],  # run from HOME_MADE_COMMIT's tree
    "vllm_server": ["rollout=vllm_server"],
    "async": ["rollout=vllm_server", "async_generation=true"],
    "colocated": ["rollout=vllm"],
}
COMMON = ["eval_num_samples=0", "logging_steps=1"]  # no held-out evaluation: steps and start-up only


def run_layout(name: str, steps: int, out: Path, overrides: list[str]) -> dict:
    tree, env = ROOT, {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    checkout = None
    if name == "home_made":
        checkout = Path(tempfile.mkdtemp(prefix="minigrpo-home-made-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), HOME_MADE_COMMIT],
                       check=True, capture_output=True)
        tree = checkout
        # its own minigrpo first on the path (the editable install's finder comes after), and
        # vLLM without today's plugin, which that tree does not have
        env.update(PYTHONPATH=str(checkout), VLLM_PLUGINS="lora_filesystem_resolver")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(tree / "examples" / "countdown.py"), "--max-steps", str(steps), "--output-dir", str(out / "run"),
           *COMMON, *LAYOUTS[name], *overrides]
    print(f"[layouts] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    try:
        with open(out / "stdout.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        if checkout is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], capture_output=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"[layouts] {name} failed (exit {proc.returncode}); see {out / 'stdout.txt'}")
    (out / "wall.json").write_text(json.dumps({"wall_seconds": wall, "started": start}))
    return summarize(name, out)


def summarize(name: str, out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    later = rows[1:] if len(rows) > 1 else rows  # step 1 carries one-off warm-up
    wall = json.loads((out / "wall.json").read_text())
    steps_seconds = sum(r["time/step"] for r in rows)
    result = {"layout": name, "steps": len(rows), "wall": wall["wall_seconds"],
              "startup": wall["wall_seconds"] - steps_seconds,  # all that is not a step: start-up, the final checkpoint
              **{p: sum(r[f"time/{p}"] for r in later) / len(later) for p in (*PHASES, "step")},
              "reward_mean": sum(r["reward/total/mean"] for r in rows) / len(rows)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def print_table(results: list[dict]) -> None:
    base = next((r["step"] for r in results if r["layout"] == "vllm_server"), None)
    print(f"\n{'layout':<13}{'start-up':>9}" + "".join(f"{p:>10}" for p in (*PHASES, "step")) + f"{'vs sync':>9}")
    for r in results:
        ratio = f"{r['step'] / base:>8.2f}x" if base else ""
        print(f"{r['layout']:<13}{r['startup']:>8.0f}s" + "".join(f"{r[p]:>10.2f}" for p in (*PHASES, "step")) + ratio)
    print("(seconds; phases and step: mean over the steps after the first; start-up: wall minus the steps, "
          "so it includes the final checkpoint)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", nargs="*", choices=list(LAYOUTS), help="these layouts only (default: all four)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "layouts"))
    p.add_argument("--summarize", metavar="DIR", help="print the table of an earlier run's folder")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.summarize:
        print_table([summarize(d.name, d) for d in sorted(Path(args.summarize).iterdir()) if (d / "wall.json").exists()])
        return
    results = [run_layout(name, args.steps, Path(args.out) / name, args.overrides) for name in (args.only or LAYOUTS)]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, 2 training ranks, {args.steps} steps each")
    print_table(results)


if __name__ == "__main__":
    main()
