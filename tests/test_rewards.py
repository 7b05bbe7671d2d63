"""Countdown rewards: the seed's five completions, every rejection rule, and hostile input."""

import random
import re
import time
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minigrpo.rewards import (
    InvalidExpression,
    equation_reward,
    evaluate_answer,
    extract_answer,
    format_reward,
    tag_reward,
)
from minigrpo.rewards.countdown import as_int
from minigrpo.rewards.expression import MAX_CHARS, MAX_DEPTH

# The five test completions of the Mini-R1 post, verbatim (target 65, numbers [19, 36, 55, 7]).
correct_sample_1 = """We need to find an equation using the numbers 19, 36, 55, and 7
exactly once, with basic arithmetic operations, that equals 65. One possible
combination is 55 + 36 - 19 + 7... </think>

<answer> 55 + 36 - 7 - 19 </answer>"""

correct_sample_2 = """ ... </think>

<answer> 55 + 36 - 7 - 19 </answer>"""

wrong_format = """User: Using the numbers [19, 36, 55, 7], create an equation that equals 65."""

wrong_format_2 = """To find the equation that equals 79 using the numbers 95, 78, 6, 88, I'll start by adding 88 and 95:                      
95 + 88 = 183                                                                                                              
Now, let's subtract 104 from 183 to get 79:
183 - 104 = 79
<think> 183 - 104 = 79 </think><think> 183 - 104 = 79 </think><answer> 183 - 104 = 79 </answer>"""  # noqa: W291

wrong_result = """ ... </think>

<answer> 55 + 36 - 7 - 18 </answer>"""

SEED = [correct_sample_1, correct_sample_2, wrong_format, wrong_format_2, wrong_result]


def wrap(answer: str) -> str:
    return f"thinking</think>\n<answer>{answer}</answer>"


# ---------------------------------------------------------------- the seed's expectations


