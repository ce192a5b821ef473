from pathlib import Path

import pytest

from lightspeed.bench.traces import (
    TraceWindow,
    load_azure,
    load_mooncake,
    load_trace,
    mooncake_prompt,
)
from lightspeed.bench.workload import TokenSpace

MOONCAKE = (
    '{"timestamp": 0, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]}\n'
    '{"timestamp": 500, "input_length": 1024, "output_length": 3, "hash_ids": [0, 1]}\n'
    '{"timestamp": 1500, "input_length": 600, "output_length": 0, "hash_ids": [0, 9]}\n'
    "\n"
    '{"timestamp": 2500, "input_length": 10, "output_length": 5, "hash_ids": [7]}\n'
)

AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,12,109\n"
    "2023-11-16 18:15:51.0000000,5,1\n"
)


@pytest.fixture
def mooncake_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text(MOONCAKE)
    return path


def test_mooncake_shared_prefix_blocks_and_exact_lengths(mooncake_file: Path) -> None:
    specs = list(load_mooncake(mooncake_file, seed=3))
    assert [s.prompt_len for s in specs] == [1100, 1024, 600, 10]
    assert [s.max_tokens for s in specs] == [7, 3, 1, 5]  # 0 -> at least one token
    assert [s.arrival_s for s in specs] == [0.0, 0.5, 1.5, 2.5]
    assert all(s.ignore_eos for s in specs)
    a, b, c, d = (s.prompt for s in specs)
    assert isinstance(a, tuple) and isinstance(b, tuple) and isinstance(c, tuple)
    # Two shared leading blocks -> identical first 1024 tokens; the third block differs.
    assert a[:1024] == b
    # One shared leading block -> exactly 512 common tokens, then block 1 vs block 9.
    assert a[:512] == c[:512]
    assert a[512:600] != c[512:600]
    assert all(100 <= t < 49152 for t in a + b + c + tuple(d))


def test_mooncake_prompt_is_deterministic_per_seed() -> None:
    tokens = TokenSpace()
    first = mooncake_prompt([4, 5], 700, 1, tokens, 512)
    assert first == mooncake_prompt([4, 5], 700, 1, tokens, 512)
    assert first != mooncake_prompt([4, 5], 700, 2, tokens, 512)
    assert first[:512] == mooncake_prompt([4], 512, 1, tokens, 512)
    with pytest.raises(ValueError):
        mooncake_prompt([4], 513, 1, tokens, 512)


def test_mooncake_window_limit_and_output_cap(mooncake_file: Path) -> None:
    trace = load_mooncake(mooncake_file, window=TraceWindow(start_s=0.5, window_s=1.5))
    assert trace.size == 2
    assert [s.arrival_s for s in trace] == [0.0, 1.0]
    capped = load_mooncake(mooncake_file, window=TraceWindow(limit=2, max_output_tokens=4))
    assert [s.max_tokens for s in capped] == [4, 3]


def test_azure_lengths_and_arrivals(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE)
    trace = load_trace(path, seed=0, tokens=TokenSpace(vocab_size=1000, min_token_id=100))
    specs = list(trace)
    assert [s.prompt_len for s in specs] == [374, 12, 5]
    assert [s.max_tokens for s in specs] == [44, 109, 1]
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 4.314579, 4.31941])
    assert all(100 <= t < 1000 for s in specs for t in s.prompt)
    assert list(load_azure(path, seed=0, tokens=TokenSpace(1000, 100))) == specs
    windowed = load_azure(path, window=TraceWindow(start_s=4.0))
    assert [round(s.arrival_s, 6) for s in windowed] == [0.314579, 0.31941]


def test_unknown_format_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_trace(tmp_path / "trace.txt")
