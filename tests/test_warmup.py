"""The optional supervised warm-up (minigrpo/warmup.py): the generator's known answers, the SFT
loss on hand-worked numbers, and a real warm-up of SmolLM2-135M that lowers the loss on tasks it
never saw."""

import json
import math

import pytest
import torch

from minigrpo.algo import sft_loss
from minigrpo.config import ConfigError
from minigrpo.data import load_countdown
from minigrpo.data.generate import _replay, generate_countdown
from minigrpo.rewards import equation_reward, format_reward
from minigrpo.rewards.expression import evaluate_answer
from minigrpo.warmup import WarmupConfig, solution_completion, warmup


def test_replay_writes_the_steps_and_the_equation_of_the_construction():
    # slots [7, 10, 4]: 7 + 10 -> slot 0 (17), slot 1 takes the last live value (4); then 17 + 4
    assert _replay([7, 10, 4], [[0, 1, 0], [0, 1, 0]]) == (["7 + 10 = 17", "17 + 4 = 21"], "(7 + 10) + 4")
    # right operand first, then a division: 6 - 9 = -3 into slot 0; 12 / -3 = -4
    assert _replay([9, 6, 12], [[1, 0, 1], [1, 0, 3]]) == (["6 - 9 = -3", "12 / -3 = -4"], "12 / (6 - 9)")


def test_the_generator_makes_the_tasks_it_always_made():
    """Pinned values (the same from the code before `solutions` existed): a change to the random
    draws would silently change every recipe's data and invalidate resumes and comparisons."""
    assert generate_countdown(3, seed=42) == {"nums": [[77, 22, 66], [72, 91, 16, 18], [17, 32, 50, 66]],
                                              "target": [165, 17, 196]}
    easy = generate_countdown(3, seed=42, min_numbers=2, max_numbers=3, max_number=20, max_target=100, solutions=True)
    assert easy["nums"] == [[8, 2], [16, 5, 14], [12, 11, 18]] and easy["target"] == [16, 35, 5]
    assert [evaluate_answer(e, n)[0] for e, n in zip(easy["equation"], easy["nums"])] == [16, 35, 5]


def test_held_out_tasks_are_unseen():
    """The easy tier repeats itself: the test split drops tasks that occur in train (the same
    numbers in any order, the same target) and repeats within itself."""
    easy = {"min_numbers": 2, "max_numbers": 3, "max_number": 20, "max_target": 100}
    split = load_countdown("generate", num_samples=4000, test_size=0.05, seed=42, difficulty=easy)
    key = lambda ns, t: (tuple(sorted(ns)), t)  # noqa: E731
    train = {key(ns, t) for ns, t in zip(split["train"]["nums"], split["train"]["target"])}
    test = [key(ns, t) for ns, t in zip(split["test"]["nums"], split["test"]["target"])]
    assert len(split["train"]) == 3800 and len(test) == 96  # 104 of the 200 were seen or repeated
    assert not train & set(test) and len(set(test)) == len(test)
    # the default tier: nothing to drop, the split as before
    assert len(load_countdown("generate", num_samples=4000, test_size=0.05, seed=42)["test"]) == 200


def test_solutions_leave_the_tasks_unchanged_and_solve_them():
    plain = generate_countdown(3000, seed=5, min_numbers=2, max_numbers=5)
    solved = generate_countdown(3000, seed=5, min_numbers=2, max_numbers=5, solutions=True)
    assert solved["nums"] == plain["nums"] and solved["target"] == plain["target"]
    for nums, target, steps, equation in zip(solved["nums"], solved["target"], solved["steps"], solved["equation"]):
        assert evaluate_answer(equation, nums)[0] == target  # every number once, the exact value
        assert len(steps) == len(nums) - 1 and steps[-1].endswith(f"= {target}")
    # the split is the same with and without the answer columns, so held-out tasks stay held out
    kw = dict(num_samples=400, test_size=0.1, seed=3, difficulty={"min_numbers": 2, "max_numbers": 3})
    a, b = load_countdown("generate", **kw), load_countdown("generate", solutions=True, **kw)
    assert a["test"]["nums"] == b["test"]["nums"] and a["train"]["target"] == b["train"]["target"]
    assert set(b["train"].column_names) == {"nums", "target", "steps", "equation"}
    with pytest.raises(ValueError, match="needs the generator"):
        load_countdown("tasks.jsonl", solutions=True)


