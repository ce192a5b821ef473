"""Matmul backends for the paged model: plain aten, or oneDNN on packed weights + fused epilogues.

On CPU in bf16, oneDNN (AMX / AVX512-BF16) on weights reordered once into its blocked layout runs
the few-row matmuls of decode steps about 2x faster than aten's mm, as fast for prefill, with
bit-identical products: the weight prepacking inductor's freezing pass does. Its post-ops also
fuse the elementwise work around a matmul into the GEMM epilogue (residual add, SiLU, the
gate * up product), which at prefill sizes halves the MLP's time, because every separate
elementwise pass over a [tokens, 1536] bf16 tensor costs as much as a small matmul here.
In fp32 the packed weights pay too (1.3-1.7x on decode-sized products, lm_head 2-3x, AVX2 and
AVX-512 alike), though the product is no longer bit-identical to aten's (another summation
order). Everywhere else (fp16, GPUs) the aten backend keeps the original unfused ops.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class AtenOps:
    """F.linear plus separate elementwise ops; weights are used as they are."""

    fused = False  # callers keep gate/up as one matmul and norms with their weights

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def linear_add(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x @ w.T + other"""
        return F.linear(x, w) + other

    def linear_silu(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.silu(F.linear(x, w))

    def linear_mul(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ w.T) * other"""
        return F.linear(x, w) * other


class OneDnnOps(AtenOps):
    """oneDNN matmuls on packed weights, elementwise neighbours fused as post-ops."""

    fused = True  # callers split gate/up (each gets its own epilogue) and fold norm weights

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
        return out

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        return out

    def linear_add(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, other, w, None, "add")
        return out

    def linear_silu(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, w, None, "swish", [], "")
        return out

    def linear_mul(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, other, w, None, "mul")
        return out


def _onednn_works(dtype: torch.dtype) -> bool:
    """The ops exist in this torch build and agree with aten on a tiny product."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return False
    ops, ref = OneDnnOps(), AtenOps()
    x = torch.arange(12, dtype=dtype).view(3, 4) / 8
    w = torch.arange(8, dtype=dtype).view(2, 4) / 8
    other = torch.ones(3, 2, dtype=dtype)
    try:
        packed = ops.pack(w)
        return torch.equal(ops.linear(x, packed), ref.linear(x, w)) and torch.equal(
            ops.linear_add(x, packed, other), ref.linear_add(x, w, other)
        )
    except RuntimeError:  # a torch build without these ops: plain matmuls still work
        return False


# fp32 too: packed weights run the few-row decode products 1.3-1.7x faster than aten's sgemm
# (lm_head 2-3x) on AVX2 and AVX-512 alike (bench/README.md, "fp32 linears").
_ONEDNN_DTYPES = (torch.bfloat16, torch.float32)


def select_linear_ops(device: torch.device, dtype: torch.dtype) -> AtenOps:
    if device.type == "cpu" and dtype in _ONEDNN_DTYPES and _onednn_works(dtype):
        return OneDnnOps()
    return AtenOps()
