"""Trace workloads: Mooncake JSONL (prefix hash ids) and Azure LLM inference CSV.

Both keep only the compact trace rows in memory and build each prompt when it is iterated.
Token ids are derived from a seeded RNG keyed by (seed, block hash) or (seed, row index), so a
replay is identical across runs and machines.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import msgspec
import numpy as np

from lightspeed.bench.workload import DEFAULT_TOKENS, RequestSpec, TokenSpace

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class TraceWindow:
    """Which part of a trace to replay: [start_s, start_s + window_s) in trace time, at most
    `limit` requests, output lengths optionally capped (for scaled-down runs)."""

    start_s: float = 0.0
    window_s: float | None = None
    limit: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.start_s < 0:
            raise ValueError(f"start_s must be >= 0; got {self.start_s}")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError(f"window_s must be > 0; got {self.window_s}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0; got {self.limit}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1; got {self.max_output_tokens}")

    def admits(self, offset_s: float) -> bool:
        if offset_s < self.start_s:
            return False
        return self.window_s is None or offset_s < self.start_s + self.window_s

    def output_tokens(self, n: int) -> int:
        n = max(1, n)
        return n if self.max_output_tokens is None else min(n, self.max_output_tokens)


WHOLE_TRACE = TraceWindow()


class MooncakeRow(msgspec.Struct, frozen=True):
    timestamp: float  # ms since trace start
    input_length: int
    output_length: int
    hash_ids: list[int]
    session_id: str | int | None = None


@lru_cache(maxsize=8192)
def mooncake_block(block_hash: int, seed: int, tokens: TokenSpace, block_tokens: int) -> np.ndarray:
    """The token ids of one trace block: a pure function of (seed, hash), cached because
    popular prefix blocks are rebuilt for many requests."""
    rng = np.random.default_rng((seed, block_hash))
    block = tokens.draw(rng, block_tokens)
    block.flags.writeable = False  # shared by every prompt that reuses the block
    return block


def mooncake_prompt(
    hash_ids: list[int], input_length: int, seed: int, tokens: TokenSpace, block_tokens: int
) -> tuple[int, ...]:
    """Concatenate the blocks of `hash_ids`, cut to exactly `input_length` tokens."""
    if input_length > len(hash_ids) * block_tokens:
        raise ValueError(f"input_length {input_length} exceeds {len(hash_ids)} blocks of {block_tokens}")
    needed = -(-input_length // block_tokens)
    blocks = [mooncake_block(h, seed, tokens, block_tokens) for h in hash_ids[:needed]]
    if not blocks:
        return ()
    return tuple(np.concatenate(blocks)[:input_length].tolist())


@dataclass(frozen=True, slots=True)
class MooncakeTrace:
    rows: tuple[MooncakeRow, ...]
    arrivals: tuple[float, ...]
    seed: int = 0
    tokens: TokenSpace = DEFAULT_TOKENS
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    window: TraceWindow = WHOLE_TRACE

    @property
    def size(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[RequestSpec]:
        for row, arrival in zip(self.rows, self.arrivals, strict=True):
            prompt = mooncake_prompt(row.hash_ids, row.input_length, self.seed, self.tokens, self.block_tokens)
            session = None if row.session_id is None else str(row.session_id)
            max_tokens = self.window.output_tokens(row.output_length)
            yield RequestSpec(prompt, max_tokens, True, arrival, session)


def load_mooncake(
    path: str | Path,
    *,
    seed: int = 0,
    tokens: TokenSpace = DEFAULT_TOKENS,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    window: TraceWindow = WHOLE_TRACE,
) -> MooncakeTrace:
    """Read a Mooncake JSONL trace; arrival offsets are relative to the window start."""
    decoder = msgspec.json.Decoder(MooncakeRow)
    rows: list[MooncakeRow] = []
    arrivals: list[float] = []
    with open(path, "rb") as f:
        for line in f:
            if window.limit is not None and len(rows) >= window.limit:
                break
            if not line.strip():
                continue
            row = decoder.decode(line)
            offset = row.timestamp / 1000.0
            if window.admits(offset):
                rows.append(row)
                arrivals.append(offset - window.start_s)
    return MooncakeTrace(tuple(rows), tuple(arrivals), seed, tokens, block_tokens, window)


@dataclass(frozen=True, slots=True)
class AzureRow:
    index: int  # row number in the file: keys the prompt RNG
    arrival_s: float
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class AzureTrace:
    rows: tuple[AzureRow, ...]
    seed: int = 0
    tokens: TokenSpace = DEFAULT_TOKENS
    window: TraceWindow = WHOLE_TRACE

    @property
    def size(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[RequestSpec]:
        for row in self.rows:
            rng = np.random.default_rng((self.seed, row.index))
            prompt = tuple(self.tokens.draw(rng, row.context_tokens).tolist())
            max_tokens = self.window.output_tokens(row.generated_tokens)
            yield RequestSpec(prompt, max_tokens, True, row.arrival_s)


def load_azure(
    path: str | Path,
    *,
    seed: int = 0,
    tokens: TokenSpace = DEFAULT_TOKENS,
    window: TraceWindow = WHOLE_TRACE,
) -> AzureTrace:
    """Read an Azure `TIMESTAMP,ContextTokens,GeneratedTokens` CSV; offsets are relative to the
    first row's timestamp, then to the window start."""
    rows: list[AzureRow] = []
    t0: datetime | None = None
    with open(path, newline="") as f:
        for index, rec in enumerate(csv.DictReader(f)):
            if window.limit is not None and len(rows) >= window.limit:
                break
            ts = datetime.fromisoformat(rec["TIMESTAMP"].strip())
            t0 = ts if t0 is None else t0
            offset = (ts - t0).total_seconds()
            if window.admits(offset):
                context = max(1, int(rec["ContextTokens"]))
                arrival = offset - window.start_s
                rows.append(AzureRow(index, arrival, context, int(rec["GeneratedTokens"])))
    return AzureTrace(tuple(rows), seed, tokens, window)


def load_trace(
    path: str | Path,
    fmt: str = "auto",
    *,
    seed: int = 0,
    tokens: TokenSpace = DEFAULT_TOKENS,
    window: TraceWindow = WHOLE_TRACE,
) -> MooncakeTrace | AzureTrace:
    """Load a trace by format name, or by file extension when `fmt` is "auto"."""
    if fmt == "auto":
        suffix = Path(path).suffix.lower()
        fmt = {".jsonl": "mooncake", ".json": "mooncake", ".csv": "azure"}.get(suffix, "")
    if fmt == "mooncake":
        return load_mooncake(path, seed=seed, tokens=tokens, window=window)
    if fmt == "azure":
        return load_azure(path, seed=seed, tokens=tokens, window=window)
    raise ValueError(f"cannot tell the trace format of {path}; pass mooncake or azure")
