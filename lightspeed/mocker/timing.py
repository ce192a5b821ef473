"""The mocker's performance model: how long a simulated engine step takes.

The polynomial itself is `PerfModel` (lightspeed/protocol.py), shared with the router and the
planner; the mocker runs Dynamo's fit (`PerfModel.dynamo_default`, milliseconds):
    prefill(t) = 4.209989e-7 * t^2 + 1.518344e-2 * t + 16.50142   (t: uncached prompt tokens)
    decode(p)  = max(1, -25.74 * p^2 + 54.01 * p + 5.74)           (p: active KV blocks / total)
and every time is divided by `speedup_ratio`. This module adds how the mocker spends it.

How Dynamo's mocker combines them (ai-dynamo/dynamo, lib/mocker: the vLLM-style scheduler): a
forward pass runs a prefill phase and then a decode phase and sleeps for each in turn, so a step
lasts prefill + decode. The prefill phase is charged only when prefill work was scheduled
(uncached tokens > 0). The decode phase is charged only when some sequence is ready to emit a
token; a request whose prefill completes in this pass is such a sequence, while a pass holding
only non-final prefill chunks pays no decode. Each phase sleeps until its start + modelled time,
so bookkeeping inside a phase is part of it. The decode phase emits its tokens when it *starts*
and sleeps afterwards: a first token arrives when the prefill phase ends (TTFT = queueing +
prefill, measured on Dynamo 1.6.1: one isolated request of 64 / 1,000 / 4,000 tokens gets its
first token after 19.8 / 34.6 / 87.5 ms, against prefill(t) = 17.5 / 32.1 / 84.0 ms), and the
next step starts when the decode sleep ends, so inter-token gaps still equal the decode time.
`phase_seconds` gives both phases; the executor emits between them. Dynamo's decode floor of
1 ms keeps token-emitting steps from collapsing onto the same timestamp. Two deliberate differences: (a) older Dynamo
evaluates the prefill polynomial per request and sums, paying the 16.5 ms constant once per
prefilling request; we evaluate it once on the step's total uncached tokens, as DESIGN §5 states
and as a batched forward pass behaves; (b) older Dynamo feeds the decode polynomial active KV
*tokens* / 16384 (a constant, not the cache size); we use active blocks / total blocks as DESIGN
§5 states, so p stays a true utilisation in [0, 1] whatever the cache size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightspeed.protocol import PerfModel


@dataclass(frozen=True, slots=True)
class MockerTiming:
    """Step-time model scaled by `speedup_ratio` (2.0 = twice as fast as the fitted GPU)."""

    speedup_ratio: float = 1.0
    # What the mocker sleeps by, speedup included; its worker card publishes exactly this.
    perf: PerfModel = field(init=False)

    def __post_init__(self) -> None:
        if not self.speedup_ratio > 0:
            raise ValueError(f"speedup_ratio must be > 0, got {self.speedup_ratio}")
        object.__setattr__(self, "perf", PerfModel.dynamo_default(self.speedup_ratio))

    def step_ms_unscaled(self, num_prefill_tokens: int, kv_usage: float, has_decode: bool) -> float:
        """Prefill phase then decode phase, as in Dynamo's mocker (see module docstring)."""
        return self.perf.step_ms(num_prefill_tokens, kv_usage, has_decode)

    def step_seconds(self, num_prefill_tokens: int, kv_usage: float, has_decode: bool) -> float:
        """Wall seconds the simulated step lasts."""
        return self.perf.wall_seconds(self.step_ms_unscaled(num_prefill_tokens, kv_usage, has_decode))

    def phase_seconds(self, num_prefill_tokens: int, kv_usage: float, has_decode: bool) -> tuple[float, float]:
        """(prefill phase, decode phase) wall seconds; tokens are emitted between the two."""
        perf = self.perf
        scale = 1000.0 * self.speedup_ratio  # one division per phase (equal to wall_seconds to an ulp)
        decode = perf.decode_ms(kv_usage) / scale if has_decode else 0.0
        return perf.prefill_ms(num_prefill_tokens) / scale, decode
