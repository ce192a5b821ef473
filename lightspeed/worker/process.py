"""A worker process: an engine core behind the request plane, visible through discovery.

Endpoints on the request plane:
  generate  PreprocessedRequest -> stream of LLMEngineOutput (Cancel frame aborts, freeing KV)
  kv_dump   () -> Cleared + the worker's cached blocks as KvEvents (router gap recovery)
Publishes on the event plane: `kv-events` (monotonic event ids), `load-metrics` (periodic),
`forward-pass-metrics` (every step). Stops gracefully: deregister first so no new requests
arrive, drain in-flight streams (up to `drain_timeout`; the rest are cut, and the frontend tells
their clients in-band), then stop the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

import msgspec

from lightspeed.config import WorkerConfig
from lightspeed.disagg.worker import WorkerDisagg, build_mover
from lightspeed.engine.core import EngineCore, StepInfo
from lightspeed.engine.types import EngineCoreOutput
from lightspeed.protocol import (
    TOPIC_FORWARD_PASS,
    TOPIC_KV_EVENTS,
    TOPIC_LOAD_METRICS,
    FinishReason,
    ForwardPassMetrics,
    KvCleared,
    KvEvent,
    KvEventData,
    LLMEngineOutput,
    LoadMetrics,
    PreprocessedRequest,
    WorkerCard,
    WorkerRole,
)
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.lifecycle import startup_config_errors, until_signalled
from lightspeed.runtime.planes import (
    advertise_host,
    advertised,
    cluster_key,
    discovery_from_config,
    publisher_from_config,
    warn_if_open,
)
from lightspeed.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneServer
from lightspeed.worker.factory import BuiltEngine, build_engine
from lightspeed.worker.health import HealthServer, WorkerState
from lightspeed.worker.perf_fit import PerfFitter, StepSample

log = logging.getLogger(__name__)
PERF_REFIT_S = 30.0

_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(PreprocessedRequest).decode


def to_wire(out: EngineCoreOutput) -> LLMEngineOutput:
    return LLMEngineOutput(
        token_ids=out.new_token_ids,
        finish_reason=out.finish_reason,
        num_cached_tokens=out.num_cached_tokens,
        logprobs=out.logprobs,
    )


class Worker:
    def __init__(self, cfg: WorkerConfig, discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.instance_id = f"{cfg.engine}-{uuid.uuid4().hex[:12]}"
        self.discovery = discovery if discovery is not None else discovery_from_config(cfg.planes)
        warn_if_open("request plane", cfg.host, cfg.planes)
        self.server = RequestPlaneServer(cfg.host, cfg.port, key=cluster_key(cfg.planes))
        self.publisher = publisher_from_config(cfg.planes, cfg.host, cfg.advertise_host)
        self.built: BuiltEngine | None = None
        self.card: WorkerCard | None = None
        self._event_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.perf_fitter = PerfFitter()  # engines without an exact step model publish a fitted one
        self.disagg: WorkerDisagg | None = None  # prefill / decode legs of disaggregated requests
        self.state: WorkerState = "starting"  # what the /health probe reports

    @property
    def core(self) -> EngineCore:
        assert self.built is not None, "worker not started"
        return self.built.core

    async def start(self) -> WorkerCard:
        self.built = await asyncio.to_thread(build_engine, self.cfg)
        self.core.on_kv_events = self._publish_kv_events
        self.core.on_step = self._publish_forward_pass
        self.server.register("generate", self.generate)
        self.server.register("kv_dump", self.kv_dump)
        self.disagg = WorkerDisagg(
            self.core,
            build_mover(self.cfg, self.core),
            self.instance_id,
            self.cfg.kv_transfer.timeout,
            RequestPlaneClient(key=cluster_key(self.cfg.planes)),
        )
        self.server.register("kv_release", self.disagg.kv_release)
        # Peers on other hosts dial the advertised host (the bind address may be 0.0.0.0).
        address = advertised(await self.server.start(), advertise_host(self.cfg.host, self.cfg.advertise_host))
        self._tasks = [
            asyncio.create_task(self.core.run(), name="engine-core"),
            asyncio.create_task(self._metrics_loop(), name="load-metrics"),
        ]
        if self.built.perf is None:
            self._tasks.append(asyncio.create_task(self._perf_loop(), name="perf-fit"))
        self.card = self._make_card(address)
        await self.disagg.start(self.card.address)
        await self.discovery.register(self.card)
        self.state = "ready"
        log.info(
            "worker %s serving %s at %s (%d KV blocks)",
            self.instance_id,
            self.card.model,
            address,
            self.card.total_kv_blocks,
        )
        return self.card

    def _make_card(self, address: str) -> WorkerCard:
        built, cfg = self.built, self.cfg
        assert built is not None
        return WorkerCard(
            instance_id=self.instance_id,
            model=built.served_name,
            address=address,
            role=WorkerRole(cfg.role),
            engine=cfg.engine,
            namespace=cfg.planes.namespace,
            block_size=cfg.block_size,
            total_kv_blocks=built.num_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            context_length=built.max_model_len,
            model_path=str(built.model_folder),
            events_address=self.publisher.address,
            pid=os.getpid(),
            perf=built.perf,
        )

    async def generate(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        request = _decode_request(payload)
        if request.kv_transfer_params is not None:
            async for frame in self._generate_disagg(request):
                yield frame
            return
        try:
            stream = self.core.add_request(request)
        except ValueError as err:  # the engine's own limits (prompt too long, ...): a client error
            yield _encode(LLMEngineOutput(finish_reason=FinishReason.ERROR, error=str(err)))
            return
        try:
            async for out in stream:
                yield _encode(to_wire(out))
        finally:  # cancelled by the client: abort now so the KV blocks are freed at once
            await stream.aclose()

    async def _generate_disagg(self, request: PreprocessedRequest) -> AsyncIterator[bytes]:
        """A prefill or decode leg of a disaggregated request (lightspeed/disagg/worker.py)."""
        assert self.disagg is not None
        outputs = self.disagg.generate(request)
        try:
            async for out in outputs:
                yield _encode(out)
        except ValueError as err:  # the engine's own limits, as for a whole request
            yield _encode(LLMEngineOutput(finish_reason=FinishReason.ERROR, error=str(err)))
        finally:
            await outputs.aclose()

    async def kv_dump(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """A snapshot: Cleared, then every cached block, all stamped with the current event id.

        Taken synchronously (one loop, no await in between), so it is exactly the state after
        event `event_id`; the subscriber resumes the live stream from event_id + 1. The leading
        Cleared makes the snapshot self-describing even when the cache is empty."""
        event_id = self._event_id
        snapshot: list[KvEventData] = [KvCleared(), *self.core.dump_kv_events()]
        for data in snapshot:
            yield _encode(KvEvent(self.instance_id, event_id, data))

    def _publish_kv_events(self, events: list[KvEventData]) -> None:
        for data in events:
            self._event_id += 1
            self.publisher.publish(TOPIC_KV_EVENTS, _encode(KvEvent(self.instance_id, self._event_id, data)))

    def _publish_forward_pass(self, info: StepInfo) -> None:
        msg = ForwardPassMetrics(
            self.instance_id,
            info.num_prefill_tokens,
            info.num_decode_tokens,
            info.num_seqs,
            info.step_seconds,
            info.kv_usage,
        )
        self.publisher.publish(TOPIC_FORWARD_PASS, _encode(msg))
        self.perf_fitter.add(
            StepSample(info.num_prefill_tokens, info.num_decode_tokens, info.kv_usage, info.step_seconds)
        )

    async def _perf_loop(self) -> None:
        """Re-publish the card with a step-time model fitted from measured steps. A fit the
        fitter does not trust returns the last trusted one (None before any): nothing new."""
        while True:
            await asyncio.sleep(PERF_REFIT_S)
            # Snapshot here, where steps are added; the fit (~0.1 s on 2000 steps) runs off the loop.
            perf = await asyncio.to_thread(self.perf_fitter.fit, self.perf_fitter.snapshot())
            if perf is not None and self.card is not None and perf != self.card.perf:
                self.card = msgspec.structs.replace(self.card, perf=perf)
                await self.discovery.register(self.card)
                log.info(
                    "worker %s step model: prefill %s ms, decode %s ms",
                    self.instance_id,
                    perf.prefill_coeffs,
                    perf.decode_coeffs,
                )

    async def _metrics_loop(self) -> None:
        while True:
            s, clock = self.core.stats(), self.core.clock.reading()
            msg = LoadMetrics(
                self.instance_id,
                s.num_running,
                s.num_waiting,
                s.active_blocks,
                s.total_blocks,
                s.cached_blocks,
                s.prefix_hit_rate,
                time.time(),
                step_wall_seconds=clock.wall_seconds,
                step_modelled_seconds=clock.modelled_seconds,
                step_lag_seconds=clock.lag_seconds,
                step_lag_max_seconds=self.core.clock.take_max_lag(),
                num_preemptions=s.num_preemptions,
            )
            self.publisher.publish(TOPIC_LOAD_METRICS, _encode(msg))
            await asyncio.sleep(self.cfg.metrics_interval)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.state = "draining"
        if self.card is not None:
            await self.discovery.deregister(self.instance_id)
        await self.server.stop(drain_timeout)
        if self.disagg is not None:
            await self.disagg.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.publisher.close()
        await self.discovery.close()
        if self.built is not None:
            self.built.close()


async def run_worker(cfg: WorkerConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain and exit."""
    with startup_config_errors():
        worker = Worker(cfg)
        # Probes first: the pod is live (not restarted) while a large model loads.
        probes = HealthServer(cfg.host, cfg.health_port, lambda: worker.state) if cfg.health_port else None
        if probes is not None:
            await probes.start()
        await worker.start()
    await until_signalled()
    log.info("worker %s draining (up to %.1fs)", worker.instance_id, cfg.drain_timeout)
    await worker.stop(cfg.drain_timeout)
    if probes is not None:
        await probes.stop()
