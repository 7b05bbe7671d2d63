"""Kill a training run at random moments with SIGKILL; resuming must lose nothing.

    python tests/fault_injection.py [--kills 10] [--write-kills 2] [--steps 12] [--seed 0]
                                    [--workdir DIR] [--model DIR] [--spawn]

1. An uninterrupted run of the tiny task (tests/tiny_task.py: fixed seed, rollout=torch, a
   checkpoint after every step).
2. The same run from scratch, SIGKILLed `--kills` times at random delays after its process started
   (drawn from a seeded RNG, spread over start-up, rollout, update, logging and checkpoint writes)
   and `--write-kills` times 0-5 ms after a checkpoint write began (a `step-NNNNNN.tmp` folder
   appeared: random delays land there only now and then), at seeded random places among them, restarted
   with --resume after each kill, then left to finish.
3. Checks: every restart resumed from the newest complete checkpoint on disk, never a half-written
   `step-NNNNNN.tmp`; none is left at the end; the final step, the data position and the
   deterministic metrics of every step (DETERMINISTIC below) equal the uninterrupted run's exactly.

Prints one line per kill (its time and what the run was doing, read from the disk), then
"N/N resumed, 0 steps lost" (N = kills that landed before the run finished) and exits 0, or
says what differs and exits 1.

Start-up of a training process is ~15 s of imports on 2 CPU cores and a step ~1.5 s, so by
default each run is a fork of this process after it has imported everything once (start-up
~2 s): still one fresh process per run, killed and restarted the same way, and the module state
it inherits is import-time only (this process never trains). `--spawn` starts every run as
`python tests/tiny_task.py ...` instead: the same checks, ~4x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from tiny_task import free_port  # noqa: E402
DETERMINISTIC = ("reward/total/mean", "kl", "pg_loss", "grad_norm", "lr", "completion/length_mean", "param_checksum")
CHECKPOINT = re.compile(r"^step-(\d{6,})$")
KEEP = 2  # save_total_limit: pruning runs after every save, so kills land in it too


@dataclass
class Launch:
    """One training process: how it ended and when each metrics row appeared."""

    code: int | None  # exit code; None when we killed it
    seconds: float
    row_times: list[float] = field(default_factory=list)  # seconds after start when rows 1, 2, ... appeared
    loop_at: float | None = None  # seconds after start when the training loop began (its progress bar)
    log: str = ""


def _start(args: list[str], log: Path, spawn: bool) -> int:
    env = {"OMP_WAIT_POLICY": "PASSIVE", "MASTER_PORT": free_port(), "PYTHONPATH": str(TESTS)}
    if spawn:
        fd = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        actions = [(os.POSIX_SPAWN_OPEN, 1, str(log), fd, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
        argv = [sys.executable, str(TESTS / "tiny_task.py"), *args]
        return os.posix_spawn(sys.executable, argv, {**os.environ, **env}, file_actions=actions)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child: run the training, never return into the caller's code
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.environ.update(env)
        import tiny_task

        tiny_task.main(args)
        code = 0
    except BaseException:  # noqa: BLE001 - the child reports any failure in its log and exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_imports() -> None:
    """What a training process imports, once, so forked runs start in ~2 s (see the docstring)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as minigrpo.engine.init_distributed does
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import tiny_task  # noqa: F401
    import transformers
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import minigrpo.trainer  # noqa: F401

    transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.PreTrainedTokenizerFast  # noqa: B018


