"""Turn a GGUF file into an HF-style model folder (tokenizer.json, configs, a link to the weights).

The rest of Lightspeed only understands HF folders: the frontend loads `tokenizer.json` +
`tokenizer_config.json`, the native engine reads `config.json` and finds the weights through
`model.gguf`. Writing the folder once from the GGUF metadata keeps every other module free of GGUF
details and needs no hub access. The tokenizer follows llama.cpp's reading of the metadata (the
reference implementation for GGUF), e.g. the pre-tokenizer regexes chosen by `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)

log = logging.getLogger(__name__)

GGUF_LINK_NAME = "model.gguf"
RECORD_NAME = "lightspeed_gguf.json"  # written last inside the temp dir: names the source file
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")

# llama.cpp token types (gguf `tokenizer.ggml.token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes llama.cpp applies per `tokenizer.ggml.pre` (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp splits digits one by one ("\p{N}") before the GPT-2 regex for these; HF's
# Digits(individual_digits) + ByteLevel(use_regex) is the same two-stage split.
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_LLAMA3_PRES = frozenset({"llama-bpe", "llama3", "smaug-bpe", "falcon3", "pixtral"})
_QWEN2_PRES = frozenset({"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"})
_GPT2_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})

# Text of end-of-turn tokens llama.cpp also treats as end of generation, beyond the EOS id:
# an instruct model that finishes a "document" emits <|endoftext|> rather than <|im_end|>.
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")

_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """The GGUF metadata the folder is derived from (tensor data is never read here)."""

    fields: dict[str, Any]
    tensor_names: frozenset[str]

    @property
    def arch(self) -> str:
        return str(self.fields["general.architecture"])

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(f"{self.arch}.{key}", default)


def read_gguf_info(gguf_path: Path) -> GgufInfo:
    """Read every metadata field (arrays as lists) and the tensor names of a GGUF file."""
    # Imported here: `gguf` (+ numpy) costs ~60 ms, and frontends that only resolve existing
    # folders through the registry never need it.
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    names = frozenset(t.name for t in reader.tensors)
    del reader  # releases the memory map before the caller touches the file again
    return GgufInfo(fields, names)


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = _LLAMA3_REGEX if pre in _LLAMA3_PRES else _QWEN2_REGEX if pre in _QWEN2_PRES else None
    if regex is not None:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        # The Split already applied the regex; ByteLevel only maps bytes to its alphabet.
        byte_map = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_map])
    if pre not in _GPT2_PRES:
        log.warning("unknown tokenizer.ggml.pre %r: using the GPT-2 byte-level split", pre)
    return byte_level


def build_tokenizer(info: GgufInfo) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to llama.cpp's for this GGUF."""
    model_kind = info.fields.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = info.fields["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens; ids would not round-trip")
    merges = [tuple(m.split(" ", 1)) for m in info.fields.get("tokenizer.ggml.merges", [])]
    pre = str(info.fields.get("tokenizer.ggml.pre", "default"))
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _LLAMA3_PRES)
    tokenizer = Tokenizer(bpe)
    if pre in _QWEN2_PRES:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, info.fields.get("tokenizer.ggml.token_type", []))
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    # Registered as added tokens so "<|im_start|>" in text encodes as one id instead of BPE pieces;
    # control tokens are "special" (dropped by skip_special_tokens), user-defined ones are not.
    control = [
        AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind == _TOKEN_CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(types)
        if kind == _TOKEN_USER_DEFINED
    ]
    tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


# ---------------------------------------------------------------- configs


_SPECIAL_ID_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _token_text(info: GgufInfo, key: str) -> str | None:
    token_id = info.fields.get(f"tokenizer.ggml.{_SPECIAL_ID_KEYS[key]}_token_id")
    tokens = info.fields["tokenizer.ggml.tokens"]
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def eog_token_ids(info: GgufInfo) -> list[int]:
    """EOS first, then other end-of-turn control tokens present in the vocabulary."""
    eos = info.fields.get("tokenizer.ggml.eos_token_id")
    ids = [int(eos)] if eos is not None else []
    tokens: list[str] = info.fields["tokenizer.ggml.tokens"]
    types: list[int] = info.fields.get("tokenizer.ggml.token_type", [])
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == _TOKEN_CONTROL and tok in _EOG_TEXTS and i not in ids:
            ids.append(i)
    return ids


def context_length(info: GgufInfo) -> int:
    return int(info.arch_field("context_length", 2048))


