"""Lightspeed: LLM inference serving framework."""
