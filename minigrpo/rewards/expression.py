"""Exact, bounded evaluation of Countdown answers such as `(55 + 36) - 7 - 19` or `(1 + 2) / 3 = 1`.

Never `eval`: the text is checked character by character, then parsed with `ast`, then walked by a
whitelist that admits only non-negative integer literals, binary `+ - * /` and parentheses, and
computed with `fractions.Fraction`, so `1 / 3 * 3` is exactly 1 and nothing is ever rounded.

Every check that can be made on the raw string is made before `ast.parse`, because parsing is the
only step whose cost grows with hostile input (a megabyte of parentheses is slow to parse or raises
RecursionError/MemoryError). With the length bound below an answer is judged in microseconds.

Rejected (raises `InvalidExpression`, which the reward turns into 0.0): any character other than
ASCII digits, `+ - * / ( ) =` and spaces/tabs/newlines (so names, calls, attributes, `.`, `1e3`,
`1_000`, `%`, unicode digits never reach the parser); `**`, `//`, unary `+`/`-`; a literal that is not
one of the given numbers or is used more often than given; not using every number; more than one
`=`; a right-hand side that is not an integer; parentheses or operators nested deeper than
`MAX_DEPTH`; text longer than `MAX_CHARS`; leading zeros (`07`, a Python syntax error); division by
zero. Intermediate results may be fractions: `(3 + 3 / 7) * 7` is 24.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections import Counter
from fractions import Fraction

# A four-number answer with generous spacing and parentheses is under 60 characters; 300 leaves room
# for `= value` and for tasks with more numbers while keeping the parse in microseconds.
MAX_CHARS = 300
# Nesting bound, applied to the parentheses and to the syntax tree (binary operators nest). Four
# numbers need at most 3 levels; 20 is far beyond any honest answer and far below Python's parser
# (200 parentheses) and recursion limits.
MAX_DEPTH = 20

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()= \t\n\r]*")  # ASCII only: no unicode digits or spaces
_INTEGER = re.compile(r"[ \t\n\r]*(-?[0-9]+)[ \t\n\r]*")  # the optional `= value` side
_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # Fraction division: exact; b == 0 raises ZeroDivisionError
}


class InvalidExpression(ValueError):
    """The answer is not a well-formed Countdown equation over the given numbers (reason in the message)."""


def evaluate_answer(text: str, numbers: list[int]) -> tuple[Fraction, int | None]:
    """Evaluate a Countdown answer exactly.

    Args:
        text: the content of an `<answer>` block, e.g. `" 55 + 36 - 7 - 19 "` or `"(1 + 2) / 3 = 1"`.
        numbers: the task's numbers as a multiset; every one must appear exactly once as a literal.

    Returns:
        `(value, claimed)`: the exact value of the expression left of `=`, and the integer right of
        `=` (None when there is no `=`).

    Raises:
        InvalidExpression: for every rule in the module docstring. Nothing else escapes for any `str`.
    """
    if len(text) > MAX_CHARS:
        raise InvalidExpression(f"answer has {len(text)} characters, more than {MAX_CHARS}")
    if _ALLOWED_CHARS.fullmatch(text) is None:
        raise InvalidExpression("answer contains characters other than digits, + - * / ( ) = and spaces")
    lhs, *rest = text.split("=")
    claimed = None
    if len(rest) > 1:
        raise InvalidExpression("answer has more than one '='")
    if rest:
        match = _INTEGER.fullmatch(rest[0])
        if match is None:
            raise InvalidExpression(f"right of '=' is not an integer: {rest[0].strip()!r}")
        claimed = int(match.group(1))
    depth = max(itertools.accumulate((c == "(") - (c == ")") for c in lhs), default=0)
    if depth > MAX_DEPTH:  # redundant parentheses make no AST node, so bound them on the text
        raise InvalidExpression(f"parentheses nest deeper than {MAX_DEPTH}")
    try:
        tree = ast.parse(" ".join(lhs.split()), mode="eval")  # newlines inside an answer are spaces
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        # ValueError: null bytes (cannot pass the character check, kept for safety);
        # RecursionError/MemoryError: pathological nesting (cannot pass the length bound, idem).
        raise InvalidExpression(f"answer does not parse: {type(e).__name__}") from None
    remaining = Counter(numbers)
    value = _evaluate(tree.body, remaining, depth=0)
    unused = sorted(remaining.elements())
    if unused:
        raise InvalidExpression(f"numbers not used: {unused}")
    return value, claimed


def _evaluate(node: ast.AST, remaining: Counter, depth: int) -> Fraction:
    """Value of a whitelisted node; consumes the literals it meets from `remaining`."""
    if depth > MAX_DEPTH:
        raise InvalidExpression(f"expression nests deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        # type() rather than isinstance(): bool is an int subclass (cannot pass the character check).
        if type(node.value) is not int:
            raise InvalidExpression(f"literal {node.value!r} is not an integer")
        if remaining[node.value] == 0:
            raise InvalidExpression(f"number {node.value} is not in the list or is used too often")
        remaining[node.value] -= 1
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left = _evaluate(node.left, remaining, depth + 1)
        right = _evaluate(node.right, remaining, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidExpression("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.BinOp):
        raise InvalidExpression(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
    raise InvalidExpression(f"{type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")
