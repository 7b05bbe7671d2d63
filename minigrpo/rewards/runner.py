"""Scoring a batch of completions with a weighted list of reward functions.

Legend: P prompts, G completions per prompt (`group_size`), N = P*G completions, prompt-major:
completions p*G .. p*G+G-1 belong to prompt p.

The reward protocol is TRL's: a reward is any callable, called once per batch by keyword,

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]

- `completions`: [N] completion texts; for a conversational prompt (a list of messages, TRL's
  conversational format) the completion is `[{"role": "assistant", "content": prefill + text}]`, where
  `prefill` is the content of a final assistant message of the prompt (which then leaves `prompts`,
  as in TRL).
- `prompts`: [N] the prompt of each completion: the dataset's `prompt` value (a string or a list of
  messages) when the prompt was rendered from that column, else the rendered prompt text (a
  `PromptTemplate` or a `messages` column made it).
- `completion_ids`: [N] lists of the completion's token ids (when the caller has them).
- `trainer_state`: one object for the batch, not a list (`minigrpo.startup.TrainerState`:
  `global_step`, `max_steps`, counted in optimizer updates as TRL does), for rewards that change
  with training progress.
- `columns`: the dataset's other columns, [N] each, aligned with `completions` (`repeat_columns`
  builds them from per-prompt columns).

A reward receives the names its signature accepts: all of them with `**kwargs` (TRL requires that;
here it is optional), else the ones it names. A parameter without a default that none of these fills
is an error before any reward runs. `async def` rewards are run to completion. `None` means "does
not apply to this completion": it counts as 0 in the total and is left out of that reward's logged
mean.

Failures are loud. A reward that raises is re-called one completion at a time to find the
completions it raises on; under `on_error="zero"` (default) those score 0, are counted in
`num_failures`, and one `RewardWarning` per reward and batch names the reward and shows the first
few of them (text truncated to 200 characters) with their error; under `on_error="raise"` the first
one is a `RewardError` with its traceback. Returning the wrong number of values, a
non-number, NaN or inf, exceeding `timeout_s`, or killing the process is always a `RewardError`.

Example (two prompts, two completions each; weights 1 and 0.5):

>>> from minigrpo.rewards import Reward, score_completions, format_reward
>>> def short(completions, **kw): return [1.0 if len(c) < 30 else 0.0 for c in completions]
>>> done = "ok</think>\\n<answer>1</answer>"
>>> s = score_completions([Reward(format_reward), Reward(short, weight=0.5)],
...                       [done, "no", done + " " * 40, "no"], ["p1", "p1", "p2", "p2"], {}, 2)
>>> s.total.tolist()  # [1 + 0.5, 0 + 0.5, 1 + 0, 0 + 0.5]
[1.5, 0.5, 1.0, 0.5]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minigrpo.rewards.isolation import RewardError, accepted_keywords, call_rewards_forked, call_rewards_inline

_SHOWN_CHARS = 200  # how much of an offending completion a warning or error shows
_SHOWN_FAILURES = 3  # how many offending completions one warning shows
_ON_ERROR = ("zero", "raise")
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")  # what TRL passes besides columns


class RewardWarning(UserWarning):
    """A reward raised on some completions of a batch, which were scored 0 (`on_error="zero"`)."""


@dataclass
class Reward:
    """A reward function with its weight in the total; `name` (default `fn.__name__`) keys its metrics."""

    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Reward.fn must be callable, got {type(self.fn).__name__}")
        if self.name is None:
            self.name = getattr(self.fn, "__name__", None)
        if not self.name or self.name == "<lambda>":
            raise ValueError(f"Reward of {self.fn!r} needs a name= (it has no usable __name__)")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"Reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


@dataclass
class RewardScores:
    """Scores of N completions in groups of `group_size`."""

    total: torch.Tensor  # [N] float32: sum of weight * value, None counting as 0
    per_reward: dict[str, list[float | None]]  # name -> [N]
    num_failures: dict[str, int]  # name -> completions that raised and were scored 0
    group_size: int  # G

    def groups(self, keep: list[int]) -> RewardScores:
        """The scores of the groups (prompt indices) `keep`, in that order. `num_failures` stays the
        whole batch's (which completions failed is not kept): log failures from the full scores."""
        idx = [g * self.group_size + j for g in keep for j in range(self.group_size)]
        return RewardScores(self.total[idx], {k: [v[i] for i in idx] for k, v in self.per_reward.items()},
                            dict(self.num_failures), self.group_size)

    @staticmethod
    def concat(parts: list[RewardScores]) -> RewardScores:
        """The scores of `parts` (same rewards, same group size) one after the other; failures add up."""
        return RewardScores(torch.cat([p.total for p in parts]),
                            {k: [v for p in parts for v in p.per_reward[k]] for k in parts[0].per_reward},
                            {k: sum(p.num_failures.get(k, 0) for p in parts) for k in parts[0].num_failures},
                            parts[0].group_size)

    def metrics(self) -> dict[str, float]:
        """Plain floats to log.

        `reward/<name>/mean`: mean over the completions where the reward is not None (NaN if none);
        `reward/<name>/group_std`: mean over groups of the unbiased std (ddof=1, as
        `minigrpo.algo.advantages` normalizes) of the group's non-None values, groups with fewer
        than two skipped (NaN if none is left); `reward/<name>/failures`; `reward/total/mean`,
        `reward/total/std` (unbiased, over all N), `reward/total/group_std`.
        """
        out: dict[str, float] = {}
        for name, values in self.per_reward.items():
            out[f"reward/{name}/mean"] = _mean([v for v in values if v is not None])
            out[f"reward/{name}/group_std"] = _mean_group_std(values, self.group_size)
            out[f"reward/{name}/failures"] = float(self.num_failures.get(name, 0))
        total = self.total.tolist()
        out["reward/total/mean"] = _mean(total)
        out["reward/total/std"] = _std(total)
        out["reward/total/group_std"] = _mean_group_std(total, self.group_size)
        return out


