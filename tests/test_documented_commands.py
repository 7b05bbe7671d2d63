"""Every `examples/countdown.py` command the README, docs/ and the recipes' headers show (torchrun and
`make countdown ARGS=...` ones, GPU ones included) loads and validates its config as written, through
the script's own `load_config`, and the batch splits over the ranks it launches. A documented command
must never fail at the first line (issue 24: `vllm_server_devices=3` was refused as an int)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from minigrpo import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*.yaml"))]


def _script():
    spec = importlib.util.spec_from_file_location("countdown_script", ROOT / "examples" / "countdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCH = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?(?:python3?|torchrun|make countdown)\b|^examples/countdown\.py\b")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def documented_commands(text: str) -> list[str]:
    """Each command that runs examples/countdown.py: a line (continuations joined; a recipe's leading
    '#' dropped) or an inline code span that starts with a launcher (python, torchrun, make countdown,
    optionally after VAR=value) or with the script itself."""
    out, current = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*#\s?", "", raw) if raw.lstrip().startswith("#") else raw
        current = (current + " " + line.strip()).strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        spans = [current] + CODE_SPAN.findall(current)
        out += [c for c in spans if LAUNCH.match(c) and ("examples/countdown.py" in c or c.startswith("make countdown"))]
        current = ""
    return out


def argv_of(command: str) -> tuple[list[str], int]:
    """The script's arguments and the number of training ranks a command launches."""
    command = command.split(" # ")[0].split("  #")[0].strip().strip("`")
    words = shlex.split(command)
    if "make" in words and "countdown" in words:
        args = next((w.partition("=")[2] for w in words if w.startswith("ARGS=")), "")
        return shlex.split(args), 1
    i = next(i for i, w in enumerate(words) if w.endswith("examples/countdown.py"))  # the launcher's words before it
    ranks = 1
    for j, w in enumerate(words[:i]):
        if w.startswith("--nproc_per_node") or w.startswith("--nproc-per-node"):
            ranks = int(w.partition("=")[2] or words[j + 1])
    return words[i + 1:], ranks


def all_commands() -> list[tuple[str, str]]:
    found = [(f"{page.relative_to(ROOT)}: {c}", c) for page in PAGES for c in documented_commands(page.read_text())]
    assert len(found) >= 8, found  # the README alone shows the default, the 1-GPU and two 4-GPU launches
    return found


COMMANDS = all_commands()


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w.split(':')[0]}-{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_every_documented_command_loads_its_config(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their DeepSpeed configs relative to the repository
    argv, ranks = argv_of(command)
    argv = [a for a in argv if not a.startswith("<") and a != "..."]  # placeholders for the reader's own
    _, cfg = _script().load_config(argv)
    cfg.layout(ranks)  # the per-rank batch: refused at start if prompts_per_step does not split


def test_the_extractor_finds_continued_and_commented_commands():
    text = ("    torchrun --nproc_per_node 3 examples/countdown.py \\\n        --config x.yaml rollout=vllm_server"
            "   # 3 trainers\n#   python examples/countdown.py --max-steps 5\nmake countdown ARGS=\"--max-steps 2\"\n"
            "prose naming `examples/countdown.py` or `make countdown` (a command: `examples/countdown.py --max-steps 1`)\n")
    cmds = documented_commands(text)
    assert [argv_of(c) for c in cmds] == [(["--config", "x.yaml", "rollout=vllm_server"], 3),
                                          (["--max-steps", "5"], 1), (["--max-steps", "2"], 1), ([], 1), ([], 1),
                                          (["--max-steps", "1"], 1)]


def test_a_str_setting_takes_an_int_from_the_command_line_and_nothing_else_changes_type():
    cfg = Config.load(str(ROOT / "recipes" / "qwen2.5-3b-countdown.yaml"), ["rollout=vllm_server", "vllm_server_devices=3"])
    assert cfg.vllm_server_devices == "3"
    assert Config.load(None, ["vllm_server_devices=2,3"]).vllm_server_devices == "2,3"
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        Config.load(None, ["max_steps=ten"])  # a str where an int is expected stays an error
    with pytest.raises(ConfigError, match="expected str"):
        Config.load(None, ["model=true"])  # a bool is not a name
