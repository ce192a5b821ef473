"""Disaggregated prefill/decode: conditional-disagg policy, KV transfer channel, prefill/decode handlers."""
