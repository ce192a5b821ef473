"""Fused elementwise CPU ops around attention (csrc/fused_ops.c), loaded from the kernel library.

Per layer, torch ran rotary (mul, roll, addcmul over q and k), the KV-cache write (two
index_copy_) and the weightless RMSNorm of the folded-norm path (vector_norm, square, div, add,
rsqrt, cast, mul) as ~15 small ops: at a 32-sequence decode step each one is mostly dispatch
(~10 us), 30 layers make it ~5 ms of a ~50 ms step, and at a 2,048-token prefill each is a full
pass over a [tokens, 576..960] tensor. The kernels do each group in one pass.

They live in the same shared object as the paged attention kernel (paged_attention.py builds
every csrc/*.c into it), so they exist exactly when that kernel does; the model keeps its torch
path otherwise.
"""

from __future__ import annotations

import ctypes

import torch

from lightspeed.models.paged_attention import SUPPORTED_DTYPES


class _RopeArgs(ctypes.Structure):
    """Mirror of `ls_rope_args` in csrc/fused_ops.c."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("qkv", "k_cache", "v_cache", "positions", "slots", "cos", "sin")],
        *[(name, ctypes.c_int64) for name in ("tokens", "row_stride", "num_heads", "num_kv_heads", "head_dim")],
        ("is_bf16", ctypes.c_int),
    ]


class FusedOps:
    """ctypes front of csrc/fused_ops.c. Inputs are checked: the C code trusts raw pointers."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._rope = lib.ls_rope_write_kv
        self._rope.argtypes = [ctypes.POINTER(_RopeArgs)]
        self._rope.restype = ctypes.c_int
        self._norm = lib.ls_rms_norm
        self._norm.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_int,
        ]
        self._norm.restype = ctypes.c_int
        self._silu_mul = lib.ls_silu_mul
        self._silu_mul.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
        ]
        self._silu_mul.restype = ctypes.c_int

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        slots: torch.Tensor,
        num_heads: int,
    ) -> None:
        """Rotate the q and k heads of `qkv` [T, >= (heads + 2 * kv_heads) * dim] in place
        (HF rotate_half layout), then copy each token's k and v heads into cache slot
        `slots[t]`. cos/sin: float32 [max_position, dim / 2]; cache: [2, blocks, block_size,
        kv_heads, dim] contiguous in qkv's dtype; positions and slots int64 [T]. Their values
        are the caller's to check (once per step, `check_indices`), not every layer's."""
        kv_heads, dim = cache.shape[3], cache.shape[4]
        _check_rope(qkv, positions, cos, sin, cache, slots, num_heads)
        args = _RopeArgs(
            qkv.data_ptr(),
            cache[0].data_ptr(),
            cache[1].data_ptr(),
            positions.data_ptr(),
            slots.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            qkv.shape[0],
            qkv.stride(0),
            num_heads,
            kv_heads,
            dim,
            int(qkv.dtype == torch.bfloat16),
        )
        if self._rope(ctypes.byref(args)) != 0:
            raise ValueError("rope_write_kv: odd head_dim or qkv rows too narrow")

    @staticmethod
    def check_indices(positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, cache: torch.Tensor) -> None:
        """Every position inside the rotary table, every slot inside the cache."""
        if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < (cos.shape[0]):
            raise ValueError("position outside the rotary table")
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < (cache.shape[1] * cache.shape[2]):
            raise ValueError("slot outside the cache")

    def rms_norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2, -1) + eps) for [T, dim] rows (fp32 accumulation), no weight."""
        if x.dim() != 2 or x.dtype not in SUPPORTED_DTYPES or x.stride(1) != 1:
            raise ValueError("rms_norm needs [T, dim] fp32/bf16 rows with unit inner stride")
        out = torch.empty(x.shape, dtype=x.dtype)
        self._norm(
            x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps, int(x.dtype == torch.bfloat16)
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for [T, 2F] rows holding gate then up (one fused projection)."""
        if (
            gate_up.dim() != 2
            or gate_up.dtype not in SUPPORTED_DTYPES
            or gate_up.stride(1) != 1
            or gate_up.shape[1] % 2
        ):
            raise ValueError("silu_mul needs [T, 2F] fp32/bf16 rows with unit inner stride")
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(
            gate_up.data_ptr(),
            out.data_ptr(),
            rows,
            width // 2,
            gate_up.stride(0),
            int(gate_up.dtype == torch.bfloat16),
        )
        return out


def _check_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
) -> None:
    if qkv.dtype not in SUPPORTED_DTYPES or cache.dtype != qkv.dtype:
        raise ValueError("qkv and cache must share an fp32/bf16 dtype")
    if qkv.dim() != 2 or qkv.stride(1) != 1 or not cache.is_contiguous() or cache.dim() != 5:
        raise ValueError("qkv must be [T, width] rows; cache a contiguous 5-d tensor")
    if qkv.shape[1] < (num_heads + 2 * cache.shape[3]) * cache.shape[4]:
        raise ValueError("qkv rows narrower than q + k + v heads")
    for t in (positions, slots):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (qkv.shape[0],):
            raise ValueError("positions and slots must be contiguous int64 [T]")
    half = cache.shape[4] // 2
    for t in (cos, sin):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape[1:] != (half,):
            raise ValueError("cos/sin must be contiguous float32 [positions, head_dim / 2]")
