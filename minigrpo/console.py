"""What the console shows while something long runs: no stretch of more than a few seconds in which
nothing on the screen moves (issue 25: a newcomer waited ~2 minutes after vLLM's start-up warning).

`stage("starting the vLLM engine")` prints `[minigrpo] starting the vLLM engine ...`, redraws it with
the seconds so far every `TICK` seconds (a carriage return, as a progress bar does; to a pipe or a
file, a line every `LOG_TICK`), and ends it with the total. `Ticker` is the thread behind it, also used by the step bar (minigrpo/runlog.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator

TICK = 5.0  # seconds between redraws on a terminal: well under the ~15 s a user waits before wondering
LOG_TICK = 15.0  # between lines to a pipe or a file, where each update is a line that stays


def launched_as_rank0() -> bool:
    """Before the process group exists: whether this process prints (rank 0 of a torchrun job, whose
    RANK torchrun sets, or a plain process without one)."""
    return int(os.environ.get("RANK", "0")) == 0


class Ticker:
    """Calls `fn(seconds since start)` every `every` seconds on a daemon thread until `stop()`."""

    def __init__(self, fn: Callable[[float], None], every: float | None = None):
        self.fn, self.every, self.start = fn, every or TICK, time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="minigrpo-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.fn(time.monotonic() - self.start)

    def stop(self) -> float:
        """Stops the thread (waits for a redraw in progress); returns the seconds since start."""
        self._done.set()
        self._thread.join()
        return time.monotonic() - self.start


@contextlib.contextmanager
def stage(what: str, enabled: bool = True, stream=None) -> Iterator[None]:
    """`[minigrpo] what ...` with the elapsed seconds while the block runs, then its total.
    On a terminal the line is redrawn in place every TICK seconds, cut to the terminal's width (a
    wrapped line cannot be redrawn); elsewhere (a pipe, a log file) a whole line every LOG_TICK
    seconds, so another process's lines never start in the middle of ours and a log stays short.
    enabled False (ranks other than 0): prints nothing. An exception ends the line with "(failed)"
    and propagates."""
    if not enabled:
        yield
        return
    out = stream or sys.stdout
    terminal = out.isatty()
    line = f"[minigrpo] {what} ..."
    if terminal:
        line = line[: shutil.get_terminal_size().columns - 16]  # room for " 123 s (failed)"

    def show(seconds: float, end: str = "") -> None:
        out.write(f"\r\x1b[K{line} {seconds:.0f} s{end}" if terminal else f"{line} {seconds:.0f} s{end or chr(10)}")
        out.flush()

    out.write(line if terminal else line + "\n")
    out.flush()
    ticker = Ticker(show, None if terminal else LOG_TICK)
    try:
        yield
    except BaseException:
        show(ticker.stop(), " (failed)\n")
        raise
    show(ticker.stop(), " done\n")
