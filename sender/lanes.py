"""Which transport serves each rank, and the sender's slots of each transport (a *lane*).

A sender with one named transport has one lane. ``transport="auto"`` picks per rank at its
HELLO (:func:`choose_auto`, pure, by capabilities): a rank on the sender's host gets a same-host
transport (shared memory), a rank on another host a collective when it offers one (gloo: it has
torch and insecure=True), else one that receives over the network (tcp). Every lane of a push
takes the same buckets in the same slot indices, and the push commits once, on every rank.

Decided per rank, not per push: a remote rank without torch gets tcp while the others keep
their group. ``auto`` moves host memory; GPU tensors take ``cuda_ipc``/``nccl`` by name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from ..protocol.errors import ConfigError, TransportError
from ..protocol.transports import (
    Capabilities,
    ExportContext,
    Exported,
    Transport,
    get_transport,
    refusal,
    security_refusal,
)

AUTO = "auto"


@dataclass
class Lane:
    transport: Transport
    exported: Exported


def auto_preference(caps: Capabilities, same_host: bool) -> int | None:
    """How ``auto`` ranks a transport for a rank on the sender's host or another (lower first); None:
    not for it. On one host, shared memory first; across hosts a collective (one broadcast feeds
    every rank), then a transport that receives over the network; never device memory (by name)."""
    if caps.device != "host" or (caps.same_host and not same_host):
        return None
    if caps.same_host:
        return 0
    return 1 + (not caps.collective) + (not caps.receives)


def choose_auto(
    rank: int, offered: Sequence[str], same_host: bool, capabilities: Callable[[str], Capabilities | None]
) -> tuple[str | None, str]:
    """``auto``'s transport for one rank: of what the rank offers and this sender can use
    (``capabilities`` is None for one it cannot), the one :func:`auto_preference` ranks first;
    else (None, why)."""
    ranked = []
    for i, name in enumerate(offered):
        caps = capabilities(name)
        score = auto_preference(caps, same_host) if caps is not None else None
        if score is not None:
            ranked.append((score, i, name))
    if ranked:
        return min(ranked)[2], ""
    where = "this sender's host" if same_host else "another host"
    return None, (
        f"rank {rank} runs on {where} and offers {list(offered)}, none of which transport='auto' can use for it "
        "here; fix: on another host, give both sides CURVE keys (or insecure=True) for the tcp data socket, or "
        "torch and insecure=True for a gloo group; on this host, shared memory"
    )


def data_host_port(data_address: str | None, endpoint: str) -> tuple[str, int]:
    """Where data sockets and stores bind: ``data_address`` ("host" or "host:port"), by default the
    control endpoint's host for a tcp endpoint, else 127.0.0.1."""
    if data_address is None:
        if endpoint.startswith("tcp://"):
            host = urlsplit(endpoint).hostname or "127.0.0.1"
            return ("0.0.0.0" if host == "*" else host), 0
        return "127.0.0.1", 0
    if not isinstance(data_address, str) or not data_address or "/" in data_address:
        raise ConfigError(
            f"data_address={data_address!r}: expected 'host' or 'host:port' (an address of this host the ranks can "
            "reach, e.g. '10.0.0.5' or '10.0.0.5:29600')"
        )
    host, _, port = data_address.partition(":")
    if port and (not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
        raise ConfigError(f"data_address={data_address!r}: expected a port in 1..65535 after ':', got {port!r}")
    return host or "0.0.0.0", int(port) if port else 0


class Lanes:
    """The sender's lanes by transport name, and each rank's lane; made lazily for ``auto``
    (a lane's slots exist only once a rank needs them). Thread-safe: HELLOs are answered on the
    publisher's thread while a push reads the lanes."""

    def __init__(self, transport: str, count: int, size: int, context: ExportContext) -> None:
        self.auto = transport == AUTO
        self._count = count
        self._size = size
        self.context = context
        self._lock = threading.Lock()
        self._lanes: dict[str, Lane] = {}
        self._of_rank: dict[int, str] = {}
        self._port_taken = False  # data_address's port goes to the first network lane; later ones take any
        if not self.auto:  # made now: a bad configuration fails the constructor
            self._lane(transport)

    def _lane(self, name: str) -> Lane:
        lane = self._lanes.get(name)
        if lane is None:
            transport = get_transport(name)
            why = security_refusal(transport.capabilities, self.context.curve_keys is not None, self.context.insecure)
            if why is not None:
                raise ConfigError(f"transport={name!r}: {why}")
            context = self.context
            if transport.capabilities.network:
                if self._port_taken:
                    context = replace(context, data_port=0)
                self._port_taken = True
            lane = self._lanes[name] = Lane(transport, transport.export(self._count, self._size, context))
        return lane

    def assign(self, rank: int, offered: list[str], host: str, same_host: bool) -> Lane:
        """The lane that serves ``rank`` (HELLO's transports and host); TransportError if none can."""
        with self._lock:
            if self.auto:
                def usable_here(name: str) -> Capabilities | None:
                    try:
                        caps = get_transport(name).capabilities
                    except TransportError:
                        return None
                    has_curve = self.context.curve_keys is not None
                    return caps if security_refusal(caps, has_curve, self.context.insecure) is None else None

                name, why = choose_auto(rank, offered, same_host, usable_here)
                if name is None:
                    raise TransportError(why)
            else:
                (name,) = self._lanes
                refused = refusal(self._lanes[name].transport, rank, offered, host)
                if refused is not None:
                    raise TransportError(refused)
            try:
                lane = self._lane(name)
            except ConfigError as exc:
                raise TransportError(str(exc)) from exc
            self._of_rank[rank] = name
            return lane

    def of(self, ranks: dict[int, Any]) -> list[tuple[Lane, dict[int, Any]]]:
        """The lanes of a push's ``ranks`` ({rank: anything}), each with its share of them."""
        with self._lock:
            groups: dict[str, dict[int, Any]] = {}
            for rank, value in ranks.items():
                groups.setdefault(self._of_rank.get(rank, next(iter(self._lanes), "")), {})[rank] = value
            return [(self._lanes[name], share) for name, share in groups.items() if name in self._lanes]

    def single(self) -> Lane | None:
        """The one lane, while there is just one."""
        with self._lock:
            return next(iter(self._lanes.values())) if len(self._lanes) == 1 else None

    def close(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.exported.close()


class Sources(list[Any]):
    """A tensor's bytes as each lane's writer takes them (``nbytes``: the same for all)."""

    @property
    def nbytes(self) -> int:
        return int(self[0].nbytes)


class FanOut:
    """One bucket written into the same slot of several lanes (a mixed ``auto`` push): every
    write goes to each lane's writer; ``frames[i]`` is what lane ``i``'s writer had to send."""

    streamed = False

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers
        self.frames: list[list[Any]] = [[] for _ in writers]

    def source_bytes(self, tensor: Any) -> Sources:
        return Sources(w.source_bytes(tensor) for w in self.writers)

    def write(self, offset: int, source: Sources, start: int, nbytes: int) -> None:
        for w, s in zip(self.writers, source, strict=True):
            w.write(offset, s, start, nbytes)

    def write_whole(self, bucket: Any, items: Sequence[Any]) -> int | None:
        changed = [w.write_whole(bucket, items) for w in self.writers]
        return next((c for c in changed if c is not None), None)

    def finish(self, used: int) -> list[Any]:
        self.frames = [w.finish(used) for w in self.writers]
        return []

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
