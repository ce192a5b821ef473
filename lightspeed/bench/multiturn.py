"""A synthetic multi-turn workload with growing histories, written as a Mooncake-format trace.

Each session is a conversation: its first prompt is a system prompt shared by every session plus
the session's own opening, and each later turn resends the whole history (every earlier prompt
and answer) plus a new user message, after a think time. As Mooncake `hash_ids` (one id per
512-token block, equal ids = equal tokens), turn k+1 repeats every full block of turn k and
continues the chain, so a prefix cache and a KV-aware router see the reuse an agent or chat
fleet produces, and prompts grow the way they do there. The trace is plain JSONL, so any client
that replays Mooncake traces (ours, aiperf) replays it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

BLOCK_TOKENS = 512  # the Mooncake trace's block size


class TraceRow(msgspec.Struct, frozen=True):
    timestamp: int  # ms since the start
    input_length: int
    output_length: int
    hash_ids: list[int]
    session_id: str


@dataclass(frozen=True, slots=True)
class MultiTurnSpec:
    sessions: int = 200
    session_rate: float = 1.0  # new sessions per second (Poisson)
    turns: tuple[int, int] = (2, 8)  # turns per session, uniform inclusive
    system_tokens: int = 1024  # shared by every session
    opening_tokens: tuple[int, int] = (256, 2048)  # the session's first user message
    user_tokens: tuple[int, int] = (64, 512)  # each later user message
    output_tokens: tuple[int, int] = (32, 256)
    think_time_s: float = 4.0  # mean, exponential, from one turn's arrival to the next
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.session_rate <= 0 or self.think_time_s < 0:
            raise ValueError("sessions >= 1, session_rate > 0 and think_time_s >= 0 required")
        for name in ("turns", "opening_tokens", "user_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.system_tokens < 0:
            raise ValueError("system_tokens must be >= 0")


def _blocks(length: int) -> int:
    return -(-length // BLOCK_TOKENS)


def session_rows(
    spec: MultiTurnSpec, index: int, start_s: float, rng: np.random.Generator
) -> Iterator[tuple[float, TraceRow]]:
    """One session's turns as (arrival s, row). Block ids: the system prompt's come first
    (shared), then a range owned by this session (no two sessions share an id beyond that)."""
    system_blocks = spec.system_tokens // BLOCK_TOKENS  # only whole blocks can be shared
    base = system_blocks + index * 1_000_000  # a session never outgrows a million blocks
    history = spec.system_tokens + int(rng.integers(spec.opening_tokens[0], spec.opening_tokens[1] + 1))
    arrival = start_s
    for turn in range(int(rng.integers(spec.turns[0], spec.turns[1] + 1))):
        if turn:
            arrival += float(rng.exponential(spec.think_time_s))
            history += int(rng.integers(spec.user_tokens[0], spec.user_tokens[1] + 1))
        output = int(rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1))
        shared = list(range(min(system_blocks, _blocks(history))))
        own = list(range(base, base + _blocks(history) - len(shared)))
        yield arrival, TraceRow(round(arrival * 1000), history, output, shared + own, f"s{index}")
        history += output  # the answer joins the history the next turn resends


def generate(spec: MultiTurnSpec) -> list[TraceRow]:
    """Every session's turns, ordered by arrival."""
    rng = np.random.default_rng(spec.seed)
    starts = np.cumsum(rng.exponential(1.0 / spec.session_rate, spec.sessions))
    rows = [row for i, start in enumerate(starts) for row in session_rows(spec, i, float(start), rng)]
    rows.sort(key=lambda item: item[0])
    return [row for _arrival, row in rows]


def write_trace(spec: MultiTurnSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = msgspec.json.Encoder()
    path.write_bytes(b"".join(encoder.encode(row) + b"\n" for row in generate(spec)))
    return path
