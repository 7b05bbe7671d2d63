"""What a run writes for people to read: metrics.jsonl, TensorBoard events, completion samples,
curves.png. Only rank 0 writes; the trainer decides what goes in."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import warnings
from pathlib import Path
from time import monotonic

from minigrpo.console import Ticker

CURVES = (  # (title, metric keys drawn on it)
    ("reward", ("reward/total/mean",)),
    # format_reward is 0/1, so its batch mean is the training format rate
    ("success and format rate", ("success_rate", "reward/format_reward/mean", "eval/success_rate", "eval/format_rate")),
    ("completion length (tokens)", ("completion/length_mean",)),
    ("KL to reference", ("kl",)),
    ("policy entropy (nats per completion token)", ("entropy",)),  # a collapse shows here first
    ("groups with no reward spread (teach nothing)", ("zero_spread_groups",)),
    ("self-verification phrase rate", ("completion/self_verification_rate",)),
    ("grad norm", ("grad_norm",)),
)


# Seconds between redraws of curves.png. A redraw takes ~0.5 s (matplotlib, 8 panels; ~1.2 s the first
# time, with its import; measured 2026-12-07 on the 2-core CPU), as long as a tiny test's whole step, and
# the other ranks wait while rank 0 draws: every step, 30 steps spent 17 s drawing.
CURVES_EVERY = 60.0


class RunLog:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: int = 0):
        self.dir = output_dir
        self.enabled = enabled
        self.history: list[dict] = []
        self.drawn, self.drawn_rows = monotonic(), 0  # the first picture after CURVES_EVERY seconds, or at the end
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if path.exists() and resume_step:  # keep the steps up to the checkpoint, drop any after it
            self.history = [r for r in _read_rows(path) if r["step"] <= resume_step]
        # Write the kept history to a new file and rename it over the old one: a crash in
        # between leaves the old history whole, never a truncated one.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, path)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite_or_str(v) for k, v in metrics.items()}}
        self.history.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def samples(self, step: int, prompts: list[str], texts: list[str], rewards: list[float], solved: list[bool], k: int):
        """The first k completions of the step to completion_samples.txt, every solved one to
        success_completion_samples.txt."""
        if not self.enabled or k == 0:
            return

        def block(i):
            return f"=== step {step} | reward {rewards[i]:.3f}\n--- prompt\n{prompts[i]}\n--- completion\n{texts[i]}\n\n"

        with open(self.dir / "completion_samples.txt", "a") as f:
            f.writelines(block(i) for i in range(min(k, len(texts))))
        with open(self.dir / "success_completion_samples.txt", "a") as f:
            f.writelines(block(i) for i in range(len(texts)) if solved[i])

    def curves(self) -> None:
        """Redraw curves.png from the whole history, at most every CURVES_EVERY seconds; leaving the
        log (`with log:`) draws the steps logged since."""
        if self.enabled and self.history and monotonic() - self.drawn >= CURVES_EVERY:
            self._draw()

    def _draw(self) -> None:
        draw_curves(self.history, self.dir / "curves.png")
        self.drawn, self.drawn_rows = monotonic(), len(self.history)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        """However the loop ends (the last step, an interrupt, a divergence, an exception): curves.png
        shows every step logged, then close."""
        if self.enabled and len(self.history) > self.drawn_rows:
            self._draw()
        self.close()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def draw_curves(history: list[dict], path: Path) -> None:
    """The CURVES panels of a run's metrics rows (e.g. `_read_rows(dir / "metrics.jsonl")`) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for key in keys:
            pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a line torn by a crash (it can only follow the checkpoint) is skipped."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i}: skipping a line torn by an earlier crash", stacklevel=3)
    return rows


