"""Which dtype the native engine computes in, and why (the reason goes in the startup log).

Asked dtypes are kept, except bf16 on a CPU without native bf16 (cpu_caps.py): emulated per op
it runs at well under half the fp32 speed, so the weights are converted once at load to fp32
instead, with a warning. `auto` follows a rule where the hardware decides it (AMX: bf16; no
native bf16: fp32) and otherwise (AVX512-BF16 without AMX, where it depends on the model's
shapes) times one prefill-sized and one decode-sized step in both dtypes and takes the faster.
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


def _auto_cpu(caps: CpuCaps, probe: Probe) -> DtypeChoice:
    ruled = rule_dtype(caps)
    if ruled is not None:
        why = "AMX bf16 tiles" if caps.amx_bf16 else "no native bf16 (avx512_bf16 / amx_bf16)"
        return DtypeChoice(ruled, f"auto rule: {why} on {caps.describe()}")
    times = probe()
    picked = pick_faster(times)
    return DtypeChoice(picked, f"auto probe on {caps.describe()}: {describe_times(times)}")


def choose_dtype(asked: torch.dtype | str | None, device: torch.device, caps: CpuCaps, probe: Probe) -> DtypeChoice:
    """`asked`: a dtype, "auto", or None (the fixed default: fp32 on CPU, bf16 on GPUs)."""
    if device.type != "cpu":
        if isinstance(asked, torch.dtype):
            return DtypeChoice(asked, "asked")
        return DtypeChoice(torch.bfloat16, f"default on {device.type}")
    if asked is None:
        return DtypeChoice(torch.float32, "default on cpu")
    if asked == "auto":
        return _auto_cpu(caps, probe)
    if not isinstance(asked, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype, 'auto' or None; got {asked!r}")
    if asked == torch.bfloat16 and not caps.native_bf16:
        reason = (
            f"bfloat16 asked, but {caps.describe()} has no native bf16 (avx512_bf16 / amx_bf16): "
            "emulated bf16 runs at under half the fp32 speed, so the weights were converted once to float32"
        )
        return DtypeChoice(torch.float32, reason, warn=True)
    return DtypeChoice(asked, "asked")