def test_seed_samples_format():
    # The seed's own regex wanted exactly one "\n" after </think> and so failed samples 1, 2 and 5.
    assert format_reward(SEED, target=["65"] * 5, nums=[[19, 36, 55, 7]] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "target, nums",
    [
        (["65"] * 5, [[19, 36, 55, 7]] * 5),  # the seed's call: string targets
        ([65] * 5, [np.array([19, 36, 55, 7])] * 5),  # numpy arrays, as a dataset in numpy format gives
        ([np.int64(65)] * 5, [["19", "36", "55", "7"]] * 5),  # numeric strings
    ],
)
def test_seed_samples_equation(target, nums):
    assert equation_reward(SEED, target=target, nums=nums) == [1.0, 1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- format rules, one per row

FORMAT_CASES = [
    ("a</think>\n<answer>x</answer>", 1.0, "minimal"),
    ("</think>\n<answer>x</answer>", 1.0, "empty thinking is allowed"),
    ("a</think>\n<answer></answer>", 1.0, "empty answer is allowed (the equation reward judges it)"),
    ("a</think>\n\n<answer>x</answer>", 1.0, "blank line between (the seed's samples)"),
    ("a</think> \r\n\t<answer>x</answer>", 1.0, "any whitespace holding a newline"),
    ("a</think>\n<answer>x</answer>\n\n  ", 1.0, "trailing whitespace"),
    ("a</think><answer>x</answer>", 0.0, "no newline before <answer>"),
    ("a</think>  <answer>x</answer>", 0.0, "spaces but no newline"),
    ("a</think>\nso:\n<answer>x</answer>", 0.0, "text between </think> and <answer>"),
    ("a</think>\n<answer>x</answer> done", 0.0, "text after </answer>"),
    ("<think>a</think>\n<answer>x</answer>", 0.0, "repeats <think> (the prompt opened it)"),
    ("a<think>b</think>\n<answer>x</answer>", 0.0, "<think> inside the thinking"),
    ("a</think>b</think>\n<answer>x</answer>", 0.0, "</think> twice"),
    ("a\n<answer>x</answer>", 0.0, "no </think>"),
    ("a</think>\n", 0.0, "no answer"),
    ("a</think>\n<answer>x", 0.0, "answer not closed"),
    ("a</think>\n<answer>x</answer>\n<answer>y</answer>", 0.0, "two answer blocks"),
    ("a</think>\n<answer>x<think></answer>", 0.0, "tag inside the answer"),
    ("a</think>\n<answer>x</answer></answer>", 0.0, "</answer> twice"),
    ("", 0.0, "empty completion"),
]


@pytest.mark.parametrize("completion, expected, why", FORMAT_CASES, ids=[c[2] for c in FORMAT_CASES])
def test_format_rules(completion, expected, why):
    assert format_reward([completion]) == [expected]


TAG_CASES = [
    # (completion, expected, why)
    ("no tags at all", 0.0, "nothing"),
    ("a<think>b</think>\n<answer>1</answer>", 0.0, "<think> again: milestone 1 fails, nothing after counts"),
    ("a</think>b</think>\n<answer>1</answer>", 0.0, "</think> twice"),
    ("a</think> then rambling", 0.25, "closed the thinking only"),
    ("<answer>1</answer> before</think>", 0.25, "answer before </think> does not count"),
    ("a</think>\n<answer> 1 + 2", 0.5, "answer opened, never closed (e.g. truncated)"),
    ("a</think><answer>1</answer>", 0.75, "no newline between the blocks: not the strict format"),
    ("a</think>\n<answer>1</answer> and more", 0.75, "text after </answer>"),
    ("a</think>\n<answer>1</answer>", 1.0, "the strict format"),
    ("a</think>\n\n<answer> 55 + 36 - 7 - 19 </answer>\n", 1.0, "strict format with blank line and trailing newline"),
]


@pytest.mark.parametrize("completion, expected, why", TAG_CASES, ids=[c[2] for c in TAG_CASES])
def test_tag_reward_milestones(completion, expected, why):
    assert tag_reward([completion]) == [expected]


def test_tag_reward_is_one_exactly_when_format_reward_is():
    """Every format case: tag_reward reaches 1.0 iff format_reward does, and never exceeds it by a milestone it skipped."""
    completions = [c for c, _, _ in FORMAT_CASES] + [c for c, _, _ in TAG_CASES]
    for c, tag, fmt in zip(completions, tag_reward(completions), format_reward(completions)):
        assert (tag == 1.0) == (fmt == 1.0), c
        assert tag in (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------- equation rules, one per row

EQUATION_CASES = [
    # (answer, nums, target, expected, why)
    ("2 * 3 * 4", [2, 3, 4], 24, 1.0, "plain"),
    (" (4 * 3) * 2 = 24 ", [2, 3, 4], 24, 1.0, "any order, parentheses, trailing = value"),
    ("2 *\n3 * 4", [2, 3, 4], 24, 1.0, "newline inside the answer"),
    ("(3 + 3 / 7) * 7", [3, 3, 7, 7], 24, 1.0, "fraction intermediate: (24/7) * 7 is exactly 24"),
    ("4 / (3 - 3) + 7", [3, 3, 4, 7], 7, 0.0, "division by zero scores 0, does not raise"),
    ("2 * 3 * 4 = 25", [2, 3, 4], 24, 0.0, "claimed value is not the target"),
    ("2 * 3 * 4 = 24 = 24", [2, 3, 4], 24, 0.0, "two '='"),
    ("2 * 3 * 4 = 24.0", [2, 3, 4], 24, 0.0, "claimed value not an integer"),
    ("2 * 3 * 4 = x", [2, 3, 4], 24, 0.0, "claimed value not a number"),
    ("2 * 3 + 4", [2, 3, 4], 24, 0.0, "wrong value (10)"),
    ("2 * 3", [2, 3, 4], 6, 0.0, "4 unused although the value is the target"),
    ("2 * 2 * 3 * 2", [2, 3, 4], 24, 0.0, "2 used three times"),
    ("2 * 3 * 4 * 1", [2, 3, 4], 24, 0.0, "1 is not in the list"),
    ("2 ** 3 * 3", [2, 3, 3], 24, 0.0, "power (8 * 3 would be 24)"),
    ("7 // 2 * 4", [2, 4, 7], 12, 0.0, "floor division (3 * 4 would be 12)"),
    ("7 % 4 * 3", [3, 4, 7], 9, 0.0, "modulo (3 * 3 would be 9)"),
    ("-(2 - 3) + 4", [2, 3, 4], 5, 0.0, "unary minus (1 + 4 would be 5)"),
    ("+2 * 3 * 4", [2, 3, 4], 24, 0.0, "unary plus"),
    ("abs(2 - 3 * 4) + 14", [2, 3, 4, 14], 24, 0.0, "function call"),
    ("x * 3 * 4", [2, 3, 4], 24, 0.0, "a name"),
    ("__import__('os')", [2, 3, 4], 24, 0.0, "import"),
    ("(2).real * 3 * 4", [2, 3, 4], 24, 0.0, "attribute"),
    ("2.0 * 3 * 4", [2, 3, 4], 24, 0.0, "float literal"),
    ("1e3 - 976", [1000, 976], 24, 0.0, "exponent literal"),
    ("2 * 3 * 4_0", [2, 3, 40], 240, 0.0, "underscore in a literal"),
    ("\uff12 * 3 * 4", [2, 3, 4], 24, 0.0, "fullwidth digit"),
    ("\u0662 * 3 * 4", [2, 3, 4], 24, 0.0, "Arabic-Indic digit"),
    ("02 * 3 * 4", [2, 3, 4], 24, 0.0, "leading zero"),
    ("2 * 3 * 4" + " " * MAX_CHARS, [2, 3, 4], 24, 0.0, "longer than MAX_CHARS"),
    ("(" * (MAX_DEPTH + 1) + "2 * 3 * 4" + ")" * (MAX_DEPTH + 1), [2, 3, 4], 24, 0.0, "parentheses too deep"),
    ("(" * MAX_DEPTH + "2 * 3 * 4" + ")" * MAX_DEPTH, [2, 3, 4], 24, 1.0, "parentheses at the bound"),
    ("+".join(["1"] * (MAX_DEPTH + 2)), [1] * (MAX_DEPTH + 2), MAX_DEPTH + 2, 0.0, "operators too deep"),
    ("9" * 250, [2, 3, 4], 24, 0.0, "huge literal"),
    ("9**9**9**9", [9, 9, 9, 9], 24, 0.0, "the seed's eval would never return"),
    ("", [2, 3, 4], 24, 0.0, "empty answer"),
    ("2 * 3 * 4 ==", [2, 3, 4], 24, 0.0, "dangling '='"),
    ("2 * 3 4", [2, 3, 4], 24, 0.0, "syntax error"),
]


@pytest.mark.parametrize("answer, nums, target, expected, why", EQUATION_CASES, ids=[c[4] for c in EQUATION_CASES])
def test_equation_rules(answer, nums, target, expected, why):
    assert equation_reward([wrap(answer)], target=[target], nums=[nums]) == [expected]


def test_evaluate_answer_is_exact_and_reports_the_reason():
    assert evaluate_answer("(3 + 3 / 7) * 7", [3, 3, 7, 7]) == (Fraction(24), None)
    assert evaluate_answer("(1 + 2) / 3 = 1", [1, 2, 3]) == (Fraction(1), 1)  # the seed prompt's example
    assert evaluate_answer("7 / 2", [2, 7]) == (Fraction(7, 2), None)
    with pytest.raises(InvalidExpression, match="not in the list"):
        evaluate_answer("2 * 5", [2, 3])
    with pytest.raises(InvalidExpression, match=r"not used: \[3\]"):
        evaluate_answer("2", [2, 3])
    with pytest.raises(InvalidExpression, match="Pow is not allowed"):
        evaluate_answer("2 ** 3", [2, 3])
    with pytest.raises(InvalidExpression, match="UnaryOp is not allowed"):
        evaluate_answer("-2 + 3", [2, 3])


def test_last_answer_block_counts():
    assert extract_answer("<answer>1</answer> then <answer>2 * 3 * 4</answer>") == "2 * 3 * 4"
    assert extract_answer("<answer>a<answer>b</answer>") == "b"
    assert extract_answer("no tags") is None and extract_answer("</answer><answer>") is None
    two = ["<answer>1</answer><answer>2 * 3 * 4</answer>", "<answer>2 * 3 * 4</answer><answer>1</answer>"]
    assert equation_reward(two, target=[24, 24], nums=[[2, 3, 4]] * 2) == [1.0, 0.0]


def test_bad_columns_raise_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="equation_reward got 1 completions and 2 target"):
        equation_reward(["x"], target=[1, 2], nums=[[1]])
    with pytest.raises(ValueError, match=r"got the string '\[1, 2\]'"):
        equation_reward(["x"], target=[3], nums=["[1, 2]"])
    for bad in ["6.5", "", "١", 6.0, True, None]:
        with pytest.raises(ValueError, match="expected an integer"):
            as_int(bad)
    assert [as_int(v) for v in [" 65 ", "-3", np.int32(7), 8]] == [65, -3, 7, 8]


# ---------------------------------------------------------------- hostile input: fast, never raises

ADVERSARIAL = [
    "9**9**9**9",
    "(" * 1_000_000 + "1" + ")" * 1_000_000,  # a megabyte of parentheses: must not reach the parser
    "(" * 150 + "2*3*4" + ")" * 150,
    "9" * 100_000,
    "1" + "*1" * 100_000,
    "\u0661\u0662\u0663",
    "1e3",
    "__import__('os').system('true')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "\x00",
    "2 * 3 * 4 = " + "9" * 10_000,
    "=" * 1000,
    "<answer>" * 10_000,
    "</answer>" * 10_000,
]


def _hostile_corpus() -> list[str]:
    """Completions: the adversarial answers wrapped in tags, raw, and seeded random strings."""
    rng = random.Random(0)
    alphabet = "0123456789+-*/()= .e_xj\n<>\u0663\uff12" + "</answer><answer></think>"
    out = [wrap(a) for a in ADVERSARIAL] + ADVERSARIAL
    out += [wrap("".join(rng.choices(alphabet, k=rng.randint(0, 80)))) for _ in range(2000)]
    return out


def test_hostile_input_is_fast_and_never_raises():
    corpus = _hostile_corpus()
    worst = 0.0
    start = time.perf_counter()
    for c in corpus:
        t = time.perf_counter()
        equation_reward([c], target=[24], nums=[[2, 3, 4]])
        format_reward([c])
        worst = max(worst, time.perf_counter() - t)
    mean = (time.perf_counter() - start) / len(corpus)
    # Complexity guards, not speed targets: bounds ~100x above the quiet-machine figures (19 us mean)
    # so a loaded CI machine passes, while a backtracking regex on the megabyte inputs (minutes) fails.
    assert mean < 5e-3, f"mean {mean * 1e6:.0f} us per completion"
    assert worst < 2.0, f"worst {worst * 1e3:.1f} ms"  # the megabyte inputs: linear scans only


# An independent judge for the property test: its own tokenizer and recursive-descent parser.
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _reference_value(answer: str, nums: list[int]) -> Fraction | None:
    """Value of `answer` if it is numbers from `nums` (each once) joined by + - * / and parentheses."""
    if len(answer) > MAX_CHARS:  # this recursive parser is only for the short answers the property makes
        return None
    tokens = []
    for number, other in _TOKEN.findall(answer.strip()):
        if number and number.isascii():
            tokens.append(int(number))
        elif other in ("+", "-", "*", "/", "(", ")"):
            tokens.append(other)
        else:
            return None
    pos = 0

    def expr():  # expr := term (('+' | '-') term)*
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in ("+", "-"):
            op, pos = tokens[pos], pos + 1
            value = value + term() if op == "+" else value - term()
        return value

    def term():  # term := atom (('*' | '/') atom)*
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] in ("*", "/"):
            op, pos = tokens[pos], pos + 1
            value = value * atom() if op == "*" else value / atom()
        return value

    def atom():  # atom := NUMBER | '(' expr ')'
        nonlocal pos
        if pos < len(tokens) and isinstance(tokens[pos], int):
            pos += 1
            return Fraction(tokens[pos - 1])
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            value = expr()
            if pos < len(tokens) and tokens[pos] == ")":
                pos += 1
                return value
        raise ValueError("bad syntax")

    try:
        value = expr()
    except (ValueError, ZeroDivisionError):
        return None
    used = sorted(t for t in tokens if isinstance(t, int))
    return value if pos == len(tokens) and used == sorted(nums) else None


