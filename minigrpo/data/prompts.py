"""Prompts: templates as data, rendering a dataset row through the tokenizer's chat template, and
tokenizing without silent truncation.

A row becomes prompt text in one of three ways (`render_prompt`):
1. a `PromptTemplate` is given: its system message, its `user` text formatted with the row's columns
   (`str.format`, e.g. "{nums}", "{target}"), and its `assistant_prefix` as the start of the
   assistant's reply, which the model continues (`R1_COUNTDOWN` ends the prompt inside `<think>`);
2. no template and the row has a `messages` column (a list of {"role", "content"}): those messages;
3. no template and the row has a `prompt` column: a string is the user message, or the raw prompt
   text when the tokenizer has no chat template (a base model); a list of messages (TRL's
   conversational format) is those messages, a final assistant message being the start of the reply.
   Rewards then receive the column's values as `prompts` (as TRL passes them; conversational
   completions come as messages too: see `minigrpo.rewards.runner`).

Training on your own dataset: give it a `prompt` (or `messages`) column and any other columns your
reward functions need; every column reaches each reward as a keyword argument, aligned with the
completions (`minigrpo.rewards.repeat_columns` repeats a prompt's values for its G completions):

    ds = Dataset.from_dict({"prompt": ["What is 2 + 2?"], "answer": ["4"]})
    def exact(completions, answer, **kw):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]
    texts = [render_prompt(tokenizer, row) for row in ds]          # no template: the prompt column
    ids = tokenize_prompts(tokenizer, texts, max_prompt_length=256)
    # after generating G completions per prompt:
    score_completions([Reward(exact)], completions, prompts, repeat_columns({"answer": ds["answer"]}, G), G)

`tests/test_prompts.py::test_own_dataset_end_to_end` runs exactly this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """A chat prompt made from a dataset row.

    `user` is a `str.format` template over the row's columns; `system` may be None (no system
    message); a non-empty `assistant_prefix` is prefilled as the start of the reply.
    """

    system: str | None
    user: str
    assistant_prefix: str = ""

    def messages(self, row: Mapping) -> list[dict[str, str]]:
        """The chat messages for `row`; raises ValueError naming a column the template needs but the row lacks."""
        values = {name: _plain(value) for name, value in row.items()}
        try:
            user = self.user.format(**values)
        except KeyError as e:
            raise ValueError(f"prompt template needs column {e.args[0]!r}; the row has {sorted(row)}") from None
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": user})
        if self.assistant_prefix:
            messages.append({"role": "assistant", "content": self.assistant_prefix})
        return messages


# The Mini-R1 prompt, verbatim from the post.
R1_COUNTDOWN = PromptTemplate(
    system=(
        "You are a helpful assistant. You first thinks about the reasoning process in the mind and then "
        "provides the user with the answer."
    ),
    user=(
        "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
        "tags. And return the final equation and answer in <answer> </answer> tags, for example "
        "<answer> (1 + 2) / 3 = 1 </answer>."
    ),
    assistant_prefix="Let me solve this step by step.\n<think>",
)


def render_prompt(tokenizer, row: Mapping, template: PromptTemplate | None = None) -> str:
    """The prompt text for one dataset row (see the module docstring for the three cases).

    Args:
        tokenizer: a Hugging Face tokenizer; its `chat_template` is used when it has one.
        row: one dataset row (column name -> value).
        template: a `PromptTemplate`, or None to use the row's `messages` or `prompt` column.

    Returns:
        Text that ends where the model should continue: after the assistant prefix
        (`continue_final_message=True`) or after the assistant header (`add_generation_prompt=True`).
    """
    has_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if template is not None:
        messages = template.messages(row)
    elif "messages" in row:
        messages = _checked_messages(row["messages"], "messages")
    elif "prompt" in row and not isinstance(row["prompt"], str):
        messages = _checked_messages(row["prompt"], "prompt")  # TRL's conversational format
    elif "prompt" in row:
        if not has_chat_template:
            return row["prompt"]
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise ValueError(
            f"row has neither a 'messages' nor a 'prompt' column (columns: {sorted(row)}); "
            f"pass a PromptTemplate such as R1_COUNTDOWN"
        )
    if not has_chat_template:
        raise ValueError("the tokenizer has no chat template: use a dataset with a raw 'prompt' column")
    prefilled = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages, tokenize=False, continue_final_message=prefilled, add_generation_prompt=not prefilled
    )


def tokenize_prompts(
    tokenizer, texts: Sequence[str], max_prompt_length: int, row_ids: Sequence | None = None
) -> list[list[int]]:
    """Token ids of each rendered prompt, never truncated.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: [P] rendered prompts (`render_prompt`). Special tokens are not added again
            (`add_special_tokens=False`): the chat template already wrote BOS and the like.
        max_prompt_length: a longer prompt is an error, not silently cut.
        row_ids: [P] labels for error messages (e.g. dataset indices); default 0..P-1.

    Returns:
        [P] lists of token ids.

    Raises:
        ValueError: an empty prompt, or one longer than `max_prompt_length` (says its length, the
            limit, and which row).
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    texts = list(texts)
    row_ids = list(range(len(texts))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(texts):
        raise ValueError(f"{len(row_ids)} row_ids for {len(texts)} prompts")
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for row, seq in zip(row_ids, ids):
        if not seq:
            raise ValueError(f"prompt of row {row} is empty")
        if len(seq) > max_prompt_length:
            raise ValueError(
                f"prompt of row {row} has {len(seq)} tokens, more than max_prompt_length={max_prompt_length} "
                f"(prompts are never truncated: shorten it or raise the limit)"
            )
    return [list(seq) for seq in ids]


def _checked_messages(messages, column: str) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"the {column!r} column must hold strings or non-empty lists of messages, got {messages!r:.80}"
                         if column == "prompt" else
                         f"the {column!r} column must hold non-empty lists of messages, got {messages!r:.80}")
    for m in messages:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"each message must be {{'role': str, 'content': str}}, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _plain(value):
    """numpy arrays and scalars as Python lists and numbers, so "{nums}" renders as [19, 36, 55, 7]."""
    return value.tolist() if hasattr(value, "tolist") else value
