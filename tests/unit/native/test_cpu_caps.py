"""CPU capability detection on recorded /proc/cpuinfo texts, with and without the ISA caps."""

from __future__ import annotations

import pytest

from lightspeed.native.cpu_caps import CpuCaps, caps_from, detect, parse_cpuinfo
from tests.unit.native.cpuinfo_samples import SAPPHIRE_RAPIDS, ZEN3, ZEN4


def features(caps: CpuCaps) -> tuple[bool, bool, bool, bool]:
    return caps.avx2, caps.avx512, caps.avx512_bf16, caps.amx_bf16


def test_parse_cpuinfo_reads_model_and_flags() -> None:
    model, flags = parse_cpuinfo(ZEN4)
    assert model == "AMD EPYC 9654 96-Core Processor"
    assert {"avx2", "avx512f", "avx512_bf16"} <= flags
    assert "sysret_ss_attrs" not in flags  # the bugs line is not flags
    assert parse_cpuinfo("") == ("unknown CPU", frozenset())


@pytest.mark.parametrize(
    ("text", "expected", "native"),
    [
        (ZEN3, (True, False, False, False), False),
        (ZEN4, (True, True, True, False), True),
        (SAPPHIRE_RAPIDS, (True, True, True, True), True),
    ],
)
def test_recorded_cpus(text: str, expected: tuple[bool, bool, bool, bool], native: bool) -> None:
    caps = caps_from(text, {})
    assert features(caps) == expected
    assert caps.native_bf16 is native
    assert caps.capped_by == ""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ATEN_CPU_CAPABILITY": "avx2"}, (True, False, False, False)),
        ({"ATEN_CPU_CAPABILITY": "default"}, (False, False, False, False)),
        ({"ATEN_CPU_CAPABILITY": "avx512"}, (True, True, True, True)),  # not a cap below AMX
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, (True, False, False, False)),
        ({"ONEDNN_MAX_CPU_ISA": "avx2_vnni"}, (True, False, False, False)),
        ({"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, (True, True, False, False)),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, (True, True, True, False)),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, (True, True, True, True)),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, (True, True, True, True)),
    ],
)
def test_isa_caps_lower_the_flags(env: dict[str, str], expected: tuple[bool, bool, bool, bool]) -> None:
    caps = caps_from(SAPPHIRE_RAPIDS, env)
    assert features(caps) == expected
    assert caps.capped_by == ("" if expected == (True, True, True, True) else next(f"{k}={v}" for k, v in env.items()))


def test_the_lowest_cap_wins_and_is_named() -> None:
    caps = caps_from(ZEN4, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert not caps.native_bf16
    assert caps.capped_by == "ATEN_CPU_CAPABILITY=avx2"
    assert caps.describe() == "AMD EPYC 9654 96-Core Processor (avx2, capped by ATEN_CPU_CAPABILITY=avx2)"


def test_describe_without_simd() -> None:
    assert caps_from("", {}).describe() == "unknown CPU (no avx2)"


def test_detect_reads_this_machine() -> None:
    caps = detect()
    assert isinstance(caps, CpuCaps)
    assert caps is detect()  # read once per process
