"""Conditional-disaggregation decisions on their exact thresholds (DESIGN §6)."""

from __future__ import annotations

import pytest

from lightspeed.disagg.policy import Decision, PolicyConfig, PrefillContext, Reason, decide

CFG = PolicyConfig()  # 2048 tokens, 70 %


def ctx(isl: int, overlap: int = 0, **kw: object) -> PrefillContext:
    base: dict[str, object] = {"block_size": 64, "prefill_workers": 1}
    base.update(kw)
    return PrefillContext(isl, overlap, **base)  # type: ignore[arg-type]


def test_cold_prompt_goes_remote() -> None:
    # uncached 100 < 2048 but 100 is not < 70 % of 100: a cold prompt is disaggregated
    assert decide(ctx(100), CFG) == Decision(True, Reason.REMOTE)


def test_token_bound_is_strict() -> None:
    # isl 4096, 32 blocks cached (2048 tokens): uncached 2048 is not < 2048 -> remote
    assert decide(ctx(4096, 32), CFG) == Decision(True, Reason.REMOTE)
    # one more cached block: uncached 1984 < 2048 and < 0.7 * 4096 -> local
    assert decide(ctx(4096, 33), CFG) == Decision(False, Reason.SMALL_UNCACHED)


def test_fraction_bound_is_strict() -> None:
    # isl 640, 3 blocks cached: uncached 448 == 0.7 * 640 -> not below -> remote
    assert decide(ctx(640, 3), CFG) == Decision(True, Reason.REMOTE)
    # 4 blocks cached: uncached 384 < 448 -> local
    assert decide(ctx(640, 4), CFG) == Decision(False, Reason.SMALL_UNCACHED)


def test_both_bounds_must_hold() -> None:
    # isl 10000, 117 blocks cached: uncached 2512 (< 70 % but not < 2048 tokens) -> remote
    assert decide(ctx(10000, 117), CFG) == Decision(True, Reason.REMOTE)
    # a custom bound: 3000 tokens
    wide = PolicyConfig(max_local_prefill_tokens=3000)
    assert decide(ctx(10000, 118), wide) == Decision(False, Reason.SMALL_UNCACHED)  # uncached 2448


def test_overlap_beyond_prompt_counts_as_fully_cached() -> None:
    assert ctx(100, 5).uncached_tokens == 0
    assert decide(ctx(100, 5), CFG) == Decision(False, Reason.SMALL_UNCACHED)


def test_busy_prefill_pool_keeps_it_local() -> None:
    assert decide(ctx(4096, prefill_all_busy=True), CFG) == Decision(False, Reason.PREFILL_BUSY)


def test_small_uncached_wins_over_busy() -> None:
    assert decide(ctx(4096, 60, prefill_all_busy=True), CFG).reason is Reason.SMALL_UNCACHED


def test_no_prefill_workers_is_aggregated() -> None:
    assert decide(ctx(4096, prefill_workers=0), CFG) == Decision(False, Reason.NO_PREFILL_WORKERS)
    assert decide(ctx(4096, prefill_workers=0, pinned_prefill=True), CFG).reason is Reason.NO_PREFILL_WORKERS


def test_pinned_prefill_skips_the_policy() -> None:
    assert decide(ctx(4096, 60, pinned_prefill=True, prefill_all_busy=True), CFG) == Decision(True, Reason.PINNED)
    assert decide(ctx(10, pinned_prefill=True, max_tokens=1), CFG) == Decision(True, Reason.PINNED)


def test_single_token_needs_no_decode_worker() -> None:
    assert decide(ctx(4096, max_tokens=1), CFG) == Decision(False, Reason.SINGLE_TOKEN)
    assert decide(ctx(4096, max_tokens=2), CFG) == Decision(True, Reason.REMOTE)


def test_unconditional_mode_always_remote() -> None:
    always = PolicyConfig(conditional=False)
    assert decide(ctx(4096, 60, prefill_all_busy=True), always) == Decision(True, Reason.ALWAYS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_local_prefill_tokens": -1}, "max_local_prefill_tokens"), ({"max_local_prefill_frac": 1.5}, "frac")],
)
def test_bad_config_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]
