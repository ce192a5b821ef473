"""Benchmark load client: synthetic and trace workloads against any OpenAI-compatible server.

Public entry points: `run_bench(BenchConfig) -> BenchReport` (async), and `add_bench_args` +
`bench_main` for the `lightspeed bench` command.
"""

from lightspeed.bench.cli import add_bench_args, bench_main
from lightspeed.bench.config import BenchConfig
from lightspeed.bench.report import BenchReport
from lightspeed.bench.runner import run_bench

__all__ = ["BenchConfig", "BenchReport", "add_bench_args", "bench_main", "run_bench"]
