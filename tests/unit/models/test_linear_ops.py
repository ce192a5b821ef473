"""oneDNN packed-weight linears agree with plain aten ones, and are chosen only where they pay."""

from __future__ import annotations

import pytest
import torch

from lightspeed.models.linear_ops import (
    AtenOps,
    OneDnnOps,
    _onednn_works,
    select_linear_ops,
)

CPU = torch.device("cpu")

needs_onednn = pytest.mark.skipif(
    not _onednn_works(torch.bfloat16), reason="oneDNN bf16 linears unavailable in this torch build"
)


@pytest.fixture
def operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).bfloat16()
    w = (torch.randn(48, 64, generator=gen) / 8).bfloat16()
    other = torch.randn(5, 48, generator=gen).bfloat16()
    return x, w, other


# Both backends accumulate in fp32. A plain linear rounds its product to bf16 once, exactly as
# aten does (bit-identical). A fused epilogue applies the add / SiLU / multiply to the fp32 product
# and rounds once, where aten rounds the product, applies the op and rounds again: the two differ
# by at most two bf16 roundings of the result, a relative 2^-7 (atol for results near zero).
BF16_TWO_ROUNDINGS = {"atol": 1e-2, "rtol": 2**-7}


@needs_onednn
def test_linear_matches_aten(operands: tuple[torch.Tensor, ...]) -> None:
    x, w, _ = operands
    packed = OneDnnOps().pack(w)
    assert torch.equal(OneDnnOps().linear(x, packed), AtenOps().linear(x, w))


@needs_onednn
@pytest.mark.parametrize("op", ["linear_add", "linear_mul"])
def test_binary_epilogues_match_aten(operands: tuple[torch.Tensor, ...], op: str) -> None:
    x, w, other = operands
    fused = getattr(OneDnnOps(), op)(x, OneDnnOps().pack(w), other)
    plain = getattr(AtenOps(), op)(x, w, other)
    assert fused.dtype == torch.bfloat16 and fused.shape == (5, 48)
    torch.testing.assert_close(fused, plain, **BF16_TWO_ROUNDINGS)


@needs_onednn
def test_silu_epilogue_matches_aten(operands: tuple[torch.Tensor, ...]) -> None:
    x, w, _ = operands
    fused = OneDnnOps().linear_silu(x, OneDnnOps().pack(w))
    torch.testing.assert_close(fused, AtenOps().linear_silu(x, w), **BF16_TWO_ROUNDINGS)


@needs_onednn
def test_linear_with_bias(operands: tuple[torch.Tensor, ...]) -> None:
    x, w, _ = operands
    bias = torch.linspace(-1, 1, 48).bfloat16()
    fused = OneDnnOps().linear(x, OneDnnOps().pack(w), bias)
    torch.testing.assert_close(fused, AtenOps().linear(x, w, bias), **BF16_TWO_ROUNDINGS)


@pytest.mark.skipif(not _onednn_works(torch.float32), reason="oneDNN fp32 linears unavailable")
@pytest.mark.parametrize("op", ["linear", "linear_add", "linear_mul", "linear_silu"])
def test_fp32_ops_match_aten(op: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(7, 96, generator=gen), torch.randn(40, 96, generator=gen) / 8
    other = torch.randn(7, 40, generator=gen)
    args = () if op in ("linear", "linear_silu") else (other,)
    fused = getattr(OneDnnOps(), op)(x, OneDnnOps().pack(w), *args)
    # Both accumulate 96 fp32 products, in different orders: a few ulps of the row's magnitude.
    torch.testing.assert_close(fused, getattr(AtenOps(), op)(x, w, *args), atol=1e-5, rtol=1e-5)


def test_select_linear_ops() -> None:
    assert type(select_linear_ops(CPU, torch.float64)) is AtenOps
    for dtype in (torch.float32, torch.bfloat16):
        expected = OneDnnOps if _onednn_works(dtype) else AtenOps
        assert type(select_linear_ops(CPU, dtype)) is expected
    assert type(select_linear_ops(torch.device("meta"), torch.bfloat16)) is AtenOps


def test_aten_ops_are_the_plain_formulas() -> None:
    x, w = torch.ones(2, 3), torch.full((4, 3), 0.5)
    other = torch.full((2, 4), 2.0)
    ops = AtenOps()
    assert ops.pack(w) is w and not ops.fused and OneDnnOps.fused
    assert ops.linear_add(x, w, other).tolist() == [[3.5] * 4] * 2
    assert ops.linear_mul(x, w, other).tolist() == [[3.0] * 4] * 2
    expected = torch.nn.functional.silu(torch.full((2, 4), 1.5))
    torch.testing.assert_close(ops.linear_silu(x, w), expected)
