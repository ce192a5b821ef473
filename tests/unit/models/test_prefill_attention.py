"""The fresh-prompt causal attention kernel (csrc/prefill_attention.c) against an fp64 SDPA
reference per ISA build, its scalar reference path, the shapes it takes, and its input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightspeed.models import paged_attention
from lightspeed.models.paged_attention import runnable_isas
from lightspeed.models.prefill_attention import PrefillAttention
from tests.unit.models.kernel_lib import build_isa_lib

ISAS = runnable_isas()
# Block edges of 16 query tokens and 64 keys, a single token, and prompts of mixed lengths.
LENGTHS = [[1], [15, 16, 17], [63, 64, 65], [130, 3, 300]]
FP32 = {"atol": 2e-6, "rtol": 2e-6}


@pytest.fixture(scope="module", params=ISAS)
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PrefillAttention:
    return PrefillAttention(build_isa_lib(request.param, tmp_path_factory))


def _projection(tokens: int, heads: int, kv_heads: int, dim: int, pad: int = 8, seed: int = 0) -> torch.Tensor:
    """A [T, (heads + 2 kv) * dim + pad] projection output (rows padded: a real stride)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, (heads + 2 * kv_heads) * dim + pad, generator=gen)


def _views(qkv: torch.Tensor, heads: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    t, q_end, k_end = qkv.shape[0], heads * dim, (heads + kv_heads) * dim
    return (
        qkv[:, :q_end].view(t, heads, dim),
        qkv[:, q_end:k_end].view(t, kv_heads, dim),
        qkv[:, k_end : k_end + kv_heads * dim].view(t, kv_heads, dim),
    )


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    outs, start = [], 0
    for n in lengths:
        qb, kb, vb = (x[start : start + n].transpose(0, 1).double() for x in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_fp64_causal_attention(kernel: PrefillAttention, lengths: list[int]) -> None:
    q, k, v = _views(_projection(sum(lengths), 9, 3, 64), 9, 3, 64)  # SmolLM2's shape
    expected = _reference(q, k, v, lengths, 0.125)
    torch.testing.assert_close(kernel(q, k, v, lengths, 0.125).double(), expected, **FP32)
    torch.testing.assert_close(kernel(q, k, v, lengths, 0.125, reference=True).double(), expected, **FP32)


@pytest.mark.parametrize("lengths", [[7, 65], [256, 256]])
def test_bf16_in_place_matches_fp64_within_one_rounding(kernel: PrefillAttention, lengths: list[int]) -> None:
    """bf16 q/k/v are widened exactly, math is fp32, the output rounded once to bf16."""
    qkv = _projection(sum(lengths), 9, 3, 64, seed=3).bfloat16()
    q, k, v = _views(qkv, 9, 3, 64)
    got = kernel(q, k, v, lengths, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(q, k, v, lengths, 0.125), atol=1e-3, rtol=2**-8)
    # the scalar path sums in another order: at most one bf16 rounding step apart
    reference = kernel(q, k, v, lengths, 0.125, reference=True)
    torch.testing.assert_close(got.float(), reference.float(), atol=1e-3, rtol=2**-7)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 16), (8, 1, 128), (6, 2, 256), (16, 2, 48)])
def test_other_shapes(kernel: PrefillAttention, heads: int, kv_heads: int, dim: int) -> None:
    lengths = [5, 70]
    q, k, v = _views(_projection(sum(lengths), heads, kv_heads, dim, seed=1), heads, kv_heads, dim)
    got = kernel(q, k, v, lengths, dim**-0.5)
    torch.testing.assert_close(got.double(), _reference(q, k, v, lengths, dim**-0.5), **FP32)


def test_large_scores_stay_finite(kernel: PrefillAttention) -> None:
    """Online softmax: scores in the hundreds (later keys raising the max) neither overflow nor
    lose the earlier keys' mass. fp32 scores of ~1000 carry ~6e-5 absolute rounding, which exp
    turns into that much relative error per weight: outputs (values ~6) within ~1e-3."""
    qkv = _projection(100, 9, 3, 64, seed=2) * 6
    q, k, v = _views(qkv, 9, 3, 64)
    got = kernel(q, k, v, [100], 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _reference(q, k, v, [100], 1.0), atol=5e-3, rtol=1e-3)


def test_supports() -> None:
    assert PrefillAttention.supports(9, 3, 64, torch.float32)
    assert PrefillAttention.supports(9, 3, 64, torch.bfloat16)
    assert not PrefillAttention.supports(9, 3, 64, torch.float16)
    assert not PrefillAttention.supports(9, 3, 72, torch.float32)  # not a multiple of 16
    assert not PrefillAttention.supports(32, 2, 64, torch.float32)  # 16 query heads per KV head
    assert not PrefillAttention.supports(9, 4, 64, torch.float32)


def test_input_checks(kernel: PrefillAttention) -> None:
    q, k, v = _views(_projection(10, 9, 3, 64), 9, 3, 64)
    with pytest.raises(ValueError, match="do not tile"):
        kernel(q, k, v, [4, 5], 0.125)
    with pytest.raises(ValueError, match="do not tile"):
        kernel(q, k, v, [10, 0], 0.125)
    with pytest.raises(ValueError, match="views of one"):
        kernel(q, k, v.clone(), [10], 0.125)
    with pytest.raises(ValueError, match="views of one"):
        kernel(q.contiguous(), k, v, [10], 0.125)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernel(q.double(), k.double(), v.double(), [10], 0.125)
    with pytest.raises(ValueError, match="unsupported shape"):
        q72, k72, v72 = _views(_projection(10, 9, 3, 72), 9, 3, 72)
        kernel(q72, k72, v72, [10], 0.125)
    assert kernel(q[:0], k[:0], v[:0], [], 0.125).shape == (0, 576)


def test_fp32_model_uses_the_kernel_for_fresh_prompts() -> None:
    from lightspeed.models.llama import PagedLlama
    from lightspeed.models.weights import load_gguf
    from tests.unit.models.test_fused_ops import SMOLLM2

    if paged_attention.load_kernel() is None:
        pytest.skip("kernel library unavailable")
    cfg, state = load_gguf(SMOLLM2)
    assert PagedLlama(cfg, state, torch.float32, torch.device("cpu")).prefill_kernel is not None
    assert PagedLlama(cfg, state, torch.bfloat16, torch.device("cpu")).prefill_kernel is not None
    assert PagedLlama(cfg, state, torch.float64, torch.device("cpu")).prefill_kernel is None
