"""Prometheus metrics of pushes and versions (the optional ``metrics`` extra: prometheus-client).

``BucketSender(..., metrics=True)`` and ``ReceiverDaemon(..., metrics=True)`` record into the
process's default registry (``prometheus_client.REGISTRY``), which a host that already exposes
metrics serves with the rest; ``metrics=registry`` records into a ``CollectorRegistry`` of the
host's own. :func:`serve_metrics` starts a small HTTP endpoint for a process that has none.
Every sender and daemon of a process that names one registry shares its metrics (a ``side`` and
a ``rank`` label tell them apart); label values are bounded: outcomes, error type names and ranks.

| metric | labels | what |
| --- | --- | --- |
| ``weightstream_push_seconds`` | outcome | a push, end to end (histogram); outcome: committed, rejected, failed |
| ``weightstream_push_bytes_total`` | outcome | payload bytes of pushes (none for a rejected one) |
| ``weightstream_versions_total`` | side, outcome, reason | versions by how they ended; reason: the error type |
| ``weightstream_apply_seconds`` | side, rank | a rank's BEGIN to PREPARED: receiving, verifying, applying |
| ``weightstream_model_change_seconds`` | side, rank | a rank's first write into its served model to the commit (staged: the swap) |
| ``weightstream_heartbeat_misses_total`` | side, rank | a peer dropped for silence (sender: that rank; rank: its sender) |
| ``weightstream_slot_wait_seconds_total`` | | the sender's packer waiting for a slot the ranks had not acked yet |
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .protocol.errors import ConfigError

__all__ = ["Metrics", "metrics_for", "serve_metrics"]

# 1 ms to 10 min: a 100-tensor push on one host up to a large model over a slow network
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_lock = threading.Lock()
_by_registry: dict[int, tuple[Any, Metrics]] = {}  # id(registry) -> (the registry, kept alive; its metrics)


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "metrics= needs the prometheus-client package, which is not installed; fix: "
            "pip install 'weightstream[metrics]' (or prometheus-client), or leave metrics= out"
        ) from exc
    return prometheus_client


@dataclass(frozen=True)
class Metrics:
    """The weightstream metrics of one registry."""

    push_seconds: Any
    push_bytes: Any
    versions: Any
    apply_seconds: Any
    model_change_seconds: Any
    heartbeat_misses: Any
    slot_wait_seconds: Any

    @classmethod
    def create(cls, registry: Any) -> Metrics:
        pc = _client()
        return cls(
            push_seconds=pc.Histogram(
                "weightstream_push_seconds", "A push, from its BEGIN to every rank's commit or the failure",
                ["outcome"], registry=registry, buckets=_SECONDS,
            ),
            push_bytes=pc.Counter(
                "weightstream_push_bytes", "Payload bytes of pushes, by outcome", ["outcome"], registry=registry,
            ),
            versions=pc.Counter(
                "weightstream_versions", "Versions by how they ended (reason: the error type; empty when committed)",
                ["side", "outcome", "reason"], registry=registry,
            ),
            apply_seconds=pc.Histogram(
                "weightstream_apply_seconds", "A rank's BEGIN to PREPARED: receiving, verifying and applying a version",
                ["side", "rank"], registry=registry, buckets=_SECONDS,
            ),
            model_change_seconds=pc.Histogram(
                "weightstream_model_change_seconds",
                "How long a rank's served model was being changed: its first write to the commit (staged: the swap)",
                ["side", "rank"], registry=registry, buckets=_SECONDS,
            ),
            heartbeat_misses=pc.Counter(
                "weightstream_heartbeat_misses", "Peers dropped for silence (sender: that rank; rank: its sender)",
                ["side", "rank"], registry=registry,
            ),
            slot_wait_seconds=pc.Counter(
                "weightstream_slot_wait_seconds", "The sender waiting for a bucket slot that ranks had not acked yet",
                registry=registry,
            ),
        )

    # --- what the sender and the daemon record ---------------------------------------------

    def version_ended(self, side: str, outcome: str, reason: str | None) -> None:
        self.versions.labels(side, outcome, reason or "").inc()

    def rank_timings(self, side: str, rank: int, apply_seconds: float | None, change_seconds: float | None) -> None:
        if apply_seconds is not None:
            self.apply_seconds.labels(side, str(rank)).observe(apply_seconds)
        if change_seconds is not None:
            self.model_change_seconds.labels(side, str(rank)).observe(change_seconds)

    def push(self, outcome: str, seconds: float, nbytes: int) -> None:
        self.push_seconds.labels(outcome).observe(seconds)
        self.push_bytes.labels(outcome).inc(nbytes)

    def heartbeat_missed(self, side: str, rank: int) -> None:
        self.heartbeat_misses.labels(side, str(rank)).inc()

    def slot_waited(self, seconds: float) -> None:
        if seconds > 0:
            self.slot_wait_seconds.inc(seconds)


def metrics_for(metrics: object, who: str) -> Metrics | None:
    """What ``metrics=`` names: None/False (none), True (the default registry) or a registry."""
    if metrics is None or metrics is False:
        return None
    pc = _client()
    if metrics is True:
        registry = pc.REGISTRY
    elif isinstance(metrics, pc.CollectorRegistry):
        registry = metrics
    else:
        raise ConfigError(
            f"{who}(metrics=...): expected True (the default prometheus registry), a "
            f"prometheus_client.CollectorRegistry or None, got {type(metrics).__name__}; fix: metrics=True, or "
            "metrics=registry for the registry your process already exposes"
        )
    with _lock:
        held = _by_registry.get(id(registry))
        if held is None or held[0] is not registry:
            try:
                held = (registry, Metrics.create(registry))
            except ValueError as exc:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
                raise ConfigError(
                    f"{who}(metrics=...): the registry already has a metric of the same name ({exc}), registered by "
                    "something other than weightstream; fix: give weightstream a CollectorRegistry of its own"
                ) from exc
            _by_registry[id(registry)] = held
        return held[1]


def serve_metrics(port: int, addr: str = "127.0.0.1", registry: object = None) -> Any:
    """Serve the metrics over HTTP at ``http://addr:port/metrics`` from a daemon thread (for a
    process that exposes none yet); returns the server (``server.shutdown()`` stops it).
    ``registry``: default ``prometheus_client.REGISTRY``. Binds localhost unless told otherwise:
    the metrics name versions and ranks."""
    pc = _client()
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"serve_metrics(port=...): expected an int 0..65535 (0: any free port), got {port!r}")
    server, _thread = pc.start_http_server(port, addr=addr, registry=pc.REGISTRY if registry is None else registry)
    return server
