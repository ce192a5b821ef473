"""Our panel GEMM (csrc/gemm.c) vs oneDNN's packed fp32 matmul on SmolLM2-135M's linears.

For each ISA profile (one child process each: torch, oneDNN and our kernels read their ISA caps
once at start; "avx2" caps all three, as bench/native_profile.py does) and each row count M, it
times one model's worth of linears the way the fp32 model runs them: per layer qkv, o + residual,
the MLP (oneDNN: SiLU-gate and times-up epilogues; panels: one GLU pass) and down + residual,
over 30 layers of distinct weights (so they stream from memory as in a real step, not from
cache), plus the lm_head. Three backends: oneDNN fp32 (the model's backend before),
panels fp32, panels with bf16-stored weights (fp32 products). Median of `--repeats` calls per
product after warm-up, best of `--rounds` alternating rounds (the 2 cores are shared). Results:
bench/results/panel_gemm.json with the CPU model and flags.

    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/panel_gemm.py
Smoke test:  .venv/bin/python bench/panel_gemm.py --smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from harness import ROOT, Script, Smoke, cpu_info, main

logger = logging.getLogger("panel_gemm")

PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "LIGHTSPEED_KERNEL_ISA": "avx2"},
}
BACKENDS = ("onednn_fp32", "panel_fp32", "panel_bf16w")
CHILD = "--child"
SMOKE = Smoke("panel_gemm", {"rows": "1,8", "repeats": 2, "rounds": 1, "layers": 2})


@dataclass(frozen=True)
class Params:
    rows: str = "1,16,32,64,256,2048"
    repeats: int = 9
    rounds: int = 2
    layers: int = 30  # SmolLM2-135M
    hidden: int = 576
    qkv: int = 960
    ffn: int = 1536
    vocab: int = 49152

    def __post_init__(self) -> None:
        if min(self.row_list, default=0) < 1 or min(self.repeats, self.rounds, self.layers) < 1:
            raise ValueError("rows must be positive integers; repeats, rounds, layers >= 1")

    @property
    def row_list(self) -> list[int]:
        return [int(r) for r in self.rows.split(",") if r.strip()]


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _model_weights(ops: Any, p: Params) -> list[dict[str, Any]]:
    """Every layer's packed weights (random; distinct per layer, as in the real model)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    h, f = p.hidden, p.ffn

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=gen) / k**0.5

    layers = []
    for _ in range(p.layers):
        layer = {"qkv": ops.pack(w(p.qkv, h)), "o": ops.pack(w(h, h)), "down": ops.pack(w(h, f))}
        if hasattr(ops, "pack_glu"):
            layer["glu"] = ops.pack_glu(w(f, h), w(f, h))
        else:
            layer["gate"], layer["up"] = ops.pack(w(f, h)), ops.pack(w(f, h))
        layers.append(layer)
    return layers


def _forward(ops: Any, layers: list[dict[str, Any]], m: int, p: Params) -> Callable[[], object]:
    """All layers' products at M rows, as the fp32 model issues them."""
    import torch

    x, xf, res = torch.randn(m, p.hidden), torch.randn(m, p.ffn), torch.randn(m, p.hidden)

    def run() -> None:
        for w in layers:
            ops.linear(x, w["qkv"])
            ops.linear_add(x, w["o"], res)
            if "glu" in w:
                ops.linear_glu(x, w["glu"])
            else:
                ops.linear_mul(x, w["up"], ops.linear_silu(x, w["gate"]))
            ops.linear_add(xf, w["down"], res)

    return run


def _backend_ops(name: str) -> Any:
    import torch

    from lightspeed.models.linear_ops import OneDnnOps
    from lightspeed.models.paged_attention import load_kernel
    from lightspeed.models.panel_gemm import PanelGemm, PanelOps

    if name == "onednn_fp32":
        return OneDnnOps()
    kernel = load_kernel()
    assert kernel is not None, "the C kernel library did not build"
    return PanelOps(PanelGemm(kernel.lib), torch.bfloat16 if name == "panel_bf16w" else torch.float32)


def _time_backend(ops: Any, p: Params) -> dict[str, dict[str, float]]:
    import torch

    layers = _model_weights(ops, p)
    head = ops.pack(torch.randn(p.vocab, p.hidden) / p.hidden**0.5)
    per_m = {}
    for m in p.row_list:
        layers_ms = _median_ms(_forward(ops, layers, m, p), p.repeats)
        x = torch.randn(m, p.hidden)
        lm_head = _median_ms(lambda x=x: ops.linear(x, head), p.repeats)
        per_m[str(m)] = {
            "layers_ms": round(layers_ms, 3),
            "lm_head_ms": round(lm_head, 3),
            "model_ms": round(layers_ms + lm_head, 2),
        }
    return per_m


def child(p: Params) -> int:
    import torch

    from lightspeed.models.paged_attention import kernel_isa

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "kernel_isa": kernel_isa()}
    for name in BACKENDS:
        result[name] = _time_backend(_backend_ops(name), p)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def run_profile(profile: str, p: Params) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in PROFILES["avx2"]} | PROFILES[profile]
    cmd = [sys.executable, __file__, CHILD, json.dumps(asdict(p))]
    logger.info("profile %s", profile)
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return {"profile": profile, "isa_env": PROFILES[profile], **result}


def _total(run: dict[str, Any]) -> float:
    return sum(v["model_ms"] for name in BACKENDS for v in run[name].values())


def measure(args: argparse.Namespace, p: Params) -> dict[str, object]:
    rounds = [[run_profile(profile, p) for profile in PROFILES] for _ in range(p.rounds)]
    runs = [min(tries, key=_total) for tries in zip(*rounds)]
    for run in runs:
        run["speedup_vs_onednn"] = {
            name: {m: round(run["onednn_fp32"][m]["model_ms"] / v["model_ms"], 2) for m, v in run[name].items()}
            for name in BACKENDS[1:]
        }
    cpu = cpu_info()
    return {
        "params": asdict(p),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "note": "model_ms: one forward's linears at M rows (all layers + lm_head); medians, "
        "best of the rounds; a shared 2-core VM, expect +-10%",
        "runs": runs,
    }


def summarize(doc: dict[str, object]) -> None:
    for run in doc["runs"]:  # type: ignore[attr-defined]
        for m in run["onednn_fp32"]:
            logger.info(
                "%-6s M=%-5s oneDNN %8.2f ms | panels fp32 %8.2f ms (x%.2f) | bf16 weights %8.2f ms (x%.2f)",
                run["profile"],
                m,
                run["onednn_fp32"][m]["model_ms"],
                run["panel_fp32"][m]["model_ms"],
                run["speedup_vs_onednn"]["panel_fp32"][m],
                run["panel_bf16w"][m]["model_ms"],
                run["speedup_vs_onednn"]["panel_bf16w"][m],
            )


SCRIPT = Script(
    name="panel_gemm",
    doc=__doc__,
    params=Params,
    run=measure,
    result_path=SMOKE.result_path,
    add_flags=SMOKE.add_flags,
    check=SMOKE.check,
    summarize=summarize,
)

if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        raise SystemExit(child(Params(**json.loads(sys.argv[2]))))
    raise SystemExit(main(SCRIPT))
