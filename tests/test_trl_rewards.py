"""TRL's reward signature, for real: rewards written in each shape TRL's documentation shows (written
fresh here) run unchanged through `score_completions` and `train()`, including a conversational
dataset, and the built-in Countdown rewards score a conversational completion as its text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from minigrpo.batching import required_columns
from minigrpo.rewards import (Reward, equation_reward, format_reward, score_completions, tag_reward,
                              trl_prompts_and_completions)

ROOT = Path(__file__).resolve().parent.parent
G = 2


class State:  # what TRL's TrainerState offers the rewards that read it
    global_step = 10
    max_steps = 100


def scored(fn, completions, prompts, columns=None, **kw):
    return score_completions([Reward(fn)], completions, prompts, columns or {}, G, on_error="raise", **kw).per_reward[
        fn.__name__]


# --- the shapes of TRL's documentation: each by keyword, the way TRL calls them -------------------

def reward_len(completions, **kwargs):  # "standard format": texts
    return [-abs(20 - len(c)) for c in completions]


def reward_num_tokens(completion_ids, **kwargs):  # the token ids
    return [float(len(ids)) for ids in completion_ids]


def reward_ground_truth(completions, ground_truth, **kwargs):  # a dataset column by name
    return [1.0 if c.strip() == gt else 0.0 for c, gt in zip(completions, ground_truth)]


def reward_math_only(prompts, completions, task, **kwargs):  # multi-task: None where it does not apply
    return [float(c.strip() == "4") if t == "math" else None for c, t in zip(completions, task)]


def reward_conversational(completions, **kwargs):  # "conversational format": one assistant message each
    return [1.0 if c[0]["content"].endswith("</answer>") else 0.0 for c in completions]


def reward_annealed(completions, trainer_state, **kwargs):  # changes with training progress
    return [trainer_state.global_step / trainer_state.max_steps] * len(completions)


async def reward_async(completions, **kwargs):  # an async reward (a remote judge, say)
    return [float(len(c)) for c in completions]


def reward_no_kwargs(completions, answer):  # TRL needs **kwargs; here the named arguments suffice
    return [float(c == a) for c, a in zip(completions, answer)]


def test_standard_shapes_receive_what_trl_passes():
    texts, prompts = ["4", "five", "4", "x" * 20], ["2+2?", "2+2?", "Capital?", "Capital?"]
    assert scored(reward_len, texts, prompts) == [-19.0, -16.0, -19.0, 0.0]
    assert scored(reward_num_tokens, texts, prompts, completion_ids=[[1], [2, 3], [4], [5] * 7]) == [1, 2, 1, 7]
    assert scored(reward_ground_truth, texts, prompts, {"ground_truth": ["4", "4", "Paris", "Paris"]}) == [1, 0, 0, 0]
    assert scored(reward_math_only, texts, prompts, {"task": ["math", "math", "geo", "geo"]}) == [1, 0, None, None]
    assert scored(reward_annealed, texts, prompts, trainer_state=State()) == [0.1] * 4
    assert scored(reward_async, texts, prompts) == [1.0, 4.0, 1.0, 20.0]
    assert scored(reward_no_kwargs, texts, prompts, {"answer": ["4", "4", "4", "4"], "unused": [0] * 4}) == [1, 0, 1, 0]


def test_conversational_prompts_make_message_completions_with_the_prefill():
    user = {"role": "user", "content": "2+2?"}
    prefilled = [user, {"role": "assistant", "content": "<think>"}]
    prompts, completions = trl_prompts_and_completions([prefilled, [user]], ["4</think>", "4"])
    assert prompts == [[user], [user]]  # the prefill leaves the prompt (TRL pops it) ...
    assert completions == [[{"role": "assistant", "content": "<think>4</think>"}],  # ... and opens the reply
                           [{"role": "assistant", "content": "4"}]]
    seen = []

    def record(prompts, completions, **kwargs):
        seen.append((prompts, completions))
        return [0.0] * len(completions)

    texts = ["a</answer>", "b", "c", "d</answer>"]
    assert scored(reward_conversational, texts, [prefilled] * 2 + [[user]] * 2) == [1, 0, 0, 1]
    score_completions([Reward(record)], texts, [prefilled] * 4, {}, G, isolate=False)
    assert seen[0][0] == [[user]] * 4 and seen[0][1][0] == [{"role": "assistant", "content": "<think>a</answer>"}]


def test_builtin_rewards_score_a_conversational_completion_as_its_text():
    good = " 55 + 36 - 7 - 19 = 65 works.</think>\n<answer> 55 + 36 - 7 - 19 </answer>"
    texts = [good, "no tags", good.replace("</think>", ""), "2 = 65</think>\n<answer> 2 </answer>"]
    columns = {"target": [65] * 4, "nums": [[19, 36, 55, 7]] * 4}
    plain = ["p"] * 4
    conversational = [[{"role": "user", "content": "p"}, {"role": "assistant", "content": "Let me see.\n<think>"}]] * 4
    for fn in (format_reward, tag_reward, equation_reward):
        as_text = scored(fn, texts, plain, columns)
        assert scored(fn, texts, conversational, columns) == as_text, fn.__name__
    assert scored(format_reward, texts, plain) == [1, 0, 0, 1] and scored(equation_reward, texts, plain, columns)[0] == 1
    # a reply that never opened <think> (no prefill, and the model did not write it) is not in the format
    assert scored(format_reward, texts, [[{"role": "user", "content": "p"}]] * 4) == [0, 0, 0, 0]


def test_a_reward_that_cannot_be_called_by_keyword_is_refused_by_name():
    with pytest.raises(ValueError, match=r"reward 'first' needs argument\(s\) \['text'\]"):
        score_completions([Reward(lambda text, **kw: [0.0] * len(text), name="first")], ["a", "b"], ["p", "p"], {}, G)
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['ground_truth'\]"):
        scored(reward_ground_truth, ["a", "b"], ["p", "p"])


def test_required_columns_are_the_dataset_columns_only():
    # the example: a TRL reward `f(prompts, completions, **kw)` used to be refused by train()
    assert required_columns(lambda prompts, completions, **kw: []) == []
    assert required_columns(reward_num_tokens) == [] and required_columns(reward_annealed) == []
    assert required_columns(reward_ground_truth) == ["ground_truth"]
    assert required_columns(reward_math_only) == ["task"]


@pytest.mark.slow
def test_trainer_learns_from_a_trl_reward_on_a_conversational_dataset(tiny_model, tmp_path):
    """`tiny_task.says_a_trl` raises unless it receives TRL's arguments (prompts without the prefill,
    completions as messages opening with it, token ids, the trainer state); with
    reward_on_error=raise, any mismatch stops the run."""
    from tiny_task import with_chat_template

    model = with_chat_template(tiny_model, tmp_path / "chat-model")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_task.py"), str(model), str(tmp_path / "out"),
                           "--reward=says_a_trl", "--conversational", "rollout=vllm", "reward_on_error=raise",
                           "success_reward=says_a_trl"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    curve = [round(r["reward/says_a_trl/mean"], 3) for r in rows]
    assert rows[0]["reward/says_a_trl/mean"] < 0.1 and sum(curve[-5:]) / 5 > 0.8, curve
    assert all(r["reward/says_a_trl/failures"] == 0 for r in rows)
    samples = (tmp_path / "out" / "completion_samples.txt").read_text()
    assert " x1\n" in samples  # the samples show the rendered prompt, which ends in the prefill


def test_a_dataset_in_conversational_format_renders_with_its_prefill(tiny_model, tmp_path):
    from tiny_task import conversational_dataset, with_chat_template

    from minigrpo.batching import prepare_prompts
    from minigrpo.models import load_tokenizer

    model = with_chat_template(tiny_model, tmp_path / "chat-model")
    ds = conversational_dataset(3)
    assert isinstance(ds, Dataset)
    tasks = prepare_prompts(ds, load_tokenizer(model), None, 16)
    assert tasks.texts[0] == ds[0]["prompt"][0]["content"] + " x1"  # continues the prefill, no new turn
    assert tasks.prompts[0] == ds[0]["prompt"] and "prompt" not in tasks.columns


def test_docstring_examples_run():
    import doctest

    from minigrpo.rewards import countdown

    assert doctest.testmod(countdown).failed == 0 and doctest.testmod(countdown).attempted >= 1


def test_with_a_template_the_prompt_column_is_a_column_and_prompts_are_the_rendered_text(tiny_model, tmp_path):
    from tiny_task import with_chat_template

    from minigrpo.batching import prepare_prompts
    from minigrpo.data import PromptTemplate
    from minigrpo.models import load_tokenizer

    tokenizer = load_tokenizer(with_chat_template(tiny_model, tmp_path / "chat-model"))
    ds = Dataset.from_dict({"prompt": ["b c", "d e"], "answer": ["a", "b"]})
    templated = prepare_prompts(ds, tokenizer, PromptTemplate(system=None, user="{prompt} x1"), 16)
    assert templated.prompts == templated.texts == ["b c x1 ", "d e x1 "]  # what the model saw
    assert templated.columns == {"prompt": ["b c", "d e"], "answer": ["a", "b"]}
    plain = prepare_prompts(ds, tokenizer, None, 16)
    assert plain.prompts == ["b c", "d e"] and plain.columns == {"answer": ["a", "b"]}  # TRL's way
