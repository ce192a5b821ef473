"""fp32 linears on our own panel-packed GEMM (csrc/gemm.c), with the model's epilogues fused.

oneDNN's fp32 matmul on packed weights is what the fp32 model used before; on AVX2 it runs the
few-row products of decode steps well short of both the FMA peak and memory bandwidth. The C
kernel keeps a 6 x 16 tile of outputs in registers and streams weights packed into 16-feature
panels; it matches oneDNN at prefill sizes and beats it at decode sizes (bench/README.md, "panel
GEMM"), so one packed copy of each weight serves every step. It also gives batch-invariant
results: every output is one fixed-order fma chain over k, whatever rows share its step.

The MLP's gate and up weights are packed interleaved (8 gate features, then the same 8 of up, per
panel), so one pass computes silu(gate) * up (`linear_glu`): no [T, 2F] intermediate.

Weights whose feature count is not a multiple of the panel width stay oneDNN-packed (2-D) and
take oneDNN's path; the panel form is 3-D, which is how the ops tell them apart.
"""

from __future__ import annotations

import ctypes

import torch

from lightspeed.models.linear_ops import OneDnnOps

PANEL = 16  # features per panel: ls_gemm_panel_width() in csrc/gemm.c
EPI_NONE, EPI_ADD, EPI_SILU, EPI_MUL, EPI_GLU = range(5)


class _GemmArgs(ctypes.Structure):
    """Mirror of `ls_gemm_args` in csrc/gemm.c."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("x", "w", "y", "other")],
        *[(name, ctypes.c_int64) for name in ("m", "n", "k", "x_stride", "y_stride", "other_stride")],
        ("epilogue", ctypes.c_int),
        ("w_bf16", ctypes.c_int),
    ]


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[N, K] (N a multiple of PANEL) -> [N / PANEL, K, PANEL], contiguous, same dtype."""
    n, k = w.shape
    if n % PANEL:
        raise ValueError(f"{n} output features: not a multiple of the panel width {PANEL}")
    return w.reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def pack_glu_panels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [F, K] (F a multiple of PANEL / 2) -> panels of 8 gate then the same 8 up features."""
    if gate.shape != up.shape or gate.shape[0] % (PANEL // 2):
        raise ValueError("gate and up must share a shape [F, K] with F a multiple of 8")
    f, k = gate.shape
    half = PANEL // 2
    both = torch.stack([gate.reshape(f // half, half, k), up.reshape(f // half, half, k)], dim=1)
    return pack_panels(both.reshape(2 * f, k))


class PanelGemm:
    """ctypes front of csrc/gemm.c. Shapes and dtypes are checked here: the C code trusts them."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        width = lib.ls_gemm_panel_width
        width.restype = ctypes.c_int
        if width() != PANEL:
            raise ValueError(f"kernel panel width {width()} != {PANEL}")
        self._fns = {False: lib.ls_gemm, True: lib.ls_gemm_reference}
        for fn in self._fns.values():
            fn.argtypes = [ctypes.POINTER(_GemmArgs)]
            fn.restype = ctypes.c_int

    def __call__(
        self,
        x: torch.Tensor,
        panels: torch.Tensor,
        epilogue: int = EPI_NONE,
        other: torch.Tensor | None = None,
        reference: bool = False,
    ) -> torch.Tensor:
        """x [M, K] fp32 @ the packed weight, then the epilogue; `other` [M, N] (or [N], one row
        for all, e.g. a bias) for EPI_ADD / EPI_MUL. `reference`: the scalar path."""
        n = panels.shape[0] * (PANEL // 2 if epilogue == EPI_GLU else PANEL)
        _check(x, panels, epilogue, other, n)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        if not x.shape[0]:  # nothing to compute (and an empty tensor may have no address)
            return y
        other_ptr, other_stride = (None, 0) if other is None else (other.data_ptr(), _row_stride(other))
        args = _GemmArgs(
            x.data_ptr(),
            panels.data_ptr(),
            y.data_ptr(),
            other_ptr,
            x.shape[0],
            n,
            x.shape[1],
            x.stride(0),
            n,
            other_stride,
            epilogue,
            int(panels.dtype == torch.bfloat16),
        )
        if self._fns[reference](ctypes.byref(args)) != 0:
            raise ValueError("ls_gemm refused its arguments")
        return y


def _row_stride(other: torch.Tensor) -> int:
    return 0 if other.dim() == 1 else other.stride(0)


def _check(x: torch.Tensor, panels: torch.Tensor, epilogue: int, other: torch.Tensor | None, n: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be float32 [M, K] rows with unit inner stride")
    if panels.dtype not in (torch.float32, torch.bfloat16) or panels.dim() != 3 or not panels.is_contiguous():
        raise ValueError("weights must be contiguous fp32/bf16 panels [N / 16, K, 16]")
    if panels.shape[1] != x.shape[1] or panels.shape[2] != PANEL:
        raise ValueError(f"x has {x.shape[1]} columns, the panels {panels.shape[1]} (width {panels.shape[2]})")
    if epilogue not in range(5):
        raise ValueError(f"unknown epilogue {epilogue}")
    if (epilogue in (EPI_ADD, EPI_MUL)) != (other is not None):
        raise ValueError("other is given exactly for the add and mul epilogues")
    if other is not None:
        rows_ok = other.dim() == 1 or (other.dim() == 2 and other.shape[0] == x.shape[0])
        if other.dtype != torch.float32 or not rows_ok or other.shape[-1] != n or other.stride(-1) != 1:
            raise ValueError(f"other must be float32 [{x.shape[0]}, {n}] or [{n}] with unit inner stride")


class PanelOps(OneDnnOps):
    """fp32 linears through PanelGemm; weights it cannot panel-pack keep oneDNN's path.
    `linear_glu` is silu(x @ gate.T) * (x @ up.T) on gate/up packed by `pack_glu`."""

    def __init__(self, gemm: PanelGemm, weight_dtype: torch.dtype = torch.float32) -> None:
        """`weight_dtype`: how panels are stored; bf16 halves the bytes every step streams
        (the products stay fp32, on the bf16-rounded weights)."""
        if weight_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"panel weights are float32 or bfloat16, not {weight_dtype}")
        self.gemm = gemm
        self.weight_dtype = weight_dtype

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        if w.dtype != torch.float32 or w.shape[0] % PANEL:
            return super().pack(w)
        return pack_panels(w.to(self.weight_dtype))

    def pack_glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return pack_glu_panels(gate.to(self.weight_dtype), up.to(self.weight_dtype))

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if w.dim() == 2:
            return super().linear(x, w, bias)
        return self.gemm(x, w) if bias is None else self.gemm(x, w, EPI_ADD, bias)

    def linear_add(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return super().linear_add(x, w, other) if w.dim() == 2 else self.gemm(x, w, EPI_ADD, other)

    def linear_silu(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return super().linear_silu(x, w) if w.dim() == 2 else self.gemm(x, w, EPI_SILU)

    def linear_mul(self, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return super().linear_mul(x, w, other) if w.dim() == 2 else self.gemm(x, w, EPI_MUL, other)

    def linear_glu(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, w, EPI_GLU)
