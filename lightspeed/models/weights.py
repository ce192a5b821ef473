"""Load Llama-family weights (GGUF or HF safetensors folder) into one HF-named state dict.

Everything downstream (the paged model, the HF export, tests) speaks HF tensor names and HF
rotary layout, so the GGUF path renames llama.cpp tensors and undoes the Q/K row permutation
llama.cpp's converter applies for its interleaved RoPE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import quants

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """HF `rope_scaling` for the types the model implements ("linear", "llama3")."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r}")
        if self.factor <= 0:
            raise ValueError("rope scaling factor must be positive")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}")
        sizes = (
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.max_position_embeddings,
        )
        if min(sizes) <= 0:
            raise ValueError(f"model sizes must be positive: {sizes}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------- GGUF


_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str | None:
    """HF name of a llama.cpp tensor, or None for tensors the model does not use."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.match(name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}"


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    The converter reorders each head's rows from HF's half-split rotary layout [x0..x(d/2-1),
    y0..] into interleaved pairs [x0, y0, x1, y1, ...] (it reshapes to (heads, 2, d/2) and swaps
    the last two axes); the inverse reshapes to (heads, d/2, 2) and swaps back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def _gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32; recover the short decimal the model was configured with
    (1e-05, not 9.999999747378752e-06) so the exported config.json matches the original."""
    return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF rope_freqs (llama3 rope scaling) is not supported")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = int(_gguf_field(reader, f"{arch}.embedding_length"))
    heads = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(embd.shape[1]),  # GGUF shapes are innermost-first
        hidden_size=hidden,
        intermediate_size=int(_gguf_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_gguf_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=_f32(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_gguf_field(reader, f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    array = quants.dequantize(tensor.data, tensor.tensor_type)
    if not array.flags.writeable:  # F32 tensors come back as views of the read-only mmap
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_gguf(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Dequantize a GGUF file to fp32 tensors under HF names (Q/K rows back in HF layout)."""
    reader = gguf.GGUFReader(str(path))
    config = config_from_gguf(reader)
    state: StateDict = {}
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", tensor.name)
            continue
        value = _dequantize(tensor)
        # Only the llama converter permutes; qwen2 uses NEOX rope in llama.cpp and is stored as-is.
        if config.architecture == "llama" and ".q_proj." in name:
            value = unpermute_rope_rows(value, config.num_heads)
        elif config.architecture == "llama" and ".k_proj." in name:
            value = unpermute_rope_rows(value, config.num_kv_heads)
        state[name] = value
    _tie_embeddings(config, state)
    return config, state


# ---------------------------------------------------------------- HF folder


def _rope_settings(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope theta and scaling from either the legacy keys or transformers v5 `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Parse a Llama / Qwen2 / Mistral `config.json`."""
    arch = raw.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported model_type {arch!r}; expected one of {SUPPORTED_ARCHITECTURES}")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")
    if arch == "mistral" and raw.get("sliding_window"):
        logger.warning("sliding_window=%s ignored: attention is full-context", raw["sliding_window"])
    heads = int(raw["num_attention_heads"])
    theta, scaling = _rope_settings(raw)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        rope_theta=theta,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
        rope_scaling=scaling,
    )


def load_hf_folder(folder: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read config.json and every *.safetensors shard of an HF model folder."""
    from safetensors.torch import load_file  # optional dependency (extra "native")

    folder = Path(folder)
    config = _with_generation_eos(
        config_from_hf(json.loads((folder / "config.json").read_text())), folder / "generation_config.json"
    )
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no *.safetensors files in {folder}")
    state: StateDict = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    _tie_embeddings(config, state)
    return config, state


def _with_generation_eos(config: ModelConfig, path: Path) -> ModelConfig:
    """Chat models often list extra stop ids (e.g. end-of-turn) only in generation_config.json."""
    if not path.is_file():
        return config
    extra = _token_ids(json.loads(path.read_text()).get("eos_token_id"))
    merged = config.eos_token_ids + tuple(t for t in extra if t not in config.eos_token_ids)
    return dataclasses.replace(config, eos_token_ids=merged)


def _tie_embeddings(config: ModelConfig, state: StateDict) -> None:
    if "lm_head.weight" not in state:
        if not config.tie_word_embeddings:
            raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]


def find_gguf(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def load_weights(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Load from a .gguf file, an HF safetensors folder, or a folder holding exactly one .gguf."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    if not path.is_dir():
        raise ValueError(f"model path {path} is neither a .gguf file nor a folder")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return load_hf_folder(path)
    gguf_file = find_gguf(path)  # e.g. a tokenizer/config folder with a link to its GGUF
    if gguf_file is not None:
        config, state = load_gguf(gguf_file)
        return _with_generation_eos(config, path / "generation_config.json"), state
    raise ValueError(f"{path} has neither config.json + *.safetensors nor a single .gguf file")


# ---------------------------------------------------------------- export


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json content transformers / vLLM accept for these weights."""
    raw: dict[str, Any] = {
        "architectures": [_HF_CLASS[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids)
        if len(config.eos_token_ids) > 1
        else (config.eos_token_ids[0] if config.eos_token_ids else None),
    }
    if config.architecture != "qwen2":
        raw["attention_bias"] = config.attention_bias
        raw["mlp_bias"] = False
    return raw


def export_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write model.safetensors + config.json for a GGUF model so HF tools load identical weights."""
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported export dtype {dtype}")
    config, state = load_gguf(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses aliased tensors; HF re-ties on load
    tensors = {name: t.to(dtype).contiguous() for name, t in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2))
    logger.info("exported %s to %s (%s)", gguf_path, out, dtype)
    return out
