"""Attention metadata for one step's flat batch: positions, cache slots, attention groups.

The ordering contract between the model runner and this builder lives here, in one place:
`batch_order_key` sorts a step's sequences into
  1. decodes (one new token each)       -> one unpadded group (the paged kernel on CPU),
  2. continuing chunks / cached-prefix prompts -> one padded group that gathers its context,
  3. fresh prompts (position 0, several tokens) -> causal attention over their own new K/V.
`build_attention_metadata` expects that order (any order is correct, but only that order gets at
most three groups); the runner sorts with `batch_order_key` before calling it and restores the
caller's view through the sequences it keeps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def batch_order_key(num_new_tokens: int, start_pos: int) -> tuple[bool, bool]:
    """Sort key of a sequence in a step: decodes first, fresh prompts last (see module doc)."""
    return (num_new_tokens != 1, start_pos == 0)


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """What the metadata builder needs to know about the KV cache."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype  # of the attention mask: the model's compute dtype
    # Decode groups carry int32 block tables + context lengths for the paged kernel instead of
    # a gather index and a mask.
    paged_decode: bool = False


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Sequences sharing one SDPA call: tokens [token_start, token_end) of the flat batch."""

    token_start: int
    token_end: int
    num_seqs: int
    # Rows of the cache viewed as [2 * num_blocks, ...]: every sequence's K blocks (block table
    # padded with block 0, masked out), then the same for V, so one index op gathers both.
    # None for a paged-kernel decode group, which reads the blocks in place.
    kv_index: torch.Tensor | None  # [2 * num_seqs * max_blocks] int64
    # Additive float [B, 1, max_query_len, max_blocks * block_size]; None for a single sequence
    # starting at position 0, where plain causal attention over its own tokens is exact.
    attn_mask: torch.Tensor | None
    max_query_len: int
    # None when no query padding is needed (one sequence, or one token per sequence).
    pad_index: torch.Tensor | None = None  # [B * max_query_len] group token index per padded row
    unpad_index: torch.Tensor | None = None  # [token_end - token_start] padded row per token
    # Paged-kernel decode group only (else None).
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor | None = None  # [B] int32
    # Fresh-prompt group only (else None): (token lo, token hi, prompts) of each run of adjacent
    # equal-length prompts within the group, one batched SDPA call each. They start at position
    # 0, so causal attention over their own new K/V is exact: no gather, no mask, no padding.
    fresh_runs: tuple[tuple[int, int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    groups: tuple[AttentionGroup, ...]


def _padded_tables(tables: Sequence[Sequence[int]], num_blocks: int, dtype: type = np.int64) -> np.ndarray:
    out: np.ndarray = np.zeros((len(tables), max(num_blocks, 1)), dtype=dtype)
    for row, table in enumerate(tables):
        used = min(len(table), num_blocks)
        out[row, :used] = table[:used]
    return out


def _attn_mask(
    starts: np.ndarray, qlens: np.ndarray, ctx: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [B, 1, max_q, ctx]: causal within the chunk and cut at the context length.
    Padded query rows repeat the last real row so no row is fully masked (which would NaN)."""
    max_q = int(qlens.max())
    rows = np.minimum(np.arange(max_q)[None, :], qlens[:, None] - 1)  # [B, max_q]
    last_key = torch.from_numpy(starts[:, None] + rows).to(device)
    allowed = torch.arange(ctx, device=device)[None, None, :] <= last_key[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -math.inf)
    return mask.unsqueeze(1)  # broadcast over heads


def _paged_decode_group(
    token_start: int, ctx_lens: np.ndarray, num_blocks: int, tables: Sequence[Sequence[int]], device: torch.device
) -> AttentionGroup:
    """What the paged kernel reads: the block tables and context lengths, nothing else."""
    padded = torch.from_numpy(_padded_tables(tables, num_blocks, np.int32)).to(device)
    lens = torch.from_numpy(ctx_lens.astype(np.int32)).to(device)
    return AttentionGroup(
        token_start, token_start + len(ctx_lens), len(ctx_lens), None, None, 1, block_tables=padded, context_lens=lens
    )


def _fresh_group(token_start: int, qlens: np.ndarray) -> AttentionGroup:
    runs = _equal_length_runs(qlens)
    return AttentionGroup(
        token_start, token_start + runs[-1][1], len(qlens), None, None, int(qlens.max()), fresh_runs=tuple(runs)
    )


