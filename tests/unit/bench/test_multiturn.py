"""The multi-turn trace: growing histories that reuse every earlier full block, a shared system
prompt, sessions that never share beyond it, and a file the Mooncake loader replays."""

import itertools
from pathlib import Path

import pytest

from lightspeed.bench.multiturn import BLOCK_TOKENS, MultiTurnSpec, generate, write_trace
from lightspeed.bench.traces import load_mooncake

SPEC = MultiTurnSpec(sessions=12, session_rate=2.0, system_tokens=1024, seed=3)


def by_session(rows: list) -> dict[str, list]:  # type: ignore[type-arg]
    sessions: dict[str, list] = {}  # type: ignore[type-arg]
    for row in rows:
        sessions.setdefault(row.session_id, []).append(row)
    return sessions


def test_each_turn_resends_the_history_and_grows() -> None:
    for turns in by_session(generate(SPEC)).values():
        assert SPEC.turns[0] <= len(turns) <= SPEC.turns[1]
        for prev, nxt in itertools.pairwise(turns):
            assert nxt.timestamp >= prev.timestamp
            grown = nxt.input_length - prev.input_length - prev.output_length
            assert SPEC.user_tokens[0] <= grown <= SPEC.user_tokens[1]
            full = prev.input_length // BLOCK_TOKENS  # every full block of the last turn is reused
            assert nxt.hash_ids[:full] == prev.hash_ids[:full]
        for row in turns:
            assert len(row.hash_ids) == -(-row.input_length // BLOCK_TOKENS)


def test_sessions_share_only_the_system_prompt() -> None:
    sessions = list(by_session(generate(SPEC)).values())
    firsts = [set(turns[-1].hash_ids) for turns in sessions]
    for i, a in enumerate(firsts):
        for b in firsts[i + 1 :]:
            assert a & b == {0, 1}  # 1024 system tokens = two whole 512-token blocks


def test_same_seed_same_trace_and_the_mooncake_loader_replays_it(tmp_path: Path) -> None:
    assert generate(SPEC) == generate(SPEC)
    path = write_trace(SPEC, tmp_path / "t.jsonl")
    trace = load_mooncake(path)
    rows = generate(SPEC)
    assert trace.size == len(rows)
    assert list(trace.arrivals) == sorted(trace.arrivals)
    first = next(iter(trace))
    assert len(first.prompt) == rows[0].input_length and first.session_id == rows[0].session_id


@pytest.mark.parametrize("field", ["turns", "user_tokens"])
def test_bad_ranges_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MultiTurnSpec(**{field: (5, 2)})  # type: ignore[arg-type]
