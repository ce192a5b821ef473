"""The paged decode-attention kernel against the torch path (gather + SDPA) and an fp64 reference,
its build cache, and the fallback to the torch path when it cannot be built."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from lightspeed.models import paged_attention
from lightspeed.models.attention_metadata import (
    AttentionGroup,
    CacheLayout,
    build_attention_metadata,
)
from lightspeed.models.llama import PagedLlama
from lightspeed.models.paged_attention import (
    BuildSpec,
    PagedDecodeAttention,
    build_kernel,
    runnable_isas,
)
from lightspeed.models.weights import ModelConfig, StateDict

CPU = torch.device("cpu")
HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M's attention shape
CONTEXTS = [1, 17, 64, 65, 130, 5, 200]  # one token; block edges for 16 and 64; long
# Enough sequences that the kernel hands out whole sequences (all KV heads) per work item.
MANY = [40 + 7 * i for i in range(24)]


ISAS = runnable_isas()  # avx512 / avx2 / scalar, as far as this CPU runs them


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory for the whole session (test_fused_ops.py uses it too): each ISA's library
    # is compiled once, later builds are cache hits.
    path = tmp_path_factory.getbasetemp() / "kernels"
    path.mkdir(exist_ok=True)
    return path


def _build_isa(isa: str, kernel_dir: Path) -> PagedDecodeAttention:
    if shutil.which("gcc") is None:  # CI without a compiler: only the fallback tests run
        pytest.skip("no C compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paged_attention.CACHE_ENV, str(kernel_dir))
        return build_kernel(BuildSpec(isa=isa))


@pytest.fixture(scope="module", params=ISAS)
def kernel(request: pytest.FixtureRequest, kernel_dir: Path) -> PagedDecodeAttention:
    """Every code path this CPU can run: AVX-512, AVX2 (emulated with -mno-avx512f on an
    AVX-512 CPU) and the portable scalar one."""
    return _build_isa(request.param, kernel_dir)


@pytest.fixture(scope="module")
def all_kernels(kernel_dir: Path) -> dict[str, PagedDecodeAttention]:
    return {isa: _build_isa(isa, kernel_dir) for isa in ISAS}


def _model(dtype: torch.dtype, heads: int = HEADS, kv_heads: int = KV_HEADS, dim: int = DIM) -> PagedLlama:
    """One attention layer's worth of model: only the config and scale matter here."""
    hidden = heads * dim
    cfg = ModelConfig(
        "llama",
        vocab_size=8,
        hidden_size=hidden,
        intermediate_size=8,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
    )
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (8, hidden),
        "model.norm.weight": (hidden,),
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (hidden, hidden),
        p + "self_attn.k_proj.weight": (kv_heads * dim, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * dim, hidden),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (8, hidden),
        p + "mlp.up_proj.weight": (8, hidden),
        p + "mlp.down_proj.weight": (hidden, 8),
    }
    state: StateDict = {name: torch.zeros(shape) for name, shape in shapes.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return PagedLlama(cfg, state, dtype, CPU)


class Case:
    """Random cache + queries; each sequence's blocks scattered over the cache, out of order."""

    def __init__(
        self,
        dtype: torch.dtype,
        block_size: int,
        contexts: list[int] = CONTEXTS,
        heads: int = HEADS,
        kv_heads: int = KV_HEADS,
        dim: int = DIM,
    ) -> None:
        gen = torch.Generator().manual_seed(block_size)
        need = [-(-c // block_size) for c in contexts]
        self.num_blocks = sum(need) + 7
        self.cache = torch.randn(2, self.num_blocks, block_size, kv_heads, dim, generator=gen, dtype=torch.float32).to(
            dtype
        )
        order = torch.randperm(self.num_blocks, generator=gen).tolist()
        self.tables = [order[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(contexts))]
        # Query rows strided like the fused q|k projection the model slices them from.
        self.query = torch.randn(len(contexts), heads + kv_heads, dim, generator=gen, dtype=torch.float32).to(dtype)[
            :, :heads
        ]
        self.contexts, self.block_size = contexts, block_size
        self.dtype, self.heads, self.kv_heads, self.dim = dtype, heads, kv_heads, dim

    def metadata(self, paged: bool) -> AttentionGroup:
        layout = CacheLayout(self.num_blocks, self.block_size, self.dtype, paged_decode=paged)
        meta = build_attention_metadata(
            [1] * len(self.contexts), [c - 1 for c in self.contexts], self.tables, layout, CPU
        )
        (group,) = meta.groups
        return group

    def run_kernel(self, kernel: PagedDecodeAttention) -> torch.Tensor:
        group = self.metadata(paged=True)
        return kernel(self.query, self.cache, group.block_tables, group.context_lens, 1 / math.sqrt(self.dim))

    def torch_path(self) -> torch.Tensor:
        model = _model(self.dtype, self.heads, self.kv_heads, self.dim)
        model.paged_kernel = None
        return model._group_attention(self.query, self.cache, self.metadata(paged=False))

    def reference(self) -> torch.Tensor:
        """fp64 softmax attention over each sequence's first `context` cached tokens."""
        rows = []
        group = self.heads // self.kv_heads
        for i, (ctx, table) in enumerate(zip(self.contexts, self.tables)):
            kv = self.cache[:, table].double().reshape(2, -1, self.kv_heads, self.dim)[:, :ctx]
            k = kv[0].repeat_interleave(group, dim=1)
            v = kv[1].repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", self.query[i].double(), k) / math.sqrt(self.dim)
            rows.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v).reshape(-1))
        return torch.stack(rows)


# fp32: the kernel accumulates in fp32 over <= 200 tokens; errors ~1e-6 on outputs of size ~1.
# bf16: inputs are exact in the fp64 reference, accumulation is fp32, and the output is rounded
# once to bf16 (8 significant bits): within one bf16 rounding, i.e. a relative 2^-8 (+ a tiny
# atol for outputs near zero). The torch path rounds the same way, so kernel vs torch path is
# within two roundings.
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-3, "rtol": 2**-8}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_kernel_matches_reference_and_torch_path(
    kernel: PagedDecodeAttention, dtype: torch.dtype, block_size: int
) -> None:
    case = Case(dtype, block_size)
    got = case.run_kernel(kernel)
    assert got.shape == (len(CONTEXTS), HEADS * DIM) and got.dtype == dtype
    torch.testing.assert_close(got.double(), case.reference(), **TOLERANCE[dtype])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, case.torch_path(), atol=2 * tol["atol"], rtol=2 * tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_many_sequences(kernel: PagedDecodeAttention, dtype: torch.dtype) -> None:
    case = Case(dtype, 16, MANY)
    torch.testing.assert_close(case.run_kernel(kernel).double(), case.reference(), **TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(4, 4, 32, 16), (8, 1, 128, 5), (4, 2, 8, 3), (6, 2, 48, 64), (8, 2, 64, 16), (4, 2, 128, 3), (10, 2, 40, 7)],
)
def test_kernel_other_shapes(
    kernel: PagedDecodeAttention, heads: int, kv_heads: int, dim: int, block_size: int
) -> None:
    """No GQA, one KV head, 2 and 4 query heads per KV head (AVX2 specialisations), 5 (the
    generic AVX2 version), head dims that are not multiples of 32, odd blocks."""
    case = Case(torch.float32, block_size, [3, 40, 1], heads, kv_heads, dim)
    torch.testing.assert_close(case.run_kernel(kernel).double(), case.reference(), **TOLERANCE[torch.float32])


