"""SLA planner (DESIGN §7): load predictors and the pure replica arithmetic.

`predictors` forecasts the next adjustment interval's load from past observations; `arithmetic`
turns a forecast into prefill / decode replica counts against the fitted step-time model
(`lightspeed.protocol.PerfModel`), clamped to a worker budget. Both are pure: no I/O, no clocks.
"""
