"""Pick one next token per row of a logits batch, each row with its request's sampling options.

Greedy rows are one argmax (taken as `max(dim).indices`: the same first-maximum index as
`argmax`, ~10x faster on CPU, where aten's argmax over [32, 49152] fp32 took ~2.7 ms of a 50 ms
decode step); a batch of only greedy rows without bans, penalties or logprobs (the common serving
case) skips everything else: no copies, no index lists, no per-row tensors. Random rows share one
vectorized temperature / top-k / top-p pass and are drawn with the exponential-race trick (argmax
of probs / Exp(1) noise), which needs exactly one noise row per sample: a seeded request owns a
`torch.Generator` whose stream therefore depends only on how many tokens that request has drawn,
never on what it was batched with.
Logprobs are of the raw model distribution (before bans, penalties, temperature, truncation).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lightspeed.protocol import SamplingOptions, TokenLogprob, TopLogprob

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs to know about one logits row."""

    request_id: str
    options: SamplingOptions
    banned_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(slots=True)
class _RequestState:
    generator: torch.Generator | None = None
    # Counts of tokens this sampler produced for the request (presence/frequency penalties).
    counts: torch.Tensor | None = None


def is_greedy(options: SamplingOptions) -> bool:
    return options.temperature is None or options.temperature <= 1e-5


def _has_penalty(options: SamplingOptions) -> bool:
    return bool(options.presence_penalty) or bool(options.frequency_penalty)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first maximum on ties, NaN wins like argmax): `max` has a vectorized
    CPU kernel with the same tie rule, aten's `argmax` reduction does not."""
    return logits.max(dim=-1).indices


def _is_plain_greedy(row: SamplingRow) -> bool:
    """Nothing but an argmax to do for this row: no bans, penalties, state or logprobs."""
    opts = row.options
    return is_greedy(opts) and not row.banned_token_ids and not _has_penalty(opts) and opts.logprobs is None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._states: dict[str, _RequestState] = {}

    @property
    def num_tracked_requests(self) -> int:
        return len(self._states)

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget finished requests (their generators and penalty counts)."""
        for request_id in request_ids:
            self._states.pop(request_id, None)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampleResult]:
        """logits: float32 [len(rows), vocab]. Returns one result per row, in order."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} sampling rows")
        if all(_is_plain_greedy(row) for row in rows):
            return [SampleResult(tok) for tok in greedy_ids(logits).tolist()]
        logprobs = self._logprobs(logits, rows)
        work = self._adjusted(logits, rows)
        tokens = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        greedy = [i for i, row in enumerate(rows) if is_greedy(row.options)]
        random = [i for i, row in enumerate(rows) if not is_greedy(row.options)]
        if len(greedy) == len(rows):
            tokens = greedy_ids(work)
        elif greedy:
            index = torch.tensor(greedy, device=logits.device)
            tokens[index] = greedy_ids(work.index_select(0, index))
        if random:
            index = torch.tensor(random, device=logits.device)
            tokens[index] = self._sample_random(work.index_select(0, index), [rows[i] for i in random])
        token_list = tokens.tolist()
        self._record(rows, token_list)
        return [SampleResult(tok, self._token_logprob(logprobs, i, tok, rows[i])) for i, tok in enumerate(token_list)]

    # ------------------------------------------------------------ logits adjustments

    def _adjusted(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Logits with bans and penalties applied; copied only when some row changes them."""
        changed = [i for i, r in enumerate(rows) if r.banned_token_ids or _has_penalty(r.options)]
        if not changed:
            return logits
        work = logits.clone()
        for i in changed:
            row = rows[i]
            if _has_penalty(row.options):
                self._apply_penalties(work[i], row)
            if row.banned_token_ids:
                banned = torch.tensor(row.banned_token_ids, device=work.device)
                work[i].index_fill_(0, banned, float("-inf"))
        return work

    def _apply_penalties(self, row_logits: torch.Tensor, row: SamplingRow) -> None:
        state = self._states.get(row.request_id)
        if state is None or state.counts is None:
            return
        counts = state.counts.to(row_logits.dtype)
        row_logits -= (row.options.frequency_penalty or 0.0) * counts
        row_logits -= (row.options.presence_penalty or 0.0) * (counts > 0).to(row_logits.dtype)

    def _sample_random(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        temps = torch.tensor([r.options.temperature for r in rows], device=logits.device)
        scaled = logits / temps.unsqueeze(1)
        scaled = self._truncate(scaled, rows)
        probs = scaled.softmax(dim=-1)
        return greedy_ids(probs / self._exponential_noise(probs, rows))

    def _truncate(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Top-k then top-p (nucleus), on one descending sort shared by both."""
        vocab = logits.shape[1]
        top_k = [r.options.top_k if r.options.top_k and 0 < r.options.top_k < vocab else vocab for r in rows]
        top_p = [r.options.top_p if r.options.top_p is not None and r.options.top_p < 1.0 else 1.0 for r in rows]
        if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits
        ordered, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.tensor(top_k, device=logits.device).unsqueeze(1)
        ordered = ordered.masked_fill(rank >= k, float("-inf"))
        if any(p < 1.0 for p in top_p):
            probs = ordered.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above this token
            p = torch.tensor(top_p, device=logits.device, dtype=probs.dtype).unsqueeze(1)
            # Keep the smallest prefix whose mass reaches p; the top token always survives.
            ordered = ordered.masked_fill((before >= p) & (rank > 0), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(1, order, ordered)

    def _exponential_noise(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        if any(row.options.seed is None for row in rows):
            noise.exponential_()
        for i, row in enumerate(rows):
            if row.options.seed is not None:  # redraw from the request's own stream
                noise[i].exponential_(generator=self._generator(row))
        return noise.clamp_min_(1e-20)  # Exp(1) can return 0: avoid dividing by it

    def _generator(self, row: SamplingRow) -> torch.Generator:
        state = self._states.setdefault(row.request_id, _RequestState())
        if state.generator is None:
            state.generator = torch.Generator(device=self.device)
            state.generator.manual_seed(int(row.options.seed or 0))
        return state.generator

    def _record(self, rows: Sequence[SamplingRow], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if not _has_penalty(row.options):
                continue
            state = self._states.setdefault(row.request_id, _RequestState())
            if state.counts is None:
                state.counts = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
            state.counts[token] += 1

    # ------------------------------------------------------------ logprobs

    def _logprobs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> dict[int, torch.Tensor] | None:
        wanted = [i for i, r in enumerate(rows) if r.options.logprobs is not None]
        if not wanted:
            return None
        index = torch.tensor(wanted, device=logits.device)
        values = logits.index_select(0, index).log_softmax(dim=-1).cpu()
        return {row: values[j] for j, row in enumerate(wanted)}

    @staticmethod
    def _token_logprob(
        logprobs: dict[int, torch.Tensor] | None, i: int, token: int, row: SamplingRow
    ) -> TokenLogprob | None:
        if logprobs is None or i not in logprobs:
            return None
        values = logprobs[i]
        top: list[TopLogprob] = []
        num_top = row.options.logprobs or 0
        if num_top > 0:
            best, ids = values.topk(min(num_top, values.shape[0]))
            top = [TopLogprob(int(t), float(v)) for t, v in zip(ids.tolist(), best.tolist())]
        return TokenLogprob(token, float(values[token]), top)
