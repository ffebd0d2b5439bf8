"""The Transport interface: how bucket slots are created, described, written and read.

A transport is one module (or small package) holding both sides: the sender's *exported* slots
(it owns and frees the memory) and a rank's *imported* view of them. Only a small map of scalars
(the slot descriptor) crosses the wire in WELCOME. Sender and receiver code never name a
transport: what differs between transports is stated by :class:`Capabilities` and done behind
the per-bucket :class:`BucketWriter` (sender) and the slot's reads (rank).

One bucket on the sender::

    writer = slot.writer(bucket, layout, stream)   # stream: the ranks reading it as it is written, or None
    if writer.streamed: publish BUCKET              # ranks copy it out right behind the writes
    write / write_whole ...                          # the bucket's tensors (or pieces of them)
    frames = writer.finish(used)                     # visible to ranks; bytes to send after BUCKET, if any
    if not writer.streamed: publish BUCKET + frames

and on a rank: ``slot.accept(frames)`` (data-frame transports), then ``raw``/``typed`` views or,
for a streamed bucket, ``slot.stream_reader(...)``; ``slot.sync()`` before the ACK.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import xxhash

from ..dtypes import DType
from ..errors import ProtocolError, TransportError


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, so that sender and receiver decide without naming it."""

    # the slots are memory of the sender's host (or its GPUs): a rank on another host needs
    # another transport
    same_host: bool
    # where bucket bytes live for the ranks: "host" (CPU memory, written straight into a model's
    # host tensors) or "cuda"
    device: str = "host"
    # a bucket may be published before its bytes are written, the ranks copying it out right
    # behind the writes (each slot says whether it can: ``can_stream``)
    streamed: bool = False
    # every rank of a push takes part in each bucket's transfer (a c10d broadcast), so a bucket
    # moves only once all of them are ready for it
    collective: bool = False
    # how many ranks one streamed bucket can feed; None: no limit
    max_consumers: int | None = None
    # bucket bytes travel as data frames after the BUCKET message on the control connection,
    # not through shared memory
    data_frames: bool = False
    # a rank receives each bucket's bytes into its own copy of the slot over the network
    # (``ImportedSlot.receive``, on the rank's receive thread, overlapping the apply of the last)
    receives: bool = False
    # bucket bytes cross the network: the transport needs CURVE keys or ``insecure=True``
    network: bool = False
    # the transport authenticates its peers (CURVE, or memory only this host's user can open); a
    # c10d group cannot, so such a transport is offered and used only with ``insecure=True``
    authenticated: bool = True


@dataclass
class PushLayout:
    """What a writer may need of a push's layout: the planned buckets and each tensor's bytes,
    plus what a transport derives from them, kept as long as the layout (an RL loop pushes one
    layout every step)."""

    plan: list[Any]
    tensor_bytes: list[int]
    derived: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportContext:
    """What a sender gives its transport when it creates its slots (``Transport.export``)."""

    session: str = ""  # the sender's session id: a transport that names its memory puts it in the name
    data_host: str = "127.0.0.1"  # where a data socket or store binds, and what WELCOME/BEGIN announce
    data_port: int = 0  # 0: any free port
    curve_keys: Any = None  # the sender's security.CurveKeys (a data socket serves with them), or None
    allowed_clients: list[bytes] | None = None  # CURVE client keys let in; None: any
    insecure: bool = False
    heartbeat_timeout: float = 10.0  # how long a rendezvous waits for a silent peer
    checksum: bool = False  # buckets are digested whole: move every byte of [0, used) from the slot


@dataclass(frozen=True)
class ImportContext:
    """What a rank gives its transport when it maps a WELCOME's slots (``Transport.attach``)."""

    rank: int = 0
    token: str = ""  # this daemon's session token (as in HELLO)
    owner: tuple[int, str] | None = None  # (pid, session) of the sender
    sender_host: str = ""  # the host of the control endpoint ("" for ipc): what a collective binds toward
    curve: tuple[Any, bytes] | None = None  # (this rank's CurveKeys, the sender's public key), or None
    insecure: bool = False  # skip the checks that memory belongs to this rank's user; allow c10d