def test_a_warmup_completion_scores_as_a_solution():
    text = solution_completion(["7 + 10 = 17", "17 + 4 = 21"], "(7 + 10) + 4", 21)
    assert text == " 7 + 10 = 17, 17 + 4 = 21.</think>\n<answer>(7 + 10) + 4 = 21</answer>"
    assert format_reward([text]) == [1.0]
    assert equation_reward([text], target=[21], nums=[[7, 10, 4]]) == [1.0]


def test_sft_loss_by_hand():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [1.0, 0.3, 0.3]]))  # [2, 3]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 real tokens
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + 0.0) / 3)
    assert metrics["tokens"] == 3 and metrics["mean_token_prob"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    with pytest.raises(ValueError, match="no completion tokens"):
        sft_loss(logprobs, torch.zeros(2, 3))


def test_warmup_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        WarmupConfig(recipe=__file__, steps=0)
    with pytest.raises(ConfigError, match="learning_rate"):
        WarmupConfig(recipe=__file__, learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="not a file"):
        WarmupConfig(recipe=str(tmp_path / "missing.yaml"))
    (tmp_path / "w.yaml").write_text("recipe: r.yaml\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown warm-up keys"):
        WarmupConfig.load(tmp_path / "w.yaml")


@pytest.mark.slow
def test_warmup_teaches_solutions_to_unseen_tasks(model_path, tmp_path):
    """10 steps of 2 tasks on SmolLM2-135M: the loss falls, and the saved model gives the known
    solutions of held-out tasks (unseen: `load_countdown` drops test tasks that occur in train) a
    higher likelihood than the base model does."""
    from minigrpo.data import R1_COUNTDOWN
    from minigrpo.data.prompts import render_prompt
    from minigrpo.models import load_causal_lm, load_tokenizer
    from minigrpo.scoring import completion_logprobs

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_path}\ndataset: generate\ndataset_size: 200\ntest_size: 0.1\nseed: 1\n"
                      "generator_min_numbers: 2\ngenerator_max_numbers: 3\ngenerator_max_number: 20\n"
                      "generator_max_target: 100\nmax_prompt_length: 256\n")
    (tmp_path / "warmup.yaml").write_text("recipe: recipe.yaml\nsteps: 10\nbatch_size: 2\nlearning_rate: 1.0e-4\n"
                                          f"output_dir: {tmp_path / 'out'}\nlogging_steps: 5\n")
    folder = warmup(WarmupConfig.load(tmp_path / "warmup.yaml"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "warmup_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert sum(r["nll"] for r in rows[-3:]) / 3 < 0.6 * rows[0]["nll"], [round(r["nll"], 3) for r in rows]

    test = load_countdown("generate", num_samples=200, test_size=0.1, seed=1, solutions=True,
                          difficulty={"min_numbers": 2, "max_numbers": 3, "max_number": 20, "max_target": 100})["test"]
    tokenizer = load_tokenizer(folder)
    held = [test[i] for i in range(8)]
    prompts = [tokenizer(render_prompt(tokenizer, r, R1_COUNTDOWN), add_special_tokens=False)["input_ids"] for r in held]
    answers = [tokenizer(solution_completion(r["steps"], r["equation"], r["target"]), add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for r in held]

    def mean_logprob(model):
        with torch.no_grad():
            lp = completion_logprobs(model, prompts, answers, pad_id=tokenizer.pad_token_id)  # [8, T]
        return (lp.sum() / sum(len(a) for a in answers)).item()

    base, warm = mean_logprob(load_causal_lm(model_path)), mean_logprob(load_causal_lm(folder))
    assert warm > base + 0.5, (base, warm)