def _finite_or_str(v):
    """JSON has no NaN/inf; keep them visible as strings instead of writing invalid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Progress:
    """A progress bar with step, reward, success rate and ETA, plus one concise line per logging step.
    On a terminal, while a step runs, the bar is redrawn every few seconds (minigrpo/console.py) with
    the phase running now (`watch`: the step's PhaseTimer) or what the loop is `doing` between steps,
    so a step of a minute is not a minute of a frozen screen. A context manager: leaving it, by an
    exception too, stops the redraws."""

    def __init__(self, enabled: bool, start: int, total: int, file=None):
        self.enabled = enabled
        self.timer, self.step, self.label, self.postfix, self.ticker = None, start + 1, None, "", None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="grpo", unit="step", dynamic_ncols=True, file=file)
            self.last = start
            if self.bar.fp.isatty():  # a log file gets the bar's own line per step, not a redraw every 5 s
                self.ticker = Ticker(lambda _: self._redraw())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _redraw(self) -> None:
        phase = self.timer.current if self.timer is not None else None  # read once: the loop clears it
        now = self.label or (f"{PHASE_WORDS.get(phase, phase)} step {self.step}" if phase else None)
        self.bar.set_postfix_str(", ".join(p for p in (self.postfix, now) if p))  # refreshes the bar

    def watch(self, timer, step: int) -> None:
        """Step `step` starts now: the bar names its phases from `timer.current`."""
        self.timer, self.step = timer, step

    @contextlib.contextmanager
    def doing(self, label: str):
        """The bar names `label` while the block runs (an evaluation, a checkpoint)."""
        self.label = label
        try:
            yield
        finally:
            self.label = None

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self.bar.update(step - self.last)
        self.last = step
        self.postfix = f"reward={m['reward/total/mean']:.3f}, success={m['success_rate']:.2f}"
        self.bar.set_postfix_str(self.postfix)
        self.bar.write(
            f"step {step}: reward {m['reward/total/mean']:.3f} success {m['success_rate']:.3f} "
            f"kl {m['kl']:.4f} len {m['completion/length_mean']:.0f} grad {m['grad_norm']:.3f} "
            f"lr {m['lr']:.2e} | {m['time/step']:.1f}s (gen {m['time/generate']:.1f}s, train {m['time/train']:.1f}s)"
        )

        if "eval/success_rate" in m:
            self.bar.write(f"step {step} held-out: {eval_line(m)}")

    def write(self, line: str) -> None:
        """A line above the bar (rank 0 only)."""
        if self.enabled:
            self.bar.write(line)

    def close(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
            self.ticker = None
        if self.enabled:
            self.bar.close()
            self.enabled = False


# PhaseTimer's phases (minigrpo/runtime.py), as the bar names them; benchmarks/first_command.py reads the bar
PHASE_WORDS = {"generate": "generating", "reward": "scoring", "reference": "reference log-probs",
               "train": "training", "push": "pushing weights"}


def eval_line(m: dict) -> str:
    """A held-out evaluation's figures (`minigrpo.evaluation.evaluate`) for the console."""
    fmt = f"format {m['eval/format_rate']:.2f}, " if "eval/format_rate" in m else ""
    ci = f" [{m['eval/success_rate_low']:.2f}, {m['eval/success_rate_high']:.2f}]" if "eval/success_rate_low" in m else ""
    return (f"{fmt}success {m['eval/success_rate']:.2f}{ci} on {m['eval/tasks']:.0f} tasks, "
            f"{m['eval/completion_length']:.0f} tokens")


def before_after(history: list[dict], how: str) -> str | None:
    """One line comparing the first and the last held-out evaluation in a run's metrics rows, or
    None with fewer than two. Only like is compared with like: the first row taken is the first one
    evaluated as the last was (the same number of tasks, the same stop strings), since a resumed
    run may have changed eval_num_samples or eval_stop. `how` says how they were generated."""
    rows = [r for r in history if isinstance(r.get("eval/success_rate"), float)]
    if not rows:
        return None
    b = rows[-1]
    like = [r for r in rows if r.get("eval/tasks") == b.get("eval/tasks") and r.get("eval/with_stop") == b.get("eval/with_stop")]
    if len(like) < 2:
        return None
    a = like[0]
    parts = [f"{name} {a[key]:{fmt}} -> {b[key]:{fmt}}"
             for key, name, fmt in (("eval/format_rate", "format rate", ".2f"), ("eval/success_rate", "success rate", ".2f"),
                                    ("eval/completion_length", "length", ".0f"))
             if isinstance(a.get(key), float) and isinstance(b.get(key), float)]
    return f"held-out, {int(b.get('eval/tasks', 0))} tasks, {how}, step {a['step']} -> {b['step']}: " + ", ".join(parts)


SPIKE_KEYS = ("loss", "kl", "grad_norm")  # what a finite divergence shows first


def spikes(history: list[dict], metrics: dict, window: int = 20, factor: float = 10.0,
           min_steps: int = 5) -> dict[str, tuple[float, float, float]]:
    """The step's `SPIKE_KEYS` that lie far outside their running range: more than `factor` median
    absolute deviations (MAD) from the median of their last `window` finite values in `history`
    (the logged rows; at least `min_steps` of them). The MAD is floored at a tenth of the largest
    recent magnitude: a spike must stand out by more than that magnitude, so a loss that is exactly 0
    on most steps (groups without reward spread) does not flag every other step; a metric that was 0
    on every recent step is not judged (no range to judge by). 10 MADs
    is ~6.7 standard deviations of normal noise. A run that diverges while staying finite is what
    the NaN guard misses. Returns {key: (value, running median, distance in MADs)}; empty: none."""
    out = {}
    for key in SPIKE_KEYS:
        x = metrics.get(key)
        past = [r[key] for r in history[-window:] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        scale = max((abs(p) for p in past), default=0.0)
        if not isinstance(x, (int, float)) or not math.isfinite(x) or len(past) < min_steps or scale == 0:
            continue  # a metric that was exactly 0 on every recent step (beta 0's KL) has no range to judge by
        med = statistics.median(past)
        mad = statistics.median(abs(p - med) for p in past)
        distance = abs(x - med) / max(mad, 0.1 * scale)
        if distance > factor:
            out[key] = (float(x), med, distance)
    return out


def spike_line(step: int, found: dict[str, tuple[float, float, float]]) -> str:
    """One console line naming each spiking metric, its value and its running median."""
    parts = [f"{k} {v:.4g} (running median {m:.4g}, {d:.0f} MADs away)" for k, (v, m, d) in found.items()]
    return f"[minigrpo] step {step}: possible divergence: " + "; ".join(parts)