@dataclass(frozen=True)
class StreamSpec:
    """The ranks (by index below ``max_consumers``) that read a streamed bucket as it is written;
    ``check`` raises once the push failed; a wait with nothing moving ends at ``timeout``."""

    consumers: list[int]
    check: Callable[[], None]
    timeout: float


# where a received range may land instead of the slot: (slot offset, bytes) -> a writable uint8
# array of exactly that many bytes (a tensor's memory in the model), or None for the slot
Landing = Callable[[int, int], Any]


class BucketWriter(Protocol):
    """Writes one bucket; made per bucket by :meth:`ExportedSlot.writer`."""

    streamed: bool  # publish the BUCKET before writing (ranks read right behind the writes)

    def source_bytes(self, tensor: Any) -> Any: ...  # flat uint8 view of a tensor, in the slot's memory domain
    def write(self, offset: int, source: Any, start: int, nbytes: int) -> None: ...
    # the bucket's whole tensors in bulk (``items``: every tensor of the push, by manifest index);
    # the manifest index of one whose byte size is not as planned, else None
    def write_whole(self, bucket: Any, items: Sequence[Any]) -> int | None: ...
    # every byte is written: make them visible to ranks; the data frames to send after BUCKET
    def finish(self, used: int) -> list[Any]: ...
    def abort(self) -> None: ...  # the push failed mid-bucket: wake ranks waiting for its bytes


class ExportedSlot(Protocol):
    """A slot on the sender side: owns the memory."""

    size: int
    can_stream: bool  # this slot can take streamed buckets
    # the most bytes a plain (not streamed) bucket should hold so that ranks read it from the
    # cache right after it is written (shm.streaming.hot_bytes); 0: no such cap
    hot_bytes: int

    def descriptor(self) -> dict[str, Any]: ...
    def source_bytes(self, tensor: Any) -> Any: ...
    def writer(self, bucket: Any, layout: PushLayout, stream: StreamSpec | None) -> BucketWriter: ...
    def digest(self, nbytes: int) -> int: ...  # xxh3_64 (or a device digest) of bytes [0, nbytes)
    def close(self) -> None: ...


class StreamRead(Protocol):
    """One rank's pass over one streamed bucket: wait for bytes, copy them out, say so."""

    def copy_out(self, dst: Any, at: int, offset: int, nbytes: int, stream: bool) -> None: ...
    # spans [start, stop) to their addresses; the index of the first without one (stop: all had one)
    def scatter(self, offsets: Any, sizes: Any, addresses: Any, start: int, stop: int, stream: bool) -> int: ...
    def consume(self, end: int) -> None: ...


class ImportedSlot(Protocol):
    """A slot mapped on the receiver side: never frees the sender's memory."""

    size: int
    domain: str  # "host" for CPU memory; chunks then go straight into a sink's destination
    streams: bool  # host copies out of it bypass the cache (see shm.streaming)
    can_stream: bool  # it can take streamed buckets (stream_reader)

    def accept(self, frames: list[Any]) -> None: ...  # a data-frame transport's bucket bytes, from offset 0
    def raw(self, offset: int, nbytes: int) -> Any: ...  # flat uint8 view into the slot
    def typed(self, framework: str, buffer: Any, dtype: DType, shape: tuple[int, ...]) -> Any: ...
    def scratch(self, nbytes: int) -> Any: ...  # a private flat uint8 buffer in the same domain
    def copy(self, dst: Any, at: int, src: Any) -> None: ...  # dst[at:at+len(src)] = src
    def stream_reader(self, index: int, used: int, check: Callable[[], None], timeout: float) -> StreamRead: ...
    # a receiving transport's bucket ``seq`` into this slot (on the receive thread): its pieces'
    # bytes (``pieces``: their slot offsets and sizes; None: all of [0, used), a checksummed bucket).
    # ``into(start, nbytes)``: where a direct range (one whole tensor) may land instead of the slot,
    # the model's own memory, or None. ``check`` raises once the version failed; a wait with
    # nothing arriving ends at ``timeout``
    def receive(
        self, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None], timeout: float,
        into: Landing | None = None,
    ) -> None: ...
    def sync(self) -> None: ...  # consumer copies out of the slot are complete (before ACK)
    def digest(self, nbytes: int) -> int: ...  # same function as the exporter's digest
    def close(self) -> None: ...


