"""What this CPU computes natively, as far as the dtype choice cares.

bf16 matmuls are fast only where the hardware multiplies bf16 (AVX512-BF16's `vdpbf16ps`, AMX
tiles); elsewhere oneDNN and aten emulate them with conversions around fp32 math, which on an
AVX2-only Zen 3 runs the engine at 21 tok/s against 54 in fp32. The flags come from
/proc/cpuinfo; the ISA-capping variables torch and oneDNN honour (`ATEN_CPU_CAPABILITY=avx2`,
`ONEDNN_MAX_CPU_ISA=AVX2`) lower them, so a run that emulates an older CPU also decides like one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# ISA levels, lowest first: what each capping variable value leaves usable.
BASELINE, AVX2, AVX512, AVX512_BF16, AMX = range(5)
NO_CAP = AMX

# ATen's dispatch capabilities; any other value (avx512, unset) leaves oneDNN's bf16 alone.
_ATEN_CAPS = {"default": BASELINE, "avx2": AVX2}
# oneDNN ISA names by prefix, most specific first (AVX512_CORE_BF16 before AVX512_CORE).
_ONEDNN_CAPS = (
    ("AVX512_CORE_AMX", AMX),
    ("AVX10_1_512_AMX", AMX),
    ("AVX512_CORE_BF16", AVX512_BF16),
    ("AVX512_CORE_FP16", AVX512_BF16),
    ("AVX10", AVX512_BF16),
    ("AVX512", AVX512),
    ("AVX2", AVX2),
    ("SSE", BASELINE),
    ("AVX", BASELINE),
)


@dataclass(frozen=True)
class CpuCaps:
    model: str
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx_bf16: bool
    capped_by: str = ""  # the environment setting that lowered the flags, e.g. "ONEDNN_MAX_CPU_ISA=AVX2"

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    def describe(self) -> str:
        """Short text for logs: the model and the ISA features that matter here."""
        names = ("avx2", "avx512", "avx512_bf16", "amx_bf16")
        have = [name for name in names if getattr(self, name)] or ["no avx2"]
        capped = f", capped by {self.capped_by}" if self.capped_by else ""
        return f"{self.model} ({' '.join(have)}{capped})"


def cpuinfo_fields(text: str) -> tuple[str, str]:
    """`model name` and `flags` lines of the first processor, as written ("" when absent);
    every core of a VM reports the same. The bench harness records them verbatim."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.strip()
    return model, flags


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU model and its flag set."""
    model, flags = cpuinfo_fields(text)
    return model or "unknown CPU", frozenset(flags.split())


def _onednn_level(value: str) -> int:
    value = value.strip().upper()
    for prefix, level in _ONEDNN_CAPS:
        if value.startswith(prefix):
            return level
    return NO_CAP  # ALL, DEFAULT, or a name we do not know: no cap assumed


def isa_cap(env: Mapping[str, str]) -> tuple[int, str]:
    """The lowest ISA level the capping variables allow, and the setting that set it."""
    cap, why = NO_CAP, ""
    candidates = [("ATEN_CPU_CAPABILITY", _ATEN_CAPS.get(env.get("ATEN_CPU_CAPABILITY", "").lower(), NO_CAP))]
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if name in env:
            candidates.append((name, _onednn_level(env[name])))
    for name, level in candidates:
        if level < cap:
            cap, why = level, f"{name}={env[name]}"
    return cap, why


def caps_from(text: str, env: Mapping[str, str]) -> CpuCaps:
    model, flags = parse_cpuinfo(text)
    cap, why = isa_cap(env)
    return CpuCaps(
        model=model,
        avx2="avx2" in flags and cap >= AVX2,
        avx512="avx512f" in flags and cap >= AVX512,
        avx512_bf16="avx512_bf16" in flags and cap >= AVX512_BF16,
        amx_bf16={"amx_bf16", "amx_tile"} <= flags and cap >= AMX,
        capped_by=why,
    )


@functools.cache
def detect() -> CpuCaps:
    """This machine's capabilities (no /proc/cpuinfo, e.g. macOS: nothing native assumed)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    return caps_from(text, os.environ)
