"""Attention metadata: positions, slots and groups of a step's flat batch, and the batch order
the runner must follow (decodes, continuing chunks, fresh prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightspeed.models.attention_metadata import (
    AttentionMetadata,
    CacheLayout,
    _equal_length_runs,
    batch_order_key,
    build_attention_metadata,
)

CPU = torch.device("cpu")


def test_metadata_layout() -> None:
    layout = CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32)
    # Two decodes (positions 5 and 0), then a 3-token chunk at positions 6..8.
    meta = build_attention_metadata([1, 1, 3], [5, 0, 6], [[7, 2], [4], [9, 3, 1]], layout, CPU)
    assert isinstance(meta, AttentionMetadata)
    assert meta.positions.tolist() == [5, 0, 6, 7, 8]
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 4 * 4 + 0, 3 * 4 + 2, 3 * 4 + 3, 1 * 4 + 0]
    decode, prefill = meta.groups
    assert (decode.token_start, decode.token_end, decode.num_seqs) == (0, 2, 2)
    assert decode.kv_index.tolist() == [7, 2, 4, 0, 17, 12, 14, 10]  # K rows, then V rows (+10)
    assert decode.pad_index is None and decode.max_query_len == 1
    allowed = (decode.attn_mask == 0).view(2, 8).tolist()
    assert allowed == [[True] * 6 + [False] * 2, [True] + [False] * 7]
    assert (prefill.token_start, prefill.token_end, prefill.max_query_len) == (2, 5, 3)
    assert prefill.kv_index.tolist() == [9, 3, 1, 19, 13, 11]
    assert prefill.pad_index is None and prefill.unpad_index is None  # one sequence: no padding
    rows = (prefill.attn_mask == 0).view(3, 12)
    assert rows.sum(-1).tolist() == [7, 8, 9]  # causal: key positions 0..6, 0..7, 0..8


def test_metadata_padding_and_fresh_prompt() -> None:
    layout = CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32)
    # A fresh 2-token prompt and a 3-token chunk at positions 4..6: padded to 3 query rows.
    (group,) = build_attention_metadata([2, 3], [0, 4], [[1], [2, 3]], layout, CPU).groups
    assert group.kv_index.tolist() == [1, 0, 2, 3, 11, 10, 12, 13]
    assert group.pad_index.tolist() == [0, 1, 1, 2, 3, 4]  # seq 0 repeats its last token
    assert group.unpad_index.tolist() == [0, 1, 3, 4, 5]
    assert (group.attn_mask == 0).view(2, 3, 8).sum(-1).tolist() == [[1, 2, 2], [5, 6, 7]]
    (fresh,) = build_attention_metadata([5], [0], [[0, 1]], layout, CPU).groups
    assert fresh.attn_mask is None and fresh.pad_index is None  # plain causal attention
    assert fresh.kv_index is None and fresh.fresh_runs == ((0, 5, 1),)  # no cache read


def test_metadata_three_groups() -> None:
    """Decodes lead, fresh prompts trail, a continuing chunk sits between: three groups."""
    layout = CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32)
    meta = build_attention_metadata([1, 3, 2, 4], [5, 4, 0, 0], [[7, 2], [2, 3], [1], [5]], layout, CPU)
    decode, middle, fresh = meta.groups
    assert (decode.token_start, decode.token_end, decode.fresh_runs) == (0, 1, None)
    assert (middle.token_start, middle.token_end, middle.num_seqs) == (1, 4, 1)
    assert middle.kv_index.tolist() == [2, 3, 12, 13] and middle.attn_mask is not None
    assert (fresh.token_start, fresh.token_end, fresh.num_seqs) == (4, 10, 2)
    assert fresh.fresh_runs == ((0, 2, 1), (2, 6, 1)) and fresh.kv_index is None
    # A fresh prompt before a continuing chunk stays in the gathered group.
    (only,) = build_attention_metadata([2, 3], [0, 4], [[1], [2, 3]], layout, CPU).groups
    assert only.fresh_runs is None and only.num_seqs == 2


def test_metadata_rejects_short_block_table() -> None:
    layout = CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        build_attention_metadata([3], [6], [[0, 1]], layout, CPU)


def test_equal_length_runs() -> None:
    qlens = np.array([4, 4, 4, 2, 2, 3])
    assert _equal_length_runs(qlens) == [(0, 12, 3), (12, 16, 2), (16, 19, 1)]
    assert _equal_length_runs(np.array([5])) == [(0, 5, 1)]


def test_batch_order_key_puts_decodes_first_and_fresh_prompts_last() -> None:
    # (new tokens, start position) of: a fresh prompt, a decode, a continuing chunk, a decode
    seqs = [(5, 0), (1, 9), (3, 4), (1, 2)]
    ordered = sorted(seqs, key=lambda s: batch_order_key(*s))
    assert ordered == [(1, 9), (1, 2), (3, 4), (5, 0)]
    starts = [s[1] for s in ordered]
    tables = [[0, 1, 2], [3], [4, 5], [6, 7]]
    meta = build_attention_metadata(
        [s[0] for s in ordered], starts, tables, CacheLayout(num_blocks=10, block_size=4, dtype=torch.float32), CPU
    )
    assert [(g.token_start, g.token_end, g.num_seqs) for g in meta.groups] == [(0, 2, 2), (2, 5, 1), (5, 10, 1)]