class Exported(Protocol):
    """A sender's slots of one transport, and what the transport keeps beside them for the
    sender's lifetime (a data socket, a store); made by ``Transport.export``."""

    slots: list[ExportedSlot]

    def descriptors(self) -> list[dict[str, Any]]: ...  # WELCOME's ``slots``
    # a push to ``ranks`` ({rank: daemon token}) starts: BEGIN's per-push fields, or None. ``check``
    # raises once the push failed; nothing waits longer than ``timeout``
    def begin_push(self, ranks: dict[int, str], check: Callable[[], None], timeout: float) -> dict[str, Any] | None: ...
    def end_push(self, ok: bool) -> None: ...  # the push ended (failed: drop what it set up, e.g. a group)
    def close(self) -> None: ...


class Imported(Protocol):
    """A rank's mapping of one sender's slots, and what the transport keeps for that connection;
    made by ``Transport.attach`` at WELCOME."""

    slots: list[ImportedSlot]

    def join(self, fields: dict[str, Any] | None, timeout: float) -> None: ...  # BEGIN's fields; never blocks
    def leave(self, ok: bool) -> None: ...  # the version ended on this rank (failed: drop its group)
    def close(self) -> None: ...


class Transport(Protocol):
    name: str
    capabilities: Capabilities

    def export(self, count: int, size: int, context: ExportContext) -> Exported: ...
    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> Imported: ...


# --- shared by transports -------------------------------------------------------------------


def host_identity() -> str:
    """Memory shared by name only makes sense on one host (one boot of it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def address_toward(host: str | None = None) -> str:
    """This host's address on the interface that routes to ``host`` (None: the default route): what
    a wildcard bind announces, and what a group member binds. No packet is sent: a UDP socket only
    asks the kernel for a route. Not ``gethostbyname(gethostname())``, which is 127.0.1.1 on many
    distributions; a host with several networks sets ``data_address`` instead."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host or "192.0.2.1", 9))  # TEST-NET-1: routed by the default route, never reached
        return str(probe.getsockname()[0])
    except OSError:  # no route (an isolated host)
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    finally:
        probe.close()


def host_digest(data: np.ndarray) -> int:
    """xxh3_64 of host bytes: fast enough to check every bucket (GB/s per core)."""
    # NumPy's stubs type ndarray.__buffer__ on 3.12+ only (mypy checks as 3.10)
    return int(xxhash.xxh3_64_intdigest(memoryview(data)))  # type: ignore[arg-type]


def refusal(transport: Transport, rank: int, offered: list[str], host: str) -> str | None:
    """Why ``transport`` cannot serve a rank that offers ``offered`` from ``host``; None if it can.
    Decided per rank, so that a choice per rank (a sender with several transports) can use it."""
    name = transport.name
    if name not in offered:
        hint = (
            f"; a rank offers {name!r} only with insecure=True, since it cannot authenticate its peers"
            if not transport.capabilities.authenticated else ""
        )
        return (
            f"rank {rank} offers transports {offered}, this sender uses {name!r}; make {name!r} available on the "
            f"rank (install its extra, or register() it there as on the sender) or pick a transport both sides have{hint}"
        )
    if transport.capabilities.same_host and host != host_identity():
        return f"rank {rank} runs on host {host!r}, the sender on {host_identity()!r}; {name} needs both on one node"
    return None


