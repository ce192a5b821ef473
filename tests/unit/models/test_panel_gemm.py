"""The panel GEMM (csrc/gemm.c) against fp64 products, its scalar reference path bit for bit,
its batch invariance, its packing layouts, its input checks, and the fp32 model on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightspeed.models import paged_attention
from lightspeed.models.linear_ops import OneDnnOps, _onednn_works
from lightspeed.models.paged_attention import runnable_isas
from lightspeed.models.panel_gemm import (
    EPI_ADD,
    EPI_GLU,
    EPI_MUL,
    EPI_NONE,
    EPI_SILU,
    PanelGemm,
    PanelOps,
    pack_glu_panels,
    pack_panels,
)
from tests.unit.models.kernel_lib import build_isa_lib

ISAS = runnable_isas()  # avx512 / avx2 / scalar, as far as this CPU runs them
ROWS = [0, 1, 5, 6, 7, 13, 64, 65, 257, 300]  # tile (6) and row-block (256) edges
# fp32 products of K terms in another order than fp64's: a few ulps of the row's magnitude.
FP32 = {"atol": 2e-5, "rtol": 2e-5}


def _build_isa(isa: str, tmp_path_factory: pytest.TempPathFactory) -> PanelGemm:
    return PanelGemm(build_isa_lib(isa, tmp_path_factory))


@pytest.fixture(scope="module", params=ISAS)
def gemm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PanelGemm:
    return _build_isa(request.param, tmp_path_factory)


def _operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    other = torch.randn(m, n, generator=gen)
    return x, w, other


def _expected(x: torch.Tensor, w: torch.Tensor, epilogue: int, other: torch.Tensor) -> torch.Tensor:
    y = x.double() @ w.double().T
    if epilogue == EPI_ADD:
        return y + other.double()
    if epilogue == EPI_MUL:
        return y * other.double()
    if epilogue == EPI_SILU:
        return F.silu(y)
    return y


def test_pack_panels_layout() -> None:
    w = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)  # w[n, k] = 3n + k
    p = pack_panels(w)
    assert p.shape == (2, 3, 16) and p.is_contiguous()
    assert p[1, 2, 5].item() == w[16 + 5, 2].item() == 65.0
    assert p[0, :, 0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="multiple of the panel width"):
        pack_panels(torch.zeros(24, 3))


def test_pack_glu_panels_interleaves_gate_and_up() -> None:
    gate = torch.arange(16 * 2, dtype=torch.float32).view(16, 2)
    up = -gate
    p = pack_glu_panels(gate, up)  # 2 panels: gate 0-7 | up 0-7, gate 8-15 | up 8-15
    assert p.shape == (2, 2, 16)
    assert p[0, 1, :8].tolist() == gate[:8, 1].tolist() and p[0, 1, 8:].tolist() == up[:8, 1].tolist()
    assert p[1, 0, :8].tolist() == gate[8:, 0].tolist() and p[1, 0, 8:].tolist() == up[8:, 0].tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_glu_panels(torch.zeros(12, 2), torch.zeros(12, 2))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("epilogue", [EPI_NONE, EPI_ADD, EPI_SILU, EPI_MUL])
def test_products_match_fp64(gemm: PanelGemm, m: int, epilogue: int) -> None:
    x, w, other = _operands(m, 48, 37)
    arg = other if epilogue in (EPI_ADD, EPI_MUL) else None
    y = gemm(x, pack_panels(w), epilogue, arg)
    assert y.shape == (m, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _expected(x, w, epilogue, other), **FP32)


@pytest.mark.parametrize("m", [1, 7, 70])
def test_glu_is_silu_gate_times_up(gemm: PanelGemm, m: int) -> None:
    x, gate, _ = _operands(m, 32, 40, seed=1)
    _, up, _ = _operands(m, 32, 40, seed=2)
    y = gemm(x, pack_glu_panels(gate, up), EPI_GLU)
    expected = F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    assert y.shape == (m, 32)
    torch.testing.assert_close(y.double(), expected, **FP32)


@pytest.mark.parametrize("m", [9, 70])  # per tile; a panel widened once for its row block
def test_bf16_weights_are_widened_exactly(gemm: PanelGemm, m: int) -> None:
    x, w, _ = _operands(m, 64, 50, seed=3)
    wb = w.bfloat16()
    y = gemm(x, pack_panels(wb))
    torch.testing.assert_close(y.double(), x.double() @ wb.double().T, **FP32)
    # the scalar path widens the same way and sums in the same order: bit for bit
    assert torch.equal(y, gemm(x, pack_panels(wb), reference=True))


def test_bias_row_is_broadcast(gemm: PanelGemm) -> None:
    x, w, _ = _operands(4, 16, 8, seed=4)
    bias = torch.linspace(-1, 1, 16)
    y = gemm(x, pack_panels(w), EPI_ADD, bias)
    torch.testing.assert_close(y.double(), x.double() @ w.double().T + bias.double(), **FP32)


@pytest.mark.parametrize("epilogue", [EPI_NONE, EPI_ADD, EPI_MUL])
def test_simd_matches_scalar_reference_bitwise(gemm: PanelGemm, epilogue: int) -> None:
    """Each output is one fma chain over k in order, in every path: identical bits."""
    x, w, other = _operands(70, 96, 77, seed=5)
    arg = other if epilogue in (EPI_ADD, EPI_MUL) else None
    assert torch.equal(gemm(x, pack_panels(w), epilogue, arg), gemm(x, pack_panels(w), epilogue, arg, True))


def test_rows_do_not_depend_on_their_batch(gemm: PanelGemm) -> None:
    """A row's result is the same bits alone, in a tile, in any row block, at any position."""
    x, w, _ = _operands(300, 64, 96, seed=6)
    panels = pack_panels(w)
    full = gemm(x, panels)
    for rows in ([0], [5], [64], [299], list(range(3, 11)), list(range(250, 262))):
        assert torch.equal(gemm(x[rows], panels), full[rows])