def score_completions(
    rewards: list[Reward],
    completions: list[str],
    prompts: list,
    columns: dict[str, Sequence],
    group_size: int,
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: object | None = None,
    on_error: str = "zero",
    timeout_s: float = 60.0,
    isolate: bool = True,
) -> RewardScores:
    """Call every reward on the batch and combine them into the weighted total.

    Args:
        rewards: the rewards, with weights and unique names.
        completions: [N] completion texts, prompt-major in groups of `group_size`; rewards receive
            them as messages where the prompt is a list of messages (see the module docstring).
        prompts: [N] the prompt of each completion: a string or a list of messages.
        columns: dataset column name -> [N] values aligned with `completions` (see `repeat_columns`).
        group_size: G; N must be a multiple of it.
        completion_ids: [N] token ids of each completion, passed as `completion_ids=` (omitted if None).
        trainer_state: passed as `trainer_state=` (omitted if None).
        on_error: "zero" (a completion a reward raises on scores 0, with a counted `RewardWarning`)
            or "raise" (`RewardError` naming the reward and the completion).
        timeout_s: time limit for each reward's call on the batch (and again for its per-completion
            re-calls if the batch call raised).
        isolate: True runs the rewards in a forked child killed at the deadline (~7-30 ms per
            batch, see `isolation`);
            False runs them in this process, for rewards that must keep state in memory or where
            fork is unavailable: then a hang hangs the caller and the time limit is checked afterwards.

    Returns:
        `RewardScores` with `total` [N] float32.

    Raises:
        ValueError: inconsistent arguments.  RewardError: see the module docstring.
    """
    n = len(completions)
    shared = {} if trainer_state is None else {"trainer_state": trainer_state}
    _check_arguments(rewards, completions, prompts, columns, completion_ids, shared, group_size, on_error, timeout_s)
    prompts, as_given = trl_prompts_and_completions(list(prompts), list(completions))
    aligned = {"completions": as_given, "prompts": prompts, **columns}
    if completion_ids is not None:
        aligned["completion_ids"] = [list(ids) for ids in completion_ids]
    names = [r.name for r in rewards]
    call = call_rewards_forked if isolate else call_rewards_inline
    outcomes = call([r.fn for r in rewards], names, aligned, shared, timeout_s)

    per_reward: dict[str, list[float | None]] = {}
    num_failures: dict[str, int] = {}
    for name, outcome in zip(names, outcomes):
        if outcome.error is not None:
            raise RewardError(f"reward {name!r} {outcome.error}")
        values = list(outcome.values)
        if outcome.failures and on_error == "raise":
            j, tb = outcome.failures[0]
            raise RewardError(f"reward {name!r} raised on completion {j} {_shorten(completions[j])!r}:\n{tb}")
        if outcome.failures:
            # One warning per reward and batch, not per completion: readable logs, and the warnings
            # registry (which remembers every distinct message) stays small over a long run.
            shown = "; ".join(
                f"completion {j} {_shorten(completions[j])!r}: {_last_line(tb)}"
                for j, tb in outcome.failures[:_SHOWN_FAILURES]
            )
            more = len(outcome.failures) - _SHOWN_FAILURES
            warnings.warn(
                f"reward {name!r} raised on {len(outcome.failures)} of {n} completions, scored 0 "
                f"(on_error='zero'): {shown}" + (f"; and {more} more" if more > 0 else ""),
                RewardWarning,
                stacklevel=2,
            )
            for j, _ in outcome.failures:
                values[j] = 0.0
        if outcome.batch_traceback is not None and not outcome.failures:
            warnings.warn(
                f"reward {name!r} raised {_last_line(outcome.batch_traceback)} on the batch of {n} but on "
                f"no single completion; used its one-by-one values",
                RewardWarning,
                stacklevel=2,
            )
        per_reward[name] = values
        num_failures[name] = len(outcome.failures)

    total = [0.0] * n
    for reward in rewards:
        for j, v in enumerate(per_reward[reward.name]):
            if v is not None:
                total[j] += reward.weight * v
    return RewardScores(
        total=torch.tensor(total, dtype=torch.float32),  # [N]
        per_reward=per_reward,
        num_failures=num_failures,
        group_size=group_size,
    )