def security_refusal(capabilities: Capabilities, has_curve: bool, insecure: bool) -> str | None:
    """Why a side with this security setup may not use a transport with ``capabilities``; None if it may."""
    if not capabilities.authenticated and not insecure:
        return "it cannot authenticate its peers (c10d has no authentication), so it needs insecure=True on a trusted network"
    if capabilities.network and not has_curve and not insecure:
        return "its bytes cross the network, so it needs CURVE keys (curve_keys=, server_key= on ranks) or insecure=True"
    return None


def transfer_spans(pieces: tuple[Any, Any] | None, used: int, direct_min: int) -> list[tuple[int, int, bool]]:
    """The ranges of a bucket's slot a network transport moves, as (start, stop, direct), in order.
    A piece of at least ``direct_min`` bytes is its own range, ``direct``: the sender moves it from
    the tensor's own memory, never packing it (one copy less); the runs of smaller pieces between
    are one range each, from the slot. Alignment padding is not moved. Without ``pieces`` (a
    checksummed bucket, digested whole) or with ``direct_min`` 0: all of [0, used), from the slot.
    Both sides derive the same ranges from the BUCKET's pieces."""
    if pieces is None or direct_min <= 0:
        return [(0, used, False)] if used else []
    spans: list[tuple[int, int, bool]] = []
    run: list[int] | None = None
    for offset, n in zip(*pieces, strict=True):
        start, size = int(offset), int(n)
        if size >= direct_min:
            if run is not None:
                spans.append((run[0], run[1], False))
                run = None
            spans.append((start, start + size, True))
        elif size:
            if run is None:
                run = [start, start + size]
            else:
                run[1] = start + size
    if run is not None:
        spans.append((run[0], run[1], False))
    return spans


BEGIN_FIELDS_MAX = 32  # BEGIN's ``transport`` map: what a rank's decoder accepts


def check_begin_fields(transport: Transport, fields: dict[str, Any]) -> None:
    """A transport's per-push fields must fit BEGIN's small map of scalars; a rank would refuse
    anything else, so the sender checks before it sends (a transport's own bug, named)."""
    bad = [k for k, v in fields.items() if type(k) is not str or type(v) not in (str, int, float, bytes, bool)]
    if type(fields) is not dict or len(fields) > BEGIN_FIELDS_MAX or bad:
        raise TransportError(
            f"transport {transport.name!r}: begin_fields() returned {type(fields).__name__} with "
            f"{len(fields)} keys{f', non-scalar at {bad[:3]}' if bad else ''}; expected a dict of at most "
            f"{BEGIN_FIELDS_MAX} str keys with str, int, float, bytes or bool values; fix the transport"
        )


SlotT = TypeVar("SlotT")


def create_all(make: Callable[[int], SlotT], count: int, size: int) -> list[SlotT]:
    """Create ``count`` slots, or none: a failure frees the ones already made."""
    slots: list[SlotT] = []
    try:
        for _ in range(count):
            slots.append(make(size))
    except BaseException:
        for slot in slots:
            slot.close()  # type: ignore[attr-defined]
        raise
    return slots


