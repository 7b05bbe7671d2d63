"""Countdown rewards: is the completion in the R1 format, and is its answer a correct equation.

Both follow the reward protocol of `minigrpo.rewards.runner` (TRL's signature): called once per
batch, one float per completion, dataset columns as keyword arguments aligned with `completions`.

The completions continue a prompt that ends in `<think>` (the R1 assistant prefill), so a
well-formed completion looks like

    I add 55 and 36 ... so 55 + 36 - 7 - 19 works.</think>
    <answer> 55 + 36 - 7 - 19 </answer>

A completion may also come as TRL's conversational form, `[{"role": "assistant", "content": ...}]`,
whose content is the whole reply, prefill included: the rewards judge what follows its first
`<think>` (`completion_text`), so the same reply scores the same in both forms; a reply that never
opens `<think>` fails the format (`equation_reward` still reads its answer, as for a string).

Both functions work by `str.find`/`rfind` and `str.count` rather than backtracking regexes, so a
hostile completion of a megabyte costs linear time, not quadratic.

How they depart from the Mini-R1 seed: the seed's format regex required exactly one `\n` between
`</think>` and `<answer>` and so rejected its own test completions (which have a blank line there);
its equation reward ran `eval` on the answer, which admits `**` (`9**9**9**9` never returns) and
compared floats with a tolerance. Here the answer is evaluated exactly (`expression.evaluate_answer`).
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Sequence

from minigrpo.rewards.expression import InvalidExpression, evaluate_answer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_INT_STRING = re.compile(r"\s*-?[0-9]+\s*")  # ASCII digits only: int() would also take "٦٥"


def is_well_formatted(completion: str) -> bool:
    """True for `thinking</think>` + whitespace holding a newline + `<answer>...</answer>` + whitespace.

    The thinking contains no `<think>`/`</think>` (the prompt already opened the block), `</think>`
    appears once, the answer contains none of the four tags, and only whitespace follows `</answer>`.
    Empty thinking or an empty answer is well-formatted: the equation reward judges the content.
    """
    if completion.count(THINK_OPEN) or completion.count(THINK_CLOSE) != 1:
        return False
    _, after_think = completion.split(THINK_CLOSE)
    start = after_think.find(ANSWER_OPEN)
    if start < 0:
        return False
    gap = after_think[:start]
    if gap.strip() or "\n" not in gap:
        return False
    body = after_think[start + len(ANSWER_OPEN) :].rstrip()
    if not body.endswith(ANSWER_CLOSE):
        return False
    content = body[: -len(ANSWER_CLOSE)]
    return not any(tag in content for tag in _TAGS)


def extract_answer(completion: str) -> str | None:
    """Content of the last `<answer>...</answer>` block (the one closed last), or None if there is none."""
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER_OPEN) : end]


def is_correct_equation(completion: str, target: int, numbers: Sequence[int]) -> bool:
    """True when the last answer block uses each of `numbers` once, only + - * / ( ), and equals `target`.

    An optional trailing `= value` must equal `target` too. Any malformed answer is False, never an error.
    """
    answer = extract_answer(completion)
    if answer is None:
        return False
    try:
        value, claimed = evaluate_answer(answer, list(numbers))
    except InvalidExpression:
        return False
    return value == target and (claimed is None or claimed == target)


def completion_text(completion: str | Sequence[dict]) -> str:
    """The text the Countdown checks read: a string as is; of a conversational completion (a list of
    messages, the last being the assistant's reply), what follows the reply's first `<think>`, or the
    whole reply when it has none (`opens_think` is then False, and the format rewards score 0).

    >>> completion_text([{"role": "assistant", "content": "Let me see. <think>2+2</think>"}])
    '2+2</think>'
    """
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    start = content.find(THINK_OPEN)
    return content if start < 0 else content[start + len(THINK_OPEN):]


def opens_think(completion: str | Sequence[dict]) -> bool:
    """Whether the reasoning block was opened: always for a string (the prompt opened it), and for a
    conversational completion when its reply contains `<think>` (the prefill's or the model's)."""
    return isinstance(completion, str) or THINK_OPEN in completion[-1]["content"]


def format_reward(completions: list, **columns) -> list[float]:
    """1.0 for each completion that `is_well_formatted`, else 0.0. Ignores the dataset columns."""
    return [1.0 if opens_think(c) and is_well_formatted(completion_text(c)) else 0.0 for c in completions]


def tag_reward(completions: list, **columns) -> list[float]:
    """Partial credit on the way to `is_well_formatted`: 0.25 per milestone reached, in order.

    1. `</think>` appears exactly once and `<think>` never (the prompt opened the block);
    2. an `<answer>` follows that `</think>`;
    3. a `</answer>` closes that `<answer>`;
    4. the whole completion `is_well_formatted` (so 1.0 exactly when `format_reward` is 1.0).

    Why it exists: a small base model almost never produces the whole format by chance (SmolLM2-135M:
    1 in 128 samples at temperature 1, 0 in 128 at 0.7), so a group of 8 nearly always scores all
    zeros under `format_reward` and GRPO has no advantage to learn from. The first milestone is
    reached far more often (16 of the 128 samples at 0.7), so 11 of those 16 groups had a spread.
    It is shaping for small models, like the "xmlcount" reward of community GRPO demos; report the
    strict `format_reward` as the format rate. Ignores the dataset columns.
    """
    scores = []
    for completion in completions:
        c, score = completion_text(completion), 0.0
        if opens_think(completion) and c.count(THINK_CLOSE) == 1 and not c.count(THINK_OPEN):
            score += 0.25
            after_think = c.split(THINK_CLOSE)[1]
            start = after_think.find(ANSWER_OPEN)
            if start >= 0:
                score += 0.25
                if after_think.find(ANSWER_CLOSE, start) >= 0:
                    score += 0.25
                    score += 0.25 if is_well_formatted(c) else 0.0
        scores.append(score)
    return scores


def equation_reward(completions: list, target: Sequence, nums: Sequence, **columns) -> list[float]:
    """1.0 for each completion whose last answer is a correct equation (`is_correct_equation`), else 0.0.

    Args:
        completions: [N] completion texts (or conversational completions, see `completion_text`).
        target: [N] targets, ints or integer strings ("65").
        nums: [N] number lists: lists of ints, numpy arrays, or lists of integer strings.

    Raises:
        ValueError: when the columns are not aligned with `completions` or hold something that is not an
            integer: that is a data error, not a bad completion, so it must not silently score 0.
    """
    _check_aligned("equation_reward", completions, target=target, nums=nums)
    return [1.0 if is_correct_equation(completion_text(c), as_int(t), [as_int(x) for x in _number_list(ns)]) else 0.0
            for c, t, ns in zip(completions, target, nums)]


_LITERAL = re.compile(r"[0-9]+")


def numbers_reward(completions: list, nums: Sequence, **columns) -> list[float]:
    """Shaping: how closely the integers written in the last answer (left of any `=`) are the task's
    numbers, each once, as a multiset: |used & given| / max(|used|, |given|). 1.0 exactly when they
    are the given numbers; 0.0 without an answer. `1 + 2 = 3` for [70, 28, 10] scores 0. It reads
    digit runs only, so it can be fooled on purpose (`70 28 10`, no operators, scores 1.0, and so
    does `-70 + 28.10`): it is a nudge toward the numbers, never a judge; `closeness_reward` and
    `equation_reward` parse the answer.

    Why it exists: a 135M model that learned the format answers with the prompt's own example
    (`1 + 2 = 3`), whatever the numbers, and nothing in the strict rewards moves it toward the
    numbers until an answer is exactly right. Report `equation_reward` as the success rate."""
    _check_aligned("numbers_reward", completions, nums=nums)
    scores = []
    for c, ns in zip(completions, nums):
        answer = extract_answer(completion_text(c))
        given = Counter(as_int(x) for x in _number_list(ns))
        if answer is None or not given:
            scores.append(0.0)
            continue
        used = Counter(int(t) for t in _LITERAL.findall(answer.split("=")[0]))
        scores.append(sum((used & given).values()) / max(sum(used.values()), sum(given.values())))
    return scores


def closeness_reward(completions: list, target: Sequence, nums: Sequence, **columns) -> list[float]:
    """Shaping: for an answer that is a valid equation over exactly the given numbers (each once,
    `evaluate_answer`'s rules), 1 - min(|value - target| / max(|target|, 1), 1); 0.0 otherwise. 1.0 exactly
    when the value is the target (an `= value` that disagrees is not checked here: `equation_reward`
    is the strict judge and the reported success rate)."""
    _check_aligned("closeness_reward", completions, target=target, nums=nums)
    scores = []
    for c, t, ns in zip(completions, target, nums):
        answer, goal, value = extract_answer(completion_text(c)), as_int(t), None
        if answer is not None:
            try:
                value, _ = evaluate_answer(answer, [as_int(x) for x in _number_list(ns)])  # exact Fraction
            except InvalidExpression:
                pass  # not an equation over the given numbers: no credit
        scores.append(0.0 if value is None else float(1 - min(abs(value - goal) / max(abs(goal), 1), 1)))
    return scores


# One written step of reasoning, "a op b = c" (the warm-up's solutions are chains of them:
# "48 - 39 = 9, 9 + 31 = 40"); operands may be negative ("31 - -27 = 58"), at most 18 digits. No nested
# quantifiers: a hostile megabyte is scanned in linear time.
_STEP = re.compile(r"(-?[0-9]{1,18}) *([-+*/]) *(-?[0-9]{1,18}) *= *(-?[0-9]{1,18})")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_JOINED = "+-*/=(0123456789"  # a neighbour (past spaces) that makes the match part of a longer expression


def think_arithmetic(completion: str | Sequence[dict]) -> tuple[int, int]:
    """(correct, written): the stand-alone steps "a op b = c" written before `</think>` (the whole
    text when it never closes) and how many of them are right, exactly (`7 / 2 = 3` is wrong). A match
    that is part of a longer expression (`10 - 3 - 2 = 5`, `6 + 9 * 2 = 24`, `7 / 2 = 3.5`, the second
    `=` of `2 + 3 = 5 + 1 = 6`) is not a step and is not counted. An audit: GRPO grades only the
    answer, so the arithmetic in the reasoning may drift into nonsense while answers improve.

    >>> think_arithmetic(" 48 - 39 = 9, 9 + 31 = 41.</think> <answer>48 - 39 + 31</answer>")
    (1, 2)
    """
    text = completion_text(completion).split(THINK_CLOSE)[0]
    correct = written = 0
    for m in _STEP.finditer(text):
        before, after = text[:m.start()].rstrip(" "), text[m.end():].lstrip(" ")
        decimal = text[m.start() - 1:m.start()] == "." or re.match(r"\.[0-9]", text[m.end():m.end() + 2])
        if decimal or (before and before[-1] in _JOINED) or (after and after[0] in _JOINED.replace("(", "")):
            continue
        a, op, b, c = (int(m[1]), m[2], int(m[3]), int(m[4]))
        written += 1
        if op == "/":
            correct += b != 0 and a == b * c
        else:
            correct += _APPLY[op](a, b) == c
    return correct, written


def think_arithmetic_reward(completions: list, **columns) -> list[float]:
    """The fraction of the arithmetic steps written in `<think>` that are right (`think_arithmetic`);
    0.0 when none is written. With weight 0 it is an audit curve beside the success rate; with a weight
    it makes the reasoning's arithmetic part of what GRPO optimizes. Ignores the dataset columns."""
    scores = []
    for c in completions:
        correct, written = think_arithmetic(c)
        scores.append(correct / written if written else 0.0)
    return scores


def _check_aligned(name: str, completions: list, **columns: Sequence) -> None:
    """A data error (columns not aligned with the completions) must raise, not score 0."""
    for key, column in columns.items():
        if len(column) != len(completions):
            raise ValueError(f"{name} got {len(completions)} completions and {len(column)} {key}")


def _number_list(ns) -> list:
    if isinstance(ns, str):  # e.g. "[1, 2, 3]" from a CSV that was not parsed
        raise ValueError(f"nums must be a list of integers, got the string {ns!r}")
    return list(ns)


def as_int(value) -> int:
    """An integer from an int, a numpy integer, or an integer string like " 65"; anything else raises.

    Floats are refused even when integral: a float target means the data was built wrongly.
    """
    if isinstance(value, str):
        if _INT_STRING.fullmatch(value) is None:
            raise ValueError(f"expected an integer, got the string {value!r}")
        return int(value)
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got the bool {value!r}")
    try:
        return operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}") from None
