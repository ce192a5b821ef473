"""Which dtype the native engine computes in, and why (the reason goes in the startup log).

Asked dtypes are kept, except bf16 on a CPU without native bf16 (cpu_caps.py): emulated per op
it runs at well under half the fp32 speed, so the model computes in fp32 (activations, KV cache)
on weights stored in bf16 (the panel GEMM widens them in registers: half the bytes each step
streams, the products of the bf16 weights exact in fp32). `auto` follows a rule where the
hardware decides it (AMX: bf16; no native bf16: fp32 compute, on bf16-stored weights when the
checkpoint itself is bf16, where storing them so loses nothing) and otherwise (AVX512-BF16
without AMX, where it depends on the model's shapes) times one prefill-sized and one
decode-sized step in both dtypes and takes the faster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lightspeed.native.cpu_caps import CpuCaps

# bf16 rounds every weight and activation: it has to win clearly to be worth that.
BF16_MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one prefill-sized and one decode-sized step."""

    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def describe(self) -> str:
        return f"prefill {self.prefill_s * 1e3:.1f} ms + decode {self.decode_s * 1e3:.1f} ms"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str
    warn: bool = False  # the asked dtype was replaced: logged as a warning
    weight_dtype: torch.dtype | None = None  # how linear weights are stored, where not `dtype`

    def describe(self) -> str:
        """ "float32", or "float32 (weights bfloat16)"."""
        if self.weight_dtype in (None, self.dtype):
            return dtype_name(self.dtype)
        assert self.weight_dtype is not None
        return f"{dtype_name(self.dtype)} (weights {dtype_name(self.weight_dtype)})"


Probe = Callable[[], Mapping[torch.dtype, StepTimes]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rule_dtype(caps: CpuCaps) -> torch.dtype | None:
    """The dtype the hardware alone decides, or None where only a measurement can."""
    if caps.amx_bf16:
        return torch.bfloat16
    if not caps.native_bf16:
        return torch.float32
    return None


def pick_faster(times: Mapping[torch.dtype, StepTimes]) -> torch.dtype:
    """bf16 where its prefill + decode time beats fp32's by BF16_MIN_SPEEDUP, else fp32."""
    fp32, bf16 = times[torch.float32].total_s, times[torch.bfloat16].total_s
    return torch.bfloat16 if bf16 * BF16_MIN_SPEEDUP < fp32 else torch.float32


def describe_times(times: Mapping[torch.dtype, StepTimes]) -> str:
    return "; ".join(f"{dtype_name(d)}: {t.describe()}" for d, t in times.items())


def _auto_cpu(caps: CpuCaps, probe: Probe, source_dtype: torch.dtype | None) -> DtypeChoice:
    ruled = rule_dtype(caps)
    if ruled is not None:
        why = "AMX bf16 tiles" if caps.amx_bf16 else "no native bf16 (avx512_bf16 / amx_bf16)"
        if ruled == torch.float32 and source_dtype == torch.bfloat16:
            why += ", a bf16 checkpoint: weights kept in bf16, computed in float32"
            return DtypeChoice(ruled, f"auto rule: {why} on {caps.describe()}", weight_dtype=torch.bfloat16)
        return DtypeChoice(ruled, f"auto rule: {why} on {caps.describe()}")
    times = probe()
    picked = pick_faster(times)
    return DtypeChoice(picked, f"auto probe on {caps.describe()}: {describe_times(times)}")


def choose_dtype(
    asked: torch.dtype | str | None,
    device: torch.device,
    caps: CpuCaps,
    probe: Probe,
    source_dtype: torch.dtype | None = None,
) -> DtypeChoice:
    """`asked`: a dtype, "auto", or None (the fixed default: fp32 on CPU, bf16 on GPUs);
    `source_dtype`: the checkpoint's weight dtype, where known."""
    if device.type != "cpu":
        if isinstance(asked, torch.dtype):
            return DtypeChoice(asked, "asked")
        return DtypeChoice(torch.bfloat16, f"default on {device.type}")
    if asked is None:
        return DtypeChoice(torch.float32, "default on cpu")
    if asked == "auto":
        return _auto_cpu(caps, probe, source_dtype)
    if not isinstance(asked, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype, 'auto' or None; got {asked!r}")
    if asked == torch.bfloat16 and not caps.native_bf16:
        reason = (
            f"bfloat16 asked, but {caps.describe()} has no native bf16 (avx512_bf16 / amx_bf16): "
            "emulated bf16 runs at under half the fp32 speed, so weights are stored in bf16 and "
            "computed in float32 (activations and KV cache float32)"
        )
        return DtypeChoice(torch.float32, reason, weight_dtype=torch.bfloat16)
    return DtypeChoice(asked, "asked")