def tokenizer_config(info: GgufInfo) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(info.fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(info.fields.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": context_length(info),
        "clean_up_tokenization_spaces": False,
    }
    for key in ("bos", "eos", "unk", "pad"):
        cfg[f"{key}_token"] = _token_text(info, key)
    template = info.fields.get("tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = str(template)
    return cfg


def model_config(info: GgufInfo) -> dict[str, Any]:
    """`config.json` in HF's Llama/Qwen2 layout, from the GGUF hyper-parameters."""
    if info.arch not in _HF_ARCH:
        raise ValueError(f"GGUF architecture {info.arch!r} is not supported (supported: {sorted(_HF_ARCH)})")
    hf_class, model_type = _HF_ARCH[info.arch]
    hidden = int(info.arch_field("embedding_length"))
    heads = int(info.arch_field("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(info.arch_field("feed_forward_length")),
        "num_hidden_layers": int(info.arch_field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(info.arch_field("attention.head_count_kv", heads)),
        "head_dim": int(info.arch_field("attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(info.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(info.arch_field("rope.freq_base", 10000.0)),
        "max_position_embeddings": context_length(info),
        "vocab_size": int(info.arch_field("vocab_size", len(info.fields["tokenizer.ggml.tokens"]))),
        "bos_token_id": info.fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": info.fields.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in info.tensor_names,
        "attention_bias": info.arch == "qwen2",
        "rope_scaling": _rope_scaling(info),
        "torch_dtype": "float32",  # dequantized weights; the engine may cast further
    }
    return cfg


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; 7 significant digits undo that.
    return float(f"{float(value):.7g}")


def _rope_scaling(info: GgufInfo) -> dict[str, Any] | None:
    kind = info.arch_field("rope.scaling.type")
    factor = info.arch_field("rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = info.arch_field("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def generation_config(info: GgufInfo) -> dict[str, Any]:
    return {
        "bos_token_id": info.fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eog_token_ids(info),
        "pad_token_id": info.fields.get("tokenizer.ggml.padding_token_id"),
    }


# ---------------------------------------------------------------- folder on disk


def _source_record(gguf_path: Path) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {"gguf_path": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_complete(out_dir: Path, gguf_path: Path) -> bool:
    """True when `out_dir` was materialized from this exact GGUF file (path, size and mtime)."""
    record = out_dir / RECORD_NAME
    if not record.is_file() or not all((out_dir / name).is_file() for name in FOLDER_FILES):
        return False
    try:
        recorded: object = json.loads(record.read_text())
        return recorded == _source_record(gguf_path.resolve())
    except (OSError, ValueError):
        return False


def gguf_path_of_folder(folder: Path) -> Path | None:
    """The GGUF weights behind a materialized folder (via the link, else the record), if any."""
    link = folder / GGUF_LINK_NAME
    if link.is_file():
        return link.resolve()
    record = folder / RECORD_NAME
    if record.is_file():
        path = Path(json.loads(record.read_text())["gguf_path"])
        return path if path.is_file() else None
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_folder(tmp: Path, info: GgufInfo, gguf_path: Path) -> None:
    build_tokenizer(info).save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "tokenizer_config.json", tokenizer_config(info))
    _write_json(tmp / "config.json", model_config(info))
    _write_json(tmp / "generation_config.json", generation_config(info))
    try:
        (tmp / GGUF_LINK_NAME).symlink_to(gguf_path)
    except OSError:  # filesystems without symlinks: the record below still names the file
        log.warning("cannot symlink %s; relying on %s", gguf_path, RECORD_NAME)
    _write_json(tmp / RECORD_NAME, _source_record(gguf_path))


def _install(tmp: Path, out_dir: Path, gguf_path: Path) -> None:
    """Move the finished temp dir into place; whoever renames first wins a concurrent race."""
    if out_dir.exists() and not is_complete(out_dir, gguf_path):
        stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}")
        try:
            out_dir.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it away first
    try:
        tmp.rename(out_dir)
    except OSError:
        if not is_complete(out_dir, gguf_path):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an identical folder


def materialize_gguf_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Write (once) an HF-style folder for `gguf_path` at `out_dir` and return `out_dir`.

    Idempotent: a folder already made from the same file is reused. Concurrent callers never see
    a half-written folder because it is built in a sibling temp dir and renamed into place.
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    if is_complete(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("materializing %s into %s", gguf_path, out_dir)
    info = read_gguf_info(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared
    try:
        _write_folder(tmp, info, gguf_path)
        _install(tmp, out_dir, gguf_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