class SlotWriter:
    """A slot that is its own writer for plain (not streamed) buckets: a mixin giving
    ``writer``, ``write_whole``, ``finish`` and ``abort`` from ``write_tensors`` and ``flush``."""

    streamed = False
    can_stream = False
    hot_bytes = 0

    def write_tensors(self, offsets: list[int], tensors: Sequence[Any], nbytes: list[int]) -> int | None:
        """Whole tensors at ``offsets``: the index of one whose byte size is not ``nbytes[i]``, else None."""
        for i, (offset, tensor, n) in enumerate(zip(offsets, tensors, nbytes)):
            source = self.source_bytes(tensor)  # type: ignore[attr-defined]
            if source.nbytes != n:
                return i
            if n:
                self.write(offset, source, 0, n)  # type: ignore[attr-defined]
        return None

    def writer(self, bucket: Any, layout: PushLayout, stream: StreamSpec | None) -> BucketWriter:
        return self  # type: ignore[return-value]

    def write_whole(self, bucket: Any, items: Sequence[Any]) -> int | None:
        first = bucket.tensors[0]
        changed = self.write_tensors(bucket.offsets, items[first : first + len(bucket.tensors)], bucket.nbytes)
        return None if changed is None else first + changed

    def flush(self) -> None:
        """Make every write visible to ranks before the bucket is published."""

    def finish(self, used: int) -> list[Any]:
        self.flush()
        return []

    def abort(self) -> None:
        """Nothing waits on a plain bucket's bytes."""


class SlotReader:
    """Defaults of an imported slot for what its transport does not do."""

    can_stream = False

    def accept(self, frames: list[Any]) -> None:
        raise ProtocolError(f"BUCKET: expected no data frames for slots of this transport, got {len(frames)}")

    def stream_reader(self, index: int, used: int, check: Callable[[], None], timeout: float) -> StreamRead:
        raise ProtocolError("BUCKET: field 'ring': this transport's slots take no streamed buckets")

    def receive(
        self, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None], timeout: float,
        into: Landing | None = None,
    ) -> None:
        raise ProtocolError(f"BUCKET {seq}: this transport's slots hold the bytes already; nothing to receive")


class SlotSet:
    """:class:`Exported` for a transport whose slots are all it keeps (shm, cuda_ipc)."""

    def __init__(self, transport: Any, slots: list[Any]) -> None:
        self.transport = transport
        self.slots = slots

    def descriptors(self) -> list[dict[str, Any]]:
        return [slot.descriptor() for slot in self.slots]

    def begin_push(self, ranks: dict[int, str], check: Callable[[], None], timeout: float) -> dict[str, Any] | None:
        fields: dict[str, Any] | None = self.transport.begin_fields(self.slots, sorted(ranks))
        return fields

    def end_push(self, ok: bool) -> None:
        pass

    def close(self) -> None:
        for slot in self.slots:
            slot.close()


class SlotImports:
    """:class:`Imported` for a transport whose mapped slots are all a rank keeps."""

    def __init__(self, transport: Any, slots: list[Any], rank: int) -> None:
        self.transport = transport
        self.slots = slots
        self.rank = rank

    def join(self, fields: dict[str, Any] | None, timeout: float) -> None:
        self.transport.join(self.slots, fields, self.rank)

    def leave(self, ok: bool) -> None:
        pass

    def close(self) -> None:
        for slot in self.slots:
            slot.close()


class PerSlot:
    """``export``/``attach`` of a transport from its per-slot ``create_slots``/``open_slot``."""

    def export(self, count: int, size: int, context: ExportContext) -> SlotSet:
        return SlotSet(self, self.create_slots(count, size, context.session))  # type: ignore[attr-defined]

    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> SlotImports:
        slots: list[Any] = []
        try:
            for desc in descriptors:
                slots.append(self.open_slot(desc, context.owner, context.insecure))  # type: ignore[attr-defined]
        except BaseException:
            for slot in slots:
                slot.close()
            raise
        return SlotImports(self, slots, context.rank)


class NoFields(PerSlot):
    """Defaults of a per-slot transport that needs nothing per push."""

    def begin_fields(self, slots: list[Any], ranks: list[int]) -> dict[str, Any] | None:
        return None

    def join(self, slots: list[Any], fields: dict[str, Any] | None, rank: int) -> None:
        if fields is not None:
            raise ProtocolError(
                f"BEGIN: field 'transport': expected none for transport {getattr(self, 'name', '?')!r}, got keys "
                f"{sorted(fields)[:8]}"
            )
