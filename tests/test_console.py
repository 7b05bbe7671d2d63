"""What the console shows while something long runs (minigrpo/console.py, the step bar of
minigrpo/runlog.py): never a frozen screen for more than a tick (issue 25)."""

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minigrpo import console
from minigrpo.runlog import Progress
from minigrpo.runtime import PhaseTimer

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def fast_tick(monkeypatch):
    monkeypatch.setattr(console, "TICK", 0.05)


def test_a_stage_writes_whole_lines_with_the_seconds_to_a_pipe(fast_tick, monkeypatch):
    monkeypatch.setattr(console, "LOG_TICK", 0.05)
    out = io.StringIO()
    with console.stage("starting the engine", stream=out):
        time.sleep(0.3)
    lines = out.getvalue().split("\n")
    assert lines[0] == "[minigrpo] starting the engine ..."
    ticks = lines[1:-2]
    assert len(ticks) >= 3 and all(t.startswith("[minigrpo] starting the engine ... ") and t.endswith(" s") for t in ticks)
    assert lines[-2] == "[minigrpo] starting the engine ... 0 s done" and lines[-1] == ""
    assert "\r" not in out.getvalue()  # a log file gets no carriage returns


def test_a_stage_redraws_one_line_on_a_terminal_and_says_when_it_failed(fast_tick):
    out = Terminal()
    with pytest.raises(KeyError):
        with console.stage("loading", stream=out):
            time.sleep(0.2)
            raise KeyError("x")
    text = out.getvalue()
    assert text.startswith("[minigrpo] loading ...\r\x1b[K[minigrpo] loading ... 0 s") and text.count("\n") == 1
    assert text.endswith(" s (failed)\n") and text.count("\r") >= 3


def test_a_stage_of_another_rank_prints_nothing(fast_tick):
    out = io.StringIO()
    with console.stage("loading", enabled=False, stream=out):
        time.sleep(0.1)
    assert out.getvalue() == ""


def test_the_step_bar_names_the_running_phase_and_moves_while_it_runs(fast_tick, monkeypatch):
    screen = Terminal()
    shown = []
    with Progress(True, 0, 30, file=screen) as bar:
        monkeypatch.setattr(bar.bar, "set_postfix_str", shown.append)
        timer = PhaseTimer()
        bar.watch(timer, 7)  # logging_steps > 1: the bar's count lags, the step named is the one running
        with timer("train"):
            time.sleep(0.2)
        assert "training step 7" in shown and timer.current is None
        with bar.doing("evaluating 8 held-out tasks"):
            time.sleep(0.2)
        assert "evaluating 8 held-out tasks" in shown


def test_the_step_bar_stops_redrawing_when_the_loop_raises_and_never_redraws_into_a_log(fast_tick):
    with pytest.raises(RuntimeError):
        with Progress(True, 0, 3, file=Terminal()) as bar:
            assert any(t.name == "minigrpo-ticker" for t in threading.enumerate())
            raise RuntimeError("diverged")
    time.sleep(0.2)
    assert bar.ticker is None and not any(t.name == "minigrpo-ticker" for t in threading.enumerate())
    with Progress(True, 0, 3, file=io.StringIO()) as log:  # not a terminal: tqdm's own line per update
        assert log.ticker is None


@pytest.mark.process
def test_test_quick_fails_a_test_that_starts_a_program(tmp_path):
    """The guard of `make test-quick` (tests/conftest.py) fires: a test that starts a program fails."""
    (tmp_path / "test_starts.py").write_text("import subprocess, sys\n\ndef test_x():\n"
                                             "    subprocess.run([sys.executable, '-c', 'pass'])\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "MINIGRPO_TEST_QUICK": "1"})
    assert proc.returncode == 1 and "make test-quick: this test starts a program" in proc.stdout, proc.stdout[-2000:]