def test_isas_agree(tmp_path_factory: pytest.TempPathFactory) -> None:
    x, w, other = _operands(20, 32, 33, seed=7)
    outs = {isa: _build_isa(isa, tmp_path_factory)(x, pack_panels(w), EPI_ADD, other) for isa in ISAS}
    for isa, out in outs.items():
        assert torch.equal(out, outs[ISAS[-1]]), isa


def test_input_checks(gemm: PanelGemm) -> None:
    x, w, other = _operands(3, 16, 8)
    panels = pack_panels(w)
    cases: list[tuple[dict[str, object], str]] = [
        ({"x": x.double()}, "x must be float32"),
        ({"x": x.t().contiguous().t()}, "unit inner stride"),
        ({"panels": panels.transpose(1, 2)}, "contiguous"),
        ({"x": torch.zeros(3, 9)}, "x has 9 columns"),
        ({"epilogue": 9}, "unknown epilogue"),
        ({"epilogue": EPI_ADD}, "other is given"),
        ({"other": other}, "other is given"),
        ({"epilogue": EPI_MUL, "other": torch.zeros(2, 16)}, "other must be"),
    ]
    for change, message in cases:
        kwargs: dict[str, object] = {"x": x, "panels": panels, "epilogue": EPI_NONE, "other": None} | change
        with pytest.raises(ValueError, match=message):
            gemm(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not _onednn_works(torch.float32), reason="oneDNN fp32 linears unavailable")
def test_panel_ops_keep_onednn_for_other_widths(gemm: PanelGemm) -> None:
    ops = PanelOps(gemm)
    x, w, other = _operands(5, 40, 24, seed=8)  # 40 features: no whole panels
    packed = ops.pack(w)
    assert packed.dim() == 2
    torch.testing.assert_close(ops.linear_add(x, packed, other), OneDnnOps().linear_add(x, OneDnnOps().pack(w), other))
    w48 = torch.randn(48, 24)
    assert ops.pack(w48).dim() == 3 and ops.pack(w48.bfloat16()).dim() == 2
    torch.testing.assert_close(ops.linear_silu(x, ops.pack(w48)).double(), F.silu(x.double() @ w48.double().T), **FP32)


def test_fp32_model_runs_on_panels_with_the_onednn_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model in fp32 picks the panel backend (gate/up as one GLU weight) and greedy-
    decodes exactly the tokens of the oneDNN backend it replaced (LIGHTSPEED_PANEL_GEMM=0)."""
    from lightspeed.models.llama import PANEL_GEMM_ENV, PagedLlama
    from lightspeed.models.weights import load_gguf
    from tests.unit.models.test_fused_ops import FRANCE, SMOLLM2, STORY, _greedy

    if paged_attention.load_kernel() is None:
        pytest.skip("kernel library unavailable")
    cfg, state = load_gguf(SMOLLM2)
    panel = PagedLlama(cfg, state, torch.float32, torch.device("cpu"))
    assert isinstance(panel.ops, PanelOps) and panel.layers[0].glu is not None and panel.lm_head.dim() == 3
    monkeypatch.setenv(PANEL_GEMM_ENV, "0")
    onednn = PagedLlama(cfg, state, torch.float32, torch.device("cpu"))
    assert type(onednn.ops) is OneDnnOps
    tokens, logits = _greedy(panel, [STORY, FRANCE], 12)
    expected, expected_logits = _greedy(onednn, [STORY, FRANCE], 12)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, atol=5e-4, rtol=0)


def test_bf16_weight_storage_for_an_fp32_model() -> None:
    """weight_dtype=bf16: panels stored in bf16 (half the bytes), activations and KV cache fp32:
    the fp32 model on bf16-rounded (norm-folded) weights. It greedy-decodes the same tokens as
    fp32 weights, its logits within bf16 weight rounding (2^-9 relative per weight, ~0.1 on
    logits of ~20 after 30 layers; a wrong panel or widening would be off by whole units)."""
    from lightspeed.models.llama import PagedLlama
    from lightspeed.models.weights import load_gguf
    from tests.unit.models.test_fused_ops import FRANCE, SMOLLM2, STORY, _greedy

    if paged_attention.load_kernel() is None:
        pytest.skip("kernel library unavailable")
    cfg, state = load_gguf(SMOLLM2)
    model = PagedLlama(cfg, state, torch.float32, torch.device("cpu"), weight_dtype=torch.bfloat16)
    assert model.weight_dtype == torch.bfloat16 and model.lm_head.dtype == torch.bfloat16
    assert model.layers[0].glu is not None and model.layers[0].glu.dtype == torch.bfloat16
    assert model.allocate_kv_cache(2, 16)[0].dtype == torch.float32
    reference = PagedLlama(cfg, state, torch.float32, torch.device("cpu"))
    tokens, logits = _greedy(model, [STORY, FRANCE], 8)
    expected, expected_logits = _greedy(reference, [STORY, FRANCE], 8)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, atol=0.3, rtol=0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PanelOps(model.ops.gemm, torch.float16)  # type: ignore[attr-defined]
