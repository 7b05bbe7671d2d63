"""How held-out tasks are generated (with or without the training stop strings) and the run's
before/after summary line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo import Config
from minigrpo.evaluation import arithmetic_audit, evaluate, greedy_sampling
from minigrpo.rewards import Reward
from minigrpo.runlog import before_after, eval_line

ROOT = Path(__file__).resolve().parent.parent


def test_evaluation_runs_without_the_training_stop_strings_unless_asked():
    cfg = Config(stop=["</answer>"], max_completion_length=96)
    plain = greedy_sampling(cfg)
    assert plain.stop == () and plain.temperature == 0.0 and plain.max_tokens == 96 and plain.n == 1
    assert greedy_sampling(Config(stop=["</answer>"], eval_stop=True)).stop == ("</answer>",)
    assert greedy_sampling(cfg, stop=True).stop == ("</answer>",)  # evaluate_countdown's "with" pass


def test_before_after_compares_the_first_and_last_evaluation():
    history = [
        {"step": 0, "eval/tasks": 100.0, "eval/format_rate": 0.0, "eval/success_rate": 0.0, "eval/completion_length": 121.4},
        {"step": 1, "reward/total/mean": 0.1},  # a step without evaluation
        {"step": 10, "eval/tasks": 100.0, "eval/format_rate": 0.5, "eval/success_rate": 0.01, "eval/completion_length": 60.0},
        {"step": 20, "eval/tasks": 100.0, "eval/format_rate": 0.93, "eval/success_rate": 0.02, "eval/completion_length": 31.6},
    ]
    line = before_after(history, "greedy, without stop strings")
    assert line == ("held-out, 100 tasks, greedy, without stop strings, step 0 -> 20: "
                    "format rate 0.00 -> 0.93, success rate 0.00 -> 0.02, length 121 -> 32")
    assert before_after(history[:2], "x") is None  # one evaluation: nothing to compare
    assert eval_line(history[-1]) == "format 0.93, success 0.02 on 100 tasks, 32 tokens"
    no_format = {k: v for k, v in history[-1].items() if k != "eval/format_rate"}
    assert eval_line(no_format) == "success 0.02 on 100 tasks, 32 tokens"
    # with the interval evaluate() logs: in brackets after the rate
    ci = {**history[-1], "eval/success_rate_low": 0.0055, "eval/success_rate_high": 0.0700}
    assert eval_line(ci) == "format 0.93, success 0.02 [0.01, 0.07] on 100 tasks, 32 tokens"


def test_before_after_compares_only_like_evaluations():
    """A resumed run that changed eval_num_samples or eval_stop: the "before" is the first row
    evaluated as the last one was, and with no such earlier row there is no summary."""
    row = {"eval/tasks": 100.0, "eval/with_stop": 0.0, "eval/success_rate": 0.0, "eval/completion_length": 100.0}
    history = [{**row, "step": 0, "eval/tasks": 50.0}, {**row, "step": 5, "eval/with_stop": 1.0},
               {**row, "step": 10, "eval/success_rate": 0.1}, {**row, "step": 20, "eval/success_rate": 0.3}]
    assert before_after(history, "x") == "held-out, 100 tasks, x, step 10 -> 20: success rate 0.10 -> 0.30, length 100 -> 100"
    assert before_after(history[:3], "x") is None  # steps 0 and 5 were evaluated otherwise than step 10


def test_evaluate_refuses_a_reward_named_like_its_own_figures():
    def tasks(completions, **kw):
        return [0.0] * len(completions)

    class OneTask:  # evaluate reaches the engine only after the names are checked
        def __len__(self):
            return 1

    with pytest.raises(ValueError, match=r"collide with evaluation figures: \['tasks'\]"):
        evaluate(None, OneTask(), [Reward(tasks)], Config(), None)
    assert evaluate(None, OneTask(), [Reward(tasks)], Config(eval_num_samples=0), None) == {}


def test_arithmetic_audit_counts_written_steps_and_sound_solutions():
    """Hand-made completions: 5 steps written, 3 right; of the 2 solved ones that write steps, one
    has every step right; one completion writes none."""
    texts = [" 48 - 39 = 9, 9 + 31 = 40.</think>\n<answer>48 - 39 + 31</answer>",   # solved, 2/2 right
             " 48 - 39 = -75, 31 * -75 = 40.</think>\n<answer>31 - 39 + 48</answer>",  # solved, 0/2 right
             " I guess.</think>\n<answer>1 + 2</answer>",                             # no steps
             " 6 / 3 = 2.</think>\n<answer>6 / 3</answer>"]                           # unsolved, 1/1 right
    audit = arithmetic_audit(texts, [True, True, False, False])
    assert audit == {"steps_written": 5, "steps_correct": 3, "step_accuracy": 0.6, "with_steps": 0.75,
                     "solved_sound": 0.5}
    assert arithmetic_audit([" no steps</think>"], [True])["step_accuracy"] is None
    with pytest.raises(ValueError, match="2 texts and 1 outcomes"):
        arithmetic_audit(["a", "b"], [True])


def test_kl_estimates_on_hand_computed_log_probs():
    """Two sequences, 3 real tokens: log q - log p = -0.5, +1 (first) and 0 (second); padding ignored."""
    import math

    import torch

    from minigrpo.evaluation import kl_estimates

    p = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    q = torch.tensor([[-1.5, -1.0, 7.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = kl_estimates(p, q, mask)
    assert kl["k1"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert kl["k3"] == pytest.approx((math.exp(-0.5) + 0.5 - 1 + math.exp(1) - 1 - 1) / 3)
    assert (kl["tokens"], kl["sequences"]) == (3, 2)
    with pytest.raises(ValueError, match="no completion tokens"):
        kl_estimates(p, q, torch.zeros(2, 3))


@pytest.mark.slow
def test_evaluate_countdown_reports_a_tier_per_number_count_with_and_without_stop(model_path, tmp_path):
    """examples/evaluate_countdown.py on the real default model with vLLM: an easy tier (2-3 numbers
    in 1..20), per number count, both generations (the greedy completions with the stop string
    are the ones without it, cut after `</answer>`), intervals, pass@8, and a paired comparison."""
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "examples" / "evaluate_countdown.py"), "--model", str(model_path),
           "--num", "12", "--min-numbers", "2", "--max-numbers", "3", "--max-number", "20", "--max-target", "100",
           "--json", str(out), "--samples", "0", "vllm_enforce_eager=true", "vllm_kv_cache_gib=0.5",
           "max_completion_length=48", "stop=[</answer>]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tasks"] == 12 and result["stop_strings"] == ["</answer>"]
    assert result["difficulty"] == {"min_numbers": 2, "max_numbers": 3, "max_number": 20, "max_target": 100}
    for name in ("with_stop", "without_stop"):
        r = result[name]
        assert set(r["by_count"]) <= {"2", "3"} and sum(c["tasks"] for c in r["by_count"].values()) == 12
        assert 0 <= r["format_rate"] <= 1 and 0 <= r["success_rate"] <= 1 and 0 < r["completion_length_mean"] <= 48
    # without the stop string no completion is shorter than with it
    assert result["without_stop"]["completion_length_mean"] >= result["with_stop"]["completion_length_mean"]
    assert "numbers  tasks  format  success" in proc.stdout
    # every task's outcome, and each rate with its Wilson interval (the default k = 8 samples for pass@k)
    for name in ("with_stop", "without_stop"):
        r = result[name]
        assert result["k"] == 8 and all(len(v) == 12 for v in r["outcomes"].values())
        assert r["success_rate"] == sum(r["outcomes"]["success"]) / 12
        for row in r["summary"].values():
            for key in ("success", "format", "pass@8"):
                assert row[key]["low"] <= row[key]["rate"] <= row[key]["high"], (name, key, row[key])
        assert r["summary"]["all"]["success"]["tasks"] == 12
        # the greedy completions are kept, and their <think> arithmetic audited from them
        assert len(r["texts"]) == 12
        assert r["think_arithmetic"] == arithmetic_audit(r["texts"], r["outcomes"]["success"])
    assert "<think> arithmetic:" in proc.stdout

    # --compare with that result: the same model on the same tasks differs by exactly 0
    again = tmp_path / "again.json"
    proc = subprocess.run([*cmd[:cmd.index("--json")], "--json", str(again), *cmd[cmd.index("--json") + 2:],
                           "--compare", str(out), "--stop", "without", "--kl-to", str(model_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kl = json.loads(again.read_text())["kl_to"]  # a model against itself: exactly 0 on its own samples
    assert (kl["k1"], kl["k3"], kl["sequences"]) == (0.0, 0.0, 12) and 12 <= kl["tokens"] <= 12 * 48
    paired = json.loads(again.read_text())["without_stop"]["paired"]
    assert set(paired) == {"success", "pass@8"}
    for d in paired.values():  # pass@8's samples are seeded: the same both times
        assert (d["difference"], d["low"], d["high"], d["only_a"], d["only_b"]) == (0.0, 0.0, 0.0, 0, 0)
    assert "minus" in proc.stdout

    # a comparison on other tasks is refused before any model loads
    proc = subprocess.run([*cmd[:cmd.index("--num") + 1], "5", *cmd[cmd.index("--num") + 2:], "--compare", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "evaluated on other tasks" in proc.stderr, proc.stderr[-2000:]