# Head dims the AVX-512 specialisations do not cover (40, 72, 80: the AVX2 path in both SIMD
# builds; 20: scalar everywhere) and ones they do, against block sizes down to one token.
ODD_SHAPES = [(40, 1), (72, 3), (80, 16), (64, 64), (128, 3), (20, 16), (40, 64), (80, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("dim", "block_size"), ODD_SHAPES)
def test_kernel_head_dims_and_block_sizes(
    kernel: PagedDecodeAttention, dtype: torch.dtype, dim: int, block_size: int
) -> None:
    case = Case(dtype, block_size, [3, 40, 1, 17, 9], dim=dim)
    torch.testing.assert_close(case.run_kernel(kernel).double(), case.reference(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("dim", "block_size"), [(64, 16), (40, 3), (128, 1)])
def test_isas_agree(
    all_kernels: dict[str, PagedDecodeAttention], dtype: torch.dtype, dim: int, block_size: int
) -> None:
    """scalar, AVX2 and AVX-512 differ only in summation order: fp32 outputs within ~1e-6,
    bf16 outputs at most one bf16 rounding step apart."""
    case = Case(dtype, block_size, [1, 33, 130], dim=dim)
    outs = {isa: case.run_kernel(k) for isa, k in all_kernels.items()}
    assert {isa: k.isa for isa, k in all_kernels.items()} == {isa: isa for isa in ISAS}
    tol = {"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32 else TOLERANCE[dtype]
    for isa, out in outs.items():
        torch.testing.assert_close(out, outs["scalar"], **tol, msg=lambda m, isa=isa: f"{isa}: {m}")


# Context lengths around the AVX2 path's chunks (8 tokens fp32, 16 bf16) and groups of 8 scores:
# one token, a partial first group, one past a chunk, one short of a 320-token context.
CHUNK_EDGE_CONTEXTS = [1, 7, 33, 319, 8, 16, 17]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 7])
def test_smollm2_group_at_chunk_edges(kernel: PagedDecodeAttention, dtype: torch.dtype, block_size: int) -> None:
    """SmolLM2's shape (3 query heads per KV head, head_dim 64) over contexts that end inside a
    chunk or a group of 8, with blocks of 16 and of an odd size, against the fp64 reference.
    Enough sequences that items are whole sequences (all KV heads per item) as in decode."""
    contexts = CHUNK_EDGE_CONTEXTS * 2
    case = Case(dtype, block_size, contexts)
    got = case.run_kernel(kernel)
    assert got.shape == (len(contexts), HEADS * DIM) and got.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), case.reference(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_largest_group_and_head_dim(kernel: PagedDecodeAttention, dtype: torch.dtype) -> None:
    """16 query heads per KV head at head_dim 256 (the kernel's limits): the AVX2 path's state
    for several KV heads does not fit its buffer at once, so an item walks them one at a time."""
    case = Case(dtype, 16, [3, 40, 17, 1, 33, 9, 24, 50], heads=32, kv_heads=2, dim=256)
    torch.testing.assert_close(case.run_kernel(kernel).double(), case.reference(), **TOLERANCE[dtype])


def test_kernel_ignores_table_padding_and_other_blocks(kernel: PagedDecodeAttention) -> None:
    """Only the first `context` tokens are read: poisoning every other cache slot with NaN
    (including block 0, which pads short tables) leaves the output unchanged."""
    case = Case(torch.float32, 16, [3, 40, 1])
    expected = case.run_kernel(kernel)
    poisoned = torch.full_like(case.cache, float("nan"))
    for ctx, table in zip(case.contexts, case.tables):
        for t in range(ctx):
            block, off = table[t // 16], t % 16
            poisoned[:, block, off] = case.cache[:, block, off]
    case.cache = poisoned
    assert torch.equal(case.run_kernel(kernel), expected)


def test_kernel_rejects_bad_layouts(kernel: PagedDecodeAttention) -> None:
    case = Case(torch.float32, 16, [3])
    group = case.metadata(paged=True)
    with pytest.raises(ValueError, match="int32"):
        kernel(case.query, case.cache, group.block_tables.long(), group.context_lens, 0.1)
    with pytest.raises(ValueError, match="query"):
        kernel(case.query.bfloat16(), case.cache, group.block_tables, group.context_lens, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(case.query, case.cache.transpose(3, 4), group.block_tables, group.context_lens, 0.1)


def test_paged_metadata_is_tables_only() -> None:
    layout = CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32, paged_decode=True)
    meta = build_attention_metadata([1, 1, 3], [5, 0, 6], [[7, 2], [4], [9, 3, 1]], layout, CPU)
    decode, prefill = meta.groups
    assert decode.kv_index is None and decode.attn_mask is None
    assert decode.block_tables.dtype == torch.int32
    assert decode.block_tables.tolist() == [[7, 2], [4, 0]]
    assert decode.context_lens.tolist() == [6, 1]
    assert prefill.block_tables is None  # prefill keeps the gather + SDPA path
    assert prefill.kv_index.tolist() == [9, 3, 1, 19, 13, 11]


def test_build_is_cached_by_source_and_flags(kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paged_attention.CACHE_ENV, str(kernel_dir))
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    first = paged_attention._build(BuildSpec())
    assert paged_attention._build(BuildSpec()) == first
    assert first.parent == kernel_dir and first.suffix == ".so"
    assert not list(kernel_dir.glob("*.tmp"))  # built under a temp name, then renamed


def test_missing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spec = BuildSpec(compiler="lightspeed-no-such-cc")
    monkeypatch.setattr(paged_attention, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger=paged_attention.__name__):
        assert paged_attention.load_kernel(spec) is None
        assert paged_attention.load_kernel(spec) is None
    warnings = [r for r in caplog.records if "torch path" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not once per call


def test_unknown_or_unrunnable_isa_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped LIGHTSPEED_KERNEL_ISA, or AVX-512 forced on a CPU without it (the code would
    die of SIGILL): a warning, the torch path, never a crash or a silent downgrade."""
    monkeypatch.setattr(paged_attention, "_loaded", {})
    monkeypatch.setenv(paged_attention.ISA_ENV, "avx1024")
    with caplog.at_level(logging.WARNING, logger=paged_attention.__name__):
        assert paged_attention.load_kernel() is None
        assert paged_attention.kernel_isa() == "torch"
        monkeypatch.setattr(paged_attention, "_cpu_fingerprint", lambda: "x86_64:flags : fpu sse2 avx2 fma")
        assert paged_attention.load_kernel(BuildSpec(isa="avx512")) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "avx1024" in warnings[0] and "lacks avx512f" in warnings[1]


def test_kernel_isa_follows_the_environment(
    kernel_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(paged_attention, "_loaded", {})
    monkeypatch.setenv(paged_attention.CACHE_ENV, str(kernel_dir))
    for isa in ISAS:
        monkeypatch.setenv(paged_attention.ISA_ENV, isa)
        with caplog.at_level(logging.INFO, logger=paged_attention.__name__):
            assert paged_attention.kernel_isa() == isa
        assert f"{isa} SIMD path" in caplog.text  # the load log names the compiled path
    monkeypatch.delenv(paged_attention.ISA_ENV)
    assert paged_attention.kernel_isa() == ISAS[0]  # auto: the widest the CPU has


def test_disabled_kernel_uses_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paged_attention.DISABLE_ENV, "0")
    model = _model(torch.float32)
    assert model.paged_kernel is None
    layout = model.cache_layout(num_blocks=8, block_size=16)
    assert not layout.paged_decode
    (group,) = build_attention_metadata([1], [3], [[2]], layout, CPU).groups
    assert group.kv_index is not None and group.block_tables is None


def test_model_uses_kernel_only_where_supported(kernel: PagedDecodeAttention) -> None:
    if paged_attention.load_kernel() is None:
        pytest.skip("kernel unavailable on this machine")
    assert _model(torch.float32).cache_layout(4, 16).paged_decode
    assert _model(torch.bfloat16).cache_layout(4, 16).paged_decode
    assert not _model(torch.float64).cache_layout(4, 16).paged_decode
    assert not PagedDecodeAttention.supports(HEADS, KV_HEADS, DIM, torch.float32, torch.device("cuda"))