def repeat_columns(columns: dict[str, Sequence], group_size: int) -> dict[str, list]:
    """Per-prompt columns ([P] each) -> per-completion columns ([N] = [P*G] each), prompt-major.

    >>> repeat_columns({"target": [65, 7]}, 2)
    {'target': [65, 65, 7, 7]}
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return {name: [v for v in col for _ in range(group_size)] for name, col in columns.items()}


def trl_prompts_and_completions(prompts: list, completions: list[str]) -> tuple[list, list]:
    """What rewards receive as `prompts` and `completions`, the way TRL builds them.

    A prompt that is a list of messages (conversational) makes its completion the assistant message
    `[{"role": "assistant", "content": prefill + text}]`, where `prefill` is the content of the
    prompt's final assistant message (the start of the reply the model continued), which leaves the
    prompt. Other prompts and their completions pass unchanged.

    >>> trl_prompts_and_completions([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>"}]],
    ...                             ["4</think>"])
    ([[{'role': 'user', 'content': '2+2?'}]], [[{'role': 'assistant', 'content': '<think>4</think>'}]])
    """
    out_prompts, out_completions = [], []
    for prompt, text in zip(prompts, completions):
        if isinstance(prompt, (list, tuple)):
            prefilled = bool(prompt) and prompt[-1]["role"] == "assistant"
            prefill = prompt[-1]["content"] if prefilled else ""
            out_prompts.append(list(prompt[:-1]) if prefilled else list(prompt))
            out_completions.append([{"role": "assistant", "content": prefill + text}])
        else:
            out_prompts.append(prompt)
            out_completions.append(text)
    return out_prompts, out_completions


def _check_arguments(rewards, completions, prompts, columns, completion_ids, shared, group_size, on_error,
                     timeout_s) -> None:
    n = len(completions)
    if not rewards:
        raise ValueError("score_completions needs at least one Reward")
    if not all(isinstance(r, Reward) for r in rewards):
        raise TypeError("rewards must be Reward objects: wrap functions as Reward(fn, weight)")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique (they key the metrics), got {names}")
    if not all(isinstance(c, str) for c in completions):
        raise TypeError("completions must be a list of str")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions are not whole groups of group_size={group_size}")
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    if completion_ids is not None and len(completion_ids) != n:
        raise ValueError(f"{len(completion_ids)} completion_ids for {n} completions")
    for name, col in columns.items():
        if name in REWARD_ARGUMENTS:
            raise ValueError(f"column {name!r} would shadow the reward argument of that name")
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} values for {n} completions")
    offered = ["prompts", "completions", *(["completion_ids"] if completion_ids is not None else []), *shared, *columns]
    for reward in rewards:
        try:
            accepted_keywords(reward.fn, offered)
        except TypeError as e:
            raise ValueError(f"reward {reward.name!r} {e} (TRL's protocol: the texts come as `completions=`)") from None
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... [{len(text)} chars]"


def _last_line(tb: str) -> str:
    lines = [line for line in tb.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "an error"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    """Unbiased std (ddof=1), like torch.std and the advantage normalization; NaN for fewer than 2 values."""
    if len(xs) < 2:
        return math.nan
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _mean_group_std(values: list[float | None], group_size: int) -> float:
    stds = []
    for start in range(0, len(values), group_size):
        group = [v for v in values[start : start + group_size] if v is not None]
        if len(group) >= 2:
            stds.append(_std(group))
    return _mean(stds)