@lru_cache(maxsize=None)
def _reachable(nums: tuple) -> frozenset:
    """Brute force: every value an expression using all of `nums` once can take (Fractions)."""
    if len(nums) == 1:
        return frozenset({Fraction(nums[0])})
    out = set()
    idx = range(len(nums))
    for k in range(1, len(nums) // 2 + 1):
        for left in combinations(idx, k):
            right = tuple(i for i in idx if i not in left)
            for a in _reachable(tuple(sorted(nums[i] for i in left))):
                for b in _reachable(tuple(sorted(nums[i] for i in right))):
                    out.update({a + b, a - b, b - a, a * b})
                    out.update({a / b} if b else set())
                    out.update({b / a} if a else set())
    return frozenset(out)


@st.composite
def _expressions(draw):
    """A random expression over some numbers (sometimes with a foreign op or number), its numbers."""
    nums = draw(st.lists(st.integers(1, 20), min_size=2, max_size=4))
    terms = [str(n) for n in nums]
    while len(terms) > 1:
        i = draw(st.integers(0, len(terms) - 2))
        op = draw(st.sampled_from(["+", "-", "*", "/", "+", "-", "*", "/", "**", "//", "%"]))
        joined = f"{terms[i]} {op} {terms[i + 1]}"
        terms[i : i + 2] = [f"({joined})" if draw(st.booleans()) else joined]
    if draw(st.integers(0, 9)) == 0:
        terms[0] += draw(st.sampled_from([" + 1", " * 100", " = 7", " - 1.5", " + ١"]))
    return terms[0], nums


_texts = st.one_of(
    st.text(max_size=120),
    st.text(alphabet="0123456789+-*/()= ", max_size=60),
    st.sampled_from(ADVERSARIAL),
)


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_never_raises_and_scores_one_only_when_correct(data):
    if data.draw(st.booleans()):
        answer, nums = data.draw(_expressions())
        reference = _reference_value(answer.split("=")[0], nums)
        # Half the time set the target to the true value, so correct answers are common.
        if reference is not None and reference.denominator == 1 and data.draw(st.booleans()):
            target = int(reference)
        else:
            target = data.draw(st.integers(-50, 200))
    else:
        answer, nums, target = data.draw(_texts), [2, 3, 4], 24
    completion = data.draw(st.sampled_from([wrap(answer), answer, f"<answer>{answer}</answer>junk"]))

    t = time.perf_counter()
    score = equation_reward([completion], target=[str(target)], nums=[nums])[0]
    fmt = format_reward([completion])[0]
    assert time.perf_counter() - t < 0.05
    assert score in (0.0, 1.0) and fmt in (0.0, 1.0)
    event(f"equation reward {score}")  # see them with --hypothesis-show-statistics: both must occur
    if score == 1.0:
        inner = extract_answer(completion)
        lhs, _, claimed = inner.partition("=")
        assert _reference_value(lhs, nums) == target  # an independent parser agrees on the value...
        assert not claimed or int(claimed) == target
        assert Fraction(target) in _reachable(tuple(sorted(nums)))  # ...and brute force says it is possible
    # Completeness on clean input: a tagged plain + - * / expression over the numbers equal to the target scores 1.
    clean = re.fullmatch(r"[0-9+\-*/() ]*", answer) and "**" not in answer and "//" not in answer
    if clean and completion != answer and _reference_value(answer, nums) == target:
        assert score == 1.0, (answer, nums, target)


def _answer(text):
    return f"I try.</think>\n<answer>{text}</answer>"


@pytest.mark.parametrize("answer, expected, why", [
    ("1 + 2 = 3", 0.0, "the prompt's example: none of the numbers"),
    ("70 + 28 - 10 = 88", 1.0, "each number once (the value is not this reward's business)"),
    ("(70 - 28) * 10", 1.0, "parentheses and order do not matter"),
    ("70 + 28 = 98", 2 / 3, "two of three"),
    ("70 + 28 + 28 + 10", 3 / 4, "one used twice: 3 of 4 literals match"),
    ("70 + 28 + 10 + 5", 3 / 4, "an extra number"),
    ("88", 0.0, "the target alone"),
])
def test_numbers_reward_hand_cases(answer, expected, why):
    from minigrpo.rewards import numbers_reward

    assert numbers_reward([_answer(answer)], nums=[[70, 28, 10]]) == [pytest.approx(expected)], why


def test_numbers_reward_without_an_answer_and_misaligned_columns():
    from minigrpo.rewards import numbers_reward

    assert numbers_reward(["no answer here", "70 28 10"], nums=[[70, 28, 10]] * 2) == [0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions and 1 nums"):
        numbers_reward(["a", "b"], nums=[[1, 2]])


@pytest.mark.parametrize("answer, expected, why", [
    ("70 + 28 - 10", 1.0, "exactly the target (88)"),
    ("70 + 28 - 10 = 5", 1.0, "a wrong claimed value is equation_reward's business"),
    ("70 - 28 + 10", 1 - 36 / 88, "52: off by 36 of 88"),
    ("(70 - 28) * 10", 0.0, "420: off by more than the target"),
    ("70 + 28", 0.0, "not every number used: not an equation over the numbers"),
    ("1 + 2 = 3", 0.0, "other numbers"),
    ("70 / 28 * 10 + 63", 0.0, "63 is not given"),
    ("(70 + 10) / 28", 1 - (88 - 80 / 28) / 88, "fractions are exact"),
])
def test_closeness_reward_hand_cases(answer, expected, why):
    from minigrpo.rewards import closeness_reward

    assert closeness_reward([_answer(answer)], target=[88], nums=[[70, 28, 10]]) == [pytest.approx(expected)], why


def test_closeness_reward_is_one_exactly_where_the_value_is_the_target():
    from minigrpo.rewards import closeness_reward, equation_reward

    completions = [_answer(a) for a in ("3 * 4 + 5", "3 * 4 - 5", "(3 + 4) * 5", "3 + 4 + 5 = 12")]
    close = closeness_reward(completions, target=[17, 17, 17, 12], nums=[[3, 4, 5]] * 4)
    exact = equation_reward(completions, target=[17, 17, 17, 12], nums=[[3, 4, 5]] * 4)
    assert [c == 1.0 for c in close] == [e == 1.0 for e in exact] == [True, False, False, True]


@pytest.mark.parametrize("think, expected, why", [
    (" 48 - 39 = 9, 9 + 31 = 40.", (2, 2), "the warm-up's chain of steps, both right"),
    (" 48 - 39 = -75, 31 * -75 = 400.", (0, 2), "the drift seen after GRPO: steps that are nonsense"),
    (" 39 - 48 = -9, 31 - -9 = 40.", (2, 2), "negative operands and results"),
    (" 8 / 2 = 4, 7 / 2 = 3, 5 / 0 = 0.", (1, 3), "division is exact; by zero is wrong"),
    (" I try (6 + 9) * 2 and see.", (0, 0), "no step written"),
    ("12+30=42", (1, 1), "without spaces"),
    (" 10 - 3 - 2 = 5.", (0, 0), "a longer expression is not a step: not counted, right or wrong"),
    (" 6 + 9 * 2 = 24.", (0, 0), "precedence: not a step"),
    (" 7 / 2 = 3.5, 3.5 * 2 = 7.", (0, 0), "decimals are not steps"),
    (" 2 + 3 = 5 + 1 = 6.", (0, 0), "a chained equality is not a step"),
    (" (6 + 9) = 15, 15 * 2 = 30.", (1, 1), "only the stand-alone step counts"),
    (" 48 - 39 = 9. 9 + 31 = 40.", (2, 2), "a full stop after a result ends the step"),
    (" 1" + "0" * 30 + " + 1 = 2.", (0, 0), "more than 18 digits: not a step"),
])
def test_think_arithmetic_hand_cases(think, expected, why):
    from minigrpo.rewards import think_arithmetic, think_arithmetic_reward

    completion = think + "</think>\n<answer>1 + 2 = 99</answer> 2 + 2 = 5"  # after </think>: not read
    assert think_arithmetic(completion) == expected, why
    correct, written = expected
    assert think_arithmetic_reward([completion]) == [correct / written if written else 0.0]


def test_think_arithmetic_reads_the_reply_of_a_conversational_completion():
    from minigrpo.rewards import think_arithmetic

    reply = [{"role": "assistant", "content": "Let me see. <think>2 + 2 = 5, 3 * 3 = 9</think>"}]
    assert think_arithmetic(reply) == (1, 2)
