"""Causal attention of fresh prompts over their own q/k/v (csrc/prefill_attention.c), fp32 or bf16.

torch's SDPA ran this at ~30 GFLOP/s on two cores (~290 ms of a 2,048-token fp32 prefill step,
~330 ms, a quarter, of a bf16 one);
the C kernel reads q, k and v in place from the fused projection output, serves all query heads
of a KV head per key row it loads, skips the key blocks the causal mask removes, and keeps a
flash-style online softmax, so no [T, T] scores exist (bench/README.md, "prefill attention").
"""

from __future__ import annotations

import ctypes

import torch


class _PrefillArgs(ctypes.Structure):
    """Mirror of `ls_prefill_args` in csrc/prefill_attention.c."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("qkv", "out", "starts")],
        *[(name, ctypes.c_int64) for name in ("num_prompts", "row_stride", "num_heads", "num_kv_heads", "head_dim")],
        ("scale", ctypes.c_float),
        ("is_bf16", ctypes.c_int),
    ]


class PrefillAttention:
    """ctypes front of csrc/prefill_attention.c; layouts are checked here, the C code trusts them."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns = {False: lib.ls_prefill_attention, True: lib.ls_prefill_attention_reference}
        for fn in self._fns.values():
            fn.argtypes = [ctypes.POINTER(_PrefillArgs)]
            fn.restype = ctypes.c_int

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        group_ok = num_kv_heads >= 1 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8
        return dtype in (torch.float32, torch.bfloat16) and group_ok and 16 <= head_dim <= 256 and head_dim % 16 == 0

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: list[int],
        scale: float,
        reference: bool = False,
    ) -> torch.Tensor:
        """q [T, heads, dim], k and v [T, kv_heads, dim]: views of one projection output whose
        rows hold q, k, v heads back to back; `lengths`: the prompts' token counts in order
        (summing to T). Returns [T, heads * dim]. `reference`: the scalar path."""
        tokens, heads, dim = q.shape
        out = torch.empty(tokens, heads * dim, dtype=q.dtype)
        if not tokens and not lengths:  # an empty view may have any strides: nothing to check
            return out
        _check(q, k, v, lengths)
        starts = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
        args = _PrefillArgs(
            q.data_ptr(),
            out.data_ptr(),
            starts.data_ptr(),
            len(lengths),
            _row_stride(q) or (heads + 2 * k.shape[1]) * dim,  # one token: its row is all there is
            heads,
            k.shape[1],
            dim,
            scale,
            int(q.dtype == torch.bfloat16),
        )
        if self._fns[reference](ctypes.byref(args)) != 0:
            raise ValueError("ls_prefill_attention refused its arguments")
        return out


def _row_stride(t: torch.Tensor) -> int:
    """Elements between token rows (a single token's view may report any stride there)."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> None:
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if q.dtype not in (torch.float32, torch.bfloat16) or not all(
        t.dtype == q.dtype and t.dim() == 3 for t in (q, k, v)
    ):
        raise ValueError("q, k, v must be float32 or bfloat16 [T, heads, dim], one dtype")
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != dim:
        raise ValueError("k and v must be [T, kv_heads, dim] like q's tokens and dim")
    if not PrefillAttention.supports(heads, kv_heads, dim, q.dtype):
        raise ValueError(f"unsupported shape: {heads} heads, {kv_heads} KV heads, head_dim {dim}")
    row, esize = _row_stride(q), q.element_size()
    for t, first in ((q, 0), (k, heads * dim), (v, (heads + kv_heads) * dim)):  # one row layout
        if (_row_stride(t), *t.stride()[1:]) != (row, dim, 1) or t.data_ptr() != q.data_ptr() + first * esize:
            raise ValueError("q, k, v must be views of one [T, (heads + 2 * kv_heads) * dim] projection")
    if (row and row < (heads + 2 * kv_heads) * dim) or sum(lengths) != tokens or min(lengths, default=1) < 1:
        raise ValueError(f"prompt lengths {lengths} do not tile {tokens} tokens")
