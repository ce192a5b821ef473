"""Build the selector a router mode names, from the frontend's `RouterConfig`."""

from __future__ import annotations

from lightspeed.config import KV_ROUTER_MODES, RouterConfig
from lightspeed.router.active import ActiveLoad
from lightspeed.router.admission import AdmissionConfig
from lightspeed.router.cost import KvCostConfig
from lightspeed.router.kv_router import KvRouterConfig, KvSelector
from lightspeed.router.metrics import RouterMetrics
from lightspeed.router.selector import WorkerSelector, make_selector

# Modes whose decisions read the active load, so replicas must share it.
STATEFUL_MODES = ("least-loaded", "power-of-two", *KV_ROUTER_MODES)


def kv_router_config(mode: str, r: RouterConfig) -> KvRouterConfig:
    policy = "latency" if mode == "kv-latency" else "blocks"
    return KvRouterConfig(
        cost=KvCostConfig(r.overlap_score_weight, r.temperature, policy),
        use_kv_events=r.kv_events,
        approx_ttl=r.approx_ttl,
        busy_decode_threshold=r.busy_decode_threshold or None,
        busy_prefill_frac=r.busy_prefill_frac or None,
        admission=AdmissionConfig(r.queue_policy, r.max_queue, r.queue_timeout),
    )


def build_selector(
    mode: str, r: RouterConfig, active: ActiveLoad, metrics: RouterMetrics | None = None
) -> WorkerSelector:
    if mode in KV_ROUTER_MODES:
        return KvSelector(active, kv_router_config(mode, r), metrics)
    return make_selector(mode, active)
