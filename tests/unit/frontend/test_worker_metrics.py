"""Worker load snapshots become per-worker gauges on the frontend's /metrics, step clock included."""

from prometheus_client import CollectorRegistry, generate_latest

from lightspeed.frontend.worker_metrics import WorkerMetricsWatcher
from lightspeed.protocol import LoadMetrics, WorkerCard, WorkerRole


class FakeSubscriber:
    def __init__(self) -> None:
        self.connected: list[str] = []

    def connect(self, address: str) -> None:
        self.connected.append(address)

    def disconnect(self, address: str) -> None:
        self.connected.remove(address)

    def close(self) -> None:
        pass


def card(worker: str) -> WorkerCard:
    return WorkerCard(
        instance_id=worker,
        model="m",
        address="tcp://127.0.0.1:1",
        role=WorkerRole.AGG,
        engine="mocker",
        namespace="ns",
        block_size=16,
        total_kv_blocks=100,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        context_length=128,
        events_address=f"tcp://127.0.0.1:2/{worker}",
    )


def test_step_clock_gauges_follow_the_latest_snapshot_and_leave_with_the_worker() -> None:
    registry = CollectorRegistry()
    watcher = WorkerMetricsWatcher(FakeSubscriber(), registry)  # type: ignore[arg-type]  # duck-typed fake
    watcher.worker_added(card("w1"))
    snapshot = LoadMetrics("w1", 2, 1, 30, 100, 5, 0.5, 1.0, 12.5, 10.0, 0.25, 1.5, 3)
    watcher.handle(snapshot)
    text = generate_latest(registry).decode()
    assert 'lightspeed_worker_step_wall_seconds{worker="w1"} 12.5' in text
    assert 'lightspeed_worker_step_modelled_seconds{worker="w1"} 10.0' in text
    assert 'lightspeed_worker_step_lag_seconds{worker="w1"} 0.25' in text
    assert 'lightspeed_worker_step_lag_max_seconds{worker="w1"} 1.5' in text
    assert 'lightspeed_worker_preemptions{worker="w1"} 3.0' in text
    watcher.worker_removed("w1")
    assert 'worker="w1"' not in generate_latest(registry).decode()