def _equal_length_runs(qlens: np.ndarray) -> list[tuple[int, int, int]]:
    """(token lo, token hi, prompts) of each maximal run of adjacent equal-length prompts."""
    runs: list[tuple[int, int, int]] = []
    lo = 0
    for length, members in itertools.groupby(qlens.tolist()):
        count = len(list(members))
        runs.append((lo, lo + length * count, count))
        lo += length * count
    return runs


def _group_bounds(qlens: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, bool]]:
    """(lo, hi, fresh) runs of sequences: the leading single-token run, the trailing run of
    fresh prompts (position 0, several tokens), and whatever lies between."""
    n = len(qlens)
    num_decode = int(np.argmax(qlens != 1)) if (qlens != 1).any() else n
    first_fresh = n
    while first_fresh > num_decode and starts[first_fresh - 1] == 0:
        first_fresh -= 1
    runs = [(0, num_decode, False), (num_decode, first_fresh, False), (first_fresh, n, True)]
    return [run for run in runs if run[1] > run[0]]


def _build_group(
    token_start: int,
    starts: np.ndarray,
    qlens: np.ndarray,
    tables: Sequence[Sequence[int]],
    layout: CacheLayout,
    device: torch.device,
) -> AttentionGroup:
    ctx_lens = starts + qlens
    num_blocks = -(-int(ctx_lens.max()) // layout.block_size)
    if layout.paged_decode and int(qlens.max()) == 1:
        return _paged_decode_group(token_start, ctx_lens, num_blocks, tables, device)
    padded = _padded_tables(tables, num_blocks).reshape(-1)
    kv_index = torch.from_numpy(np.concatenate((padded, padded + layout.num_blocks))).to(device)
    max_q = int(qlens.max())
    mask = _attn_mask(starts, qlens, num_blocks * layout.block_size, layout.dtype, device)
    group = AttentionGroup(token_start, token_start + int(qlens.sum()), len(qlens), kv_index, mask, max_q)
    if max_q == 1 or len(qlens) == 1:
        return group
    qstart = np.concatenate(([0], np.cumsum(qlens)[:-1]))
    col = np.minimum(np.arange(max_q)[None, :], qlens[:, None] - 1)
    pad = (qstart[:, None] + col).reshape(-1)
    seq_of_token = np.repeat(np.arange(len(qlens)), qlens)
    unpad = seq_of_token * max_q + (np.arange(int(qlens.sum())) - np.repeat(qstart, qlens))
    return dataclasses.replace(
        group, pad_index=torch.from_numpy(pad).to(device), unpad_index=torch.from_numpy(unpad).to(device)
    )


def _positions_and_slots(
    starts: np.ndarray, qlens: np.ndarray, tables: Sequence[Sequence[int]], block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    ctx_lens = starts + qlens
    for table, ctx in zip(tables, ctx_lens):
        if len(table) * block_size < ctx:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
    padded = _padded_tables(tables, max(len(t) for t in tables))
    seq = np.repeat(np.arange(len(qlens)), qlens)
    qstart = np.concatenate(([0], np.cumsum(qlens)[:-1]))
    positions = np.arange(int(qlens.sum())) - np.repeat(qstart, qlens) + np.repeat(starts, qlens)
    slots = padded[seq, positions // block_size] * block_size + positions % block_size
    return positions, slots


def build_attention_metadata(
    query_lens: Sequence[int],
    start_positions: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    layout: CacheLayout,
    device: torch.device,
) -> AttentionMetadata:
    """Describe one step's flat batch. Sequence i contributes query_lens[i] tokens at positions
    start_positions[i].. and owns block_tables[i]. Put single-token sequences first: that
    leading run becomes the unpadded decode group; and fresh prompts (position 0) last: that
    trailing run attends causally over its own tokens, without reading the cache."""
    qlens = np.asarray(query_lens, dtype=np.int64)
    starts = np.asarray(start_positions, dtype=np.int64)
    if len(qlens) == 0 or qlens.min() < 1 or starts.min() < 0:
        raise ValueError("need at least one sequence, each with >= 1 token at a position >= 0")
    positions, slots = _positions_and_slots(starts, qlens, block_tables, layout.block_size)
    groups = []
    for lo, hi, fresh in _group_bounds(qlens, starts):
        token_start = int(qlens[:lo].sum())
        groups.append(
            _fresh_group(token_start, qlens[lo:hi])
            if fresh
            else _build_group(token_start, starts[lo:hi], qlens[lo:hi], block_tables[lo:hi], layout, device)
        )
    return AttentionMetadata(torch.from_numpy(positions).to(device), torch.from_numpy(slots).to(device), tuple(groups))
