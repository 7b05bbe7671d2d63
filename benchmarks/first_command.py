"""The README's first command as a newcomer meets it: wall time, where it goes, and the longest
stretch in which nothing on the screen moved (issue 25: at most 10 minutes, no silence over ~15 s).

    .venv/bin/python benchmarks/first_command.py                  # make countdown, set-up done
    .venv/bin/python benchmarks/first_command.py --runs 2 --make  # `make countdown` twice, and the median
    .venv/bin/python benchmarks/first_command.py -- max_steps=2   # any arguments for the example

Runs `examples/countdown.py` (what `make countdown` runs once set-up is done; `--make`: the make
command itself) with a fresh output folder on a pseudo-terminal, so it shows what a user sees;
stamps every line it shows (a progress bar's redraws end in a carriage return, so they count as
lines), and prints:
- the phases: python start-up, each start-up stage ("[minigrpo] starting the vLLM engine ...",
  minigrpo/console.py), the step-0 evaluation, the steps, the last evaluation, the checkpoint;
- the longest silent stretches and the line that preceded each;
- the held-out format and success before and after training, from the run's metrics.jsonl.
Run it with nothing else heavy on the machine: its seconds are the machine's of that day.
"""

import argparse
import fcntl
import json
import os
import pty
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what opens a phase: a start-up stage ("[minigrpo] starting the vLLM engine ... 12 s", minigrpo/console.py),
# the step bar's first line, and what the bar says the loop is doing between steps
STAGE = re.compile(r"^\[minigrpo\] (.*?) \.\.\.")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a terminal's control sequences (clear line, cursor up)
IN_BAR = {"evaluating": "held-out evaluation after the last step", "saving a checkpoint": "saving the checkpoint"}


def stamped_lines(cmd: list[str], env: dict) -> tuple[list[tuple[float, str]], int]:
    """(seconds since start, line) for each line or carriage-return redraw the command shows on a
    terminal (a pseudo-terminal of 160 columns: what a user sees, redraws included), and its exit status."""
    start = time.monotonic()
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    lines, buf = [], b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: every writer of the terminal has exited
            break
        if not chunk:
            break
        now = time.monotonic() - start
        *done, buf = re.split(rb"[\r\n]", buf + chunk)
        for raw in done:
            text = ANSI.sub("", raw.decode(errors="replace")).strip()
            if text:
                lines.append((now, text))
                print(f"{now:7.1f}s | {text}", flush=True)
    os.close(main)
    rc = proc.wait()
    lines.append((time.monotonic() - start, "<exit>"))
    return lines, rc


def phases(lines: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """Each phase and its seconds, from when its first line appeared to when the next phase's did."""
    marks = [(0.0, "python start-up and imports")]
    for t, text in lines:
        stage = STAGE.match(text)
        if stage:
            label = stage.group(1)
        elif text.startswith("grpo:"):
            label = next((v for k, v in IN_BAR.items() if k in text),
                         "saving the checkpoint" if marks[-1][1] in IN_BAR.values() else "training steps")
        elif text == "<exit>":
            label = "<exit>"
        else:
            continue
        if label != marks[-1][1]:
            marks.append((t, label))
    return [(name, marks[i + 1][0] - t) for i, (t, name) in enumerate(marks[:-1])]


def silences(lines: list[tuple[float, str]], top: int = 5) -> list[tuple[float, float, str]]:
    """The `top` longest gaps between consecutive lines: (gap seconds, at, line before)."""
    gaps, prev_t, prev = [], 0.0, "<start>"
    for t, text in lines:
        gaps.append((t - prev_t, prev_t, prev[:110]))
        prev_t, prev = t, text
    return sorted(gaps, reverse=True)[:top]


def held_out(metrics_file: Path) -> str:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/format_rate" in r]
    if not evals:
        return "no held-out evaluation in metrics.jsonl"
    first, last = evals[0], evals[-1]
    n = int(last["eval/tasks"])

    def show(r):
        return f"format {r['eval/format_rate']:.2f}, success {r['eval/success_rate']:.2f}"
    return f"held-out ({n} tasks): step {first['step']} {show(first)} -> step {last['step']} {show(last)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--make", action="store_true", help="run `make countdown` itself (set-up check included)")
    p.add_argument("args", nargs="*", help="arguments for examples/countdown.py (after --)")
    a = p.parse_args()
    walls = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="first-command-") as tmp:
            cmd = ([sys.executable, "examples/countdown.py", "--output-dir", tmp, *a.args] if not a.make else
                   ["make", "countdown", f"ARGS=--output-dir {tmp} {' '.join(a.args)}"])
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            lines, rc = stamped_lines(cmd, env)
            if rc != 0:
                raise SystemExit(f"run {i + 1}: examples/countdown.py exited with {rc}")
            wall = lines[-1][0]
            walls.append(wall)
            print(f"\n== run {i + 1}: {wall:.0f} s ({wall / 60:.1f} min) wall, {' '.join(cmd[1:])}")
            for name, secs in phases(lines):
                print(f"  {secs:7.1f} s  {name}")
            print("  longest silent stretches (s, at, after the line):")
            for gap, at, before in silences(lines):
                print(f"  {gap:7.1f} s at {at:6.1f} s after: {before}")
            print(f"  {held_out(Path(tmp) / 'metrics.jsonl')}")
    if a.runs > 1:
        print(f"\nmedian of {a.runs}: {statistics.median(walls):.0f} s ({statistics.median(walls) / 60:.1f} min); "
              f"runs: {', '.join(f'{w:.0f}' for w in walls)} s")


if __name__ == "__main__":
    main()