def _build_model(path: Path) -> Path:
    """The tiny model, built in a child process: this one must not run torch ops before it forks
    (an OpenMP thread pool does not survive a fork)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from tiny_task import build_tiny_model

            build_tiny_model(path)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("building the tiny model failed")
    return path


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run(args: list[str], out: Path, log: Path, spawn: bool, kill_after: float | None = None,
        kill_in_write: float | None = None) -> Launch:
    """Start a training process and SIGKILL it `kill_after` seconds after it started, or
    `kill_in_write` seconds after a checkpoint write began (a `.tmp` folder appeared), unless it
    ends first."""
    start, started = time.monotonic(), time.time()
    pid = _start(args, log, spawn)
    row_times: list[float] = []
    writing = loop_at = None  # when the first .tmp folder was seen, when the loop began
    polls = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic() - start
        while _count_rows(out) > len(row_times):
            row_times.append(now)
        polls += 1
        if loop_at is None and polls % 25 == 0 and log.exists() and "grpo:" in log.read_text(errors="replace"):
            loop_at = now
        if done:
            return Launch(os.waitstatus_to_exitcode(status), now, row_times, loop_at, log.read_text(errors="replace"))
        if kill_in_write is not None and writing is None and _writing_since(out, started):
            writing = now
        if (kill_after is not None and now >= kill_after) or (writing is not None and now >= writing + kill_in_write):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Launch(None, now, row_times, loop_at, log.read_text(errors="replace"))
        if now > 1200:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"training process still running after {now:.0f} s; log: {log}")
        time.sleep(0.002)


def checkpoints(out: Path) -> tuple[list[int], list[str]]:
    """(steps of complete checkpoints, names of half-written .tmp folders) on disk."""
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    done = [int(m.group(1)) for n in names if (m := CHECKPOINT.match(n))]
    return done, [n for n in names if n.endswith(".tmp")]


def _writing_since(out: Path, t: float) -> bool:
    """Whether a checkpoint write began after time t (a stale .tmp from an earlier kill is older)."""
    for name in checkpoints(out)[1]:
        try:
            if (out / "checkpoints" / name).stat().st_mtime >= t:
                return True
        except FileNotFoundError:  # renamed or removed just now
            pass
    return False


def _phase(rows: int, done: list[int], tmp: list[str], log: str) -> str:
    """What the run was doing when it was killed, as far as its log and the disk tell."""
    newest = max(done, default=0)
    if "grpo:" not in log:  # the progress bar appears when the loop starts
        return "during start-up (imports, model load, checkpoint restore)"
    if tmp:
        return f"during the checkpoint write of step {rows}"
    if len(done) > KEEP:
        return f"while pruning old checkpoints after saving step {newest}"
    if rows > newest:
        return f"after logging step {rows}, before its checkpoint (samples, curves)"
    return f"during step {newest + 1} (rollout, reward or update)"


def _resumed_from(log: str) -> str | None:
    """The checkpoint a launch says it resumed from ('' when it said there was none)."""
    if m := re.search(r"resumed from (\S+) \(step \d+\)", log):
        return m.group(1)
    return "" if "no complete checkpoint" in log else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kills at random delays after the process start")
    p.add_argument("--write-kills", type=int, default=2, help="kills just after a checkpoint write began")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    p.add_argument("--model", type=Path, default=None, help="a tiny model folder (default: built in workdir)")
    p.add_argument("--spawn", action="store_true", help="a fresh interpreter per run instead of a fork")
    a = p.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fault_injection-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads OpenMP: before the warm imports
    if not a.spawn:
        _warm_imports()
    model = a.model or _build_model(work / "model")
    common = [str(model), "rollout=torch", f"max_steps={a.steps}", "save_steps=1", f"save_total_limit={KEEP}"]
    print(f"fault injection: {a.kills} + {a.write_kills} SIGKILLs, {a.steps} steps, seed {a.seed}, "
          f"{'spawned' if a.spawn else 'forked'} runs, in {work}", flush=True)

    base_out = work / "uninterrupted"
    base = run([common[0], str(base_out), *common[1:]], base_out, work / "uninterrupted.log", a.spawn)
    if base.code != 0 or len(base.row_times) != a.steps:
        print(f"the uninterrupted run failed (exit {base.code}):\n{base.log[-3000:]}")
        return 1
    step_s = (base.row_times[-1] - base.row_times[0]) / (a.steps - 1)
    print(f"uninterrupted: {base.seconds:.1f} s (training began at {base.loop_at:.1f} s, then {step_s:.2f} s/step)",
          flush=True)

    out = work / "killed"
    launches = kill_and_resume(common, out, work, a, base.loop_at, step_s)
    if launches[-1].result.code != 0:
        print(f"the resumed run failed (exit {launches[-1].result.code}):\n{launches[-1].result.log[-3000:]}")
        return 1
    kills = sum(x.result.code is None for x in launches)
    resumed, problems = check_resumes(launches)
    lost, more = compare(base_out, out)
    problems += more
    print(f"{len(launches)} launches, {time.monotonic() - began:.0f} s in all")
    for line in problems:
        print("PROBLEM:", line)
    print(f"{resumed}/{kills} resumed, {lost} steps lost", flush=True)
    return 0 if not problems else 1


@dataclass
class Relaunch:
    result: Launch
    expected: str | None  # the checkpoint a --resume launch had to pick ('' none; None: not a resume)


def kill_and_resume(common: list[str], out: Path, work: Path, a, start_s: float, step_s: float) -> list[Relaunch]:
    """The run SIGKILLed by the schedule, relaunched with --resume after each kill, then finished."""
    rng = random.Random(a.seed)
    schedule = ["random"] * a.kills
    for i in sorted(rng.sample(range(1, a.kills), min(a.write_kills, a.kills - 1))):
        schedule.insert(i, "write")  # among the random ones and not last: all should land before the end
    launches: list[Relaunch] = []
    for k, kind in enumerate([*schedule, "none"], 1):
        # from the process start: in the last half of start-up, or within the next ~1.5 steps
        delay = rng.uniform(0.5 * start_s, start_s + 1.5 * step_s)
        in_write = rng.uniform(0.0, 0.005)  # after a checkpoint write began (it lasts tens of ms here)
        expected = _expected_resume(out) if launches else None
        kill = {"random": {"kill_after": delay}, "write": {"kill_in_write": in_write}, "none": {}}[kind]
        r = run([common[0], str(out), *common[1:], *(["--resume"] if launches else [])], out,
                work / f"killed-{len(launches) + 1}.log", a.spawn, **kill)
        launches.append(Relaunch(r, expected))
        start_s = r.loop_at or start_s  # follow the machine's load: the start-up of the latest launch
        if r.code is not None:  # finished (or failed) before any kill
            break
        done, tmp = checkpoints(out)
        rows = _count_rows(out)
        when = f"at {delay:5.2f} s" if kind == "random" else f"{in_write * 1000:.0f} ms into a checkpoint write, at {r.seconds:5.2f} s"
        print(f"kill {k:2d}/{len(schedule)} {when}: {rows:2d} steps logged, newest checkpoint "
              f"{max(done, default=0)}{', ' + ', '.join(tmp) + ' half-written' if tmp else ''} "
              f"-> {_phase(rows, done, tmp, r.log)}", flush=True)
    return launches


def check_resumes(launches: list[Relaunch]) -> tuple[int, list[str]]:
    """(kills after which the run resumed from the right checkpoint, problems). Each --resume launch
    that got as far as resuming must name the newest complete checkpoint on disk at its start."""
    said = [_resumed_from(x.result.log) for x in launches]  # None: killed before it got that far
    problems = [
        f"launch {i + 1} resumed from {s or 'nothing'!r}, expected {x.expected or 'nothing'!r}"
        + (" (a half-written checkpoint)" if s.endswith(".tmp") else "")
        for i, (x, s) in enumerate(zip(launches, said)) if i and s is not None and s != x.expected
    ]
    resumed = 0
    for k, x in enumerate(launches[:-1]):  # a kill counts when the next launch that resumed got it right
        later = [j for j in range(k + 1, len(launches)) if said[j] is not None]
        resumed += x.result.code is None and bool(later) and said[later[0]] == launches[later[0]].expected
    return resumed, problems


def compare(base_out: Path, out: Path) -> tuple[int, list[str]]:
    """(steps lost, problems): final step, data position and DETERMINISTIC metrics must be equal."""
    problems = []
    done, tmp = checkpoints(out)
    if tmp:
        problems.append(f"half-written checkpoints left at the end: {tmp}")
    state = json.loads((out / "checkpoints" / f"step-{max(done):06d}" / "trainer_state.json").read_text())
    base_done, _ = checkpoints(base_out)
    base_state = json.loads((base_out / "checkpoints" / f"step-{max(base_done):06d}" / "trainer_state.json").read_text())
    for key in ("step", "data_position"):
        if state[key] != base_state[key]:
            problems.append(f"trainer_state {key}: {state[key]} after kills, {base_state[key]} uninterrupted")
    want, got = _rows(base_out), {}
    for row in _rows(out):
        if row["step"] in got:
            problems.append(f"step {row['step']} appears twice in metrics.jsonl")
        got[row["step"]] = row
    lost = 0
    for row in want:
        other = got.get(row["step"])
        diff = [k for k in DETERMINISTIC if other is None or not _same(row.get(k), other.get(k))]
        if diff:
            lost += 1
            problems.append(f"step {row['step']}: " + (
                "missing" if other is None else ", ".join(f"{k} {row.get(k)!r} != {other.get(k)!r}" for k in diff)))
    extra = sorted(set(got) - {r["step"] for r in want})
    if extra:
        problems.append(f"steps {extra} were not in the uninterrupted run")
    return lost, problems


def _expected_resume(out: Path) -> str:
    """The checkpoint a --resume launch must pick now: the newest complete one, '' if none."""
    done, _ = checkpoints(out)
    return str(out / "checkpoints" / f"step-{max(done):06d}") if done else ""


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


if __name__ == "__main__":
    sys.exit(main())
