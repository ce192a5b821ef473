"""Request specs and the synthetic workload generator.

A workload is a sized, re-iterable source of `RequestSpec`s. Prompts are built lazily while
iterating, because a long trace materialised up front (thousands of 15k-token prompts as
Python ints) would need gigabytes; the runner pulls specs only as it sends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_VOCAB_SIZE = 49152
# Low ids hold special tokens (bos/eos/pad/chat markers) in most vocabularies; a prompt that
# contains them could end generation early or trip chat-template checks on the server.
DEFAULT_MIN_TOKEN_ID = 100


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: a token-id or text prompt and how much to generate."""

    prompt: tuple[int, ...] | str
    max_tokens: int
    ignore_eos: bool = True
    arrival_s: float = 0.0  # offset from the start of the run (open loop only)
    session_id: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens}")
        if self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0; got {self.arrival_s}")

    @property
    def prompt_len(self) -> int | None:
        """Token count of a token-id prompt; None for text (only the server knows)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


class Workload(Protocol):
    """A re-iterable request source; `size` is None when it is unbounded."""

    def __iter__(self) -> Iterator[RequestSpec]: ...

    @property
    def size(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class TokenSpace:
    """The range prompt token ids are drawn from: [min_token_id, vocab_size)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    min_token_id: int = DEFAULT_MIN_TOKEN_ID

    def __post_init__(self) -> None:
        if not 0 <= self.min_token_id < self.vocab_size:
            raise ValueError(f"need 0 <= min_token_id < vocab_size; got {self.min_token_id}, {self.vocab_size}")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.min_token_id, self.vocab_size, size=n, dtype=np.int64)


DEFAULT_TOKENS = TokenSpace()


@dataclass(frozen=True, slots=True)
class SyntheticWorkload:
    """Random token-id prompts of `isl` tokens, the first `shared_prefix_ratio` of them common
    to every request (so prefix caching can be measured), asking for `osl` tokens each.

    `count` None means unbounded (a duration-limited closed loop). `request_rate` > 0 gives
    Poisson arrival offsets for open-loop runs. Same seed, same prompts and arrivals.
    """

    isl: int
    osl: int
    count: int | None
    shared_prefix_ratio: float = 0.0
    request_rate: float = 0.0
    seed: int = 0
    tokens: TokenSpace = DEFAULT_TOKENS

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"isl and osl must be >= 1; got {self.isl}, {self.osl}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0; got {self.count}")
        if not 0.0 <= self.shared_prefix_ratio <= 1.0:
            raise ValueError(f"shared_prefix_ratio must be in [0, 1]; got {self.shared_prefix_ratio}")
        if self.request_rate < 0:
            raise ValueError(f"request_rate must be >= 0; got {self.request_rate}")

    @property
    def size(self) -> int | None:
        return self.count

    @property
    def prefix_len(self) -> int:
        return round(self.isl * self.shared_prefix_ratio)

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = np.random.default_rng(self.seed)
        prefix = self.tokens.draw(rng, self.prefix_len)
        suffix_len = self.isl - self.prefix_len
        arrival = 0.0
        index = 0
        while self.count is None or index < self.count:
            prompt = np.concatenate((prefix, self.tokens.draw(rng, suffix_len)))
            yield RequestSpec(tuple(prompt.tolist()), self.osl, True, arrival)
            if self.request_rate > 0:
                arrival += float(rng.exponential(1.0 / self.request_rate))
            index += 1
