"""The README's "Using it as a library" snippet, run as written on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_task import build_tiny_model

pytestmark = pytest.mark.slow

SNIPPET = '''
from datasets import Dataset
from minigrpo import Config, train

def says_a(completions, **kw):                       # your reward
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]

data = Dataset.from_dict({"prompt": ["b c d", "e f g"] * 32})   # a prompt column (or messages)
cfg = Config(model="path/to/hf-model", output_dir="outputs/mine", max_steps=20,
             prompts_per_step=4, num_generations=8, beta=0.0, success_reward="says_a")
train(cfg, [says_a], data)
'''


def test_readme_snippet_is_the_one_tested():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert SNIPPET.strip() in readme, "README's library snippet and this test drifted apart"


def test_readme_snippet_runs_and_learns(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    code = SNIPPET.replace("path/to/hf-model", str(model)).replace("outputs/mine", str(tmp_path / "out"))
    # the tiny model needs short lengths and a larger learning rate than a real one
    code = code.replace("beta=0.0,", "beta=0.0, max_prompt_length=16, max_completion_length=8, learning_rate=3e-3, "
                        "rollout='torch', lr_scheduler_type='constant',")
    code = "if __name__ == '__main__':\n" + "\n".join("    " + line for line in code.strip().splitlines())
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert rows[0]["reward/says_a/mean"] < 0.1
    assert sum(r["reward/says_a/mean"] for r in rows[-3:]) / 3 > 0.5
