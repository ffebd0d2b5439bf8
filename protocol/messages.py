"""Wire messages: typed classes, a msgpack codec and strict structural validation.

Every frame is one msgpack map ``{"type": NAME, "v": PROTOCOL_VERSION, ...fields}``.
Decoding never trusts the peer: size limits are applied by msgpack itself, then
every field is checked for presence, type and range, and cross-field rules
(parallel arrays of equal length, ``total_bytes`` consistent with dtypes and shapes)
are enforced. Anything wrong raises :class:`ProtocolError` naming the field.

Per-tensor metadata travels as packed binary arrays (:mod:`.packed`): BEGIN carries
the manifest once (names as one NUL-separated UTF-8 bin, dtype codes, ranks and dims),
and a BUCKET names its entries by their manifest index (``first``, then consecutive),
with offsets, piece sizes and chunk starts as uint64. A repeated manifest is named by
its ``layout`` number instead (``reuse``), and a bucket of whole tensors packed from 0
sends only their ``count``: both sides derive its arrays from the manifest.

Checks that need session context (slot count and size, a packed bucket's manifest) live in
:func:`check_bucket_fits` and :func:`packed_entries`, called by the receiver. What a session
remembers between frames (the manifest it sent or took last) lives in its :class:`Codec`;
the module keeps no mutable state.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import msgpack
import numpy as np

from ..gc_pause import gc_paused
from .dtypes import DTYPES
from .errors import ProtocolError
from .packed import MAX_VALUE, element_counts, pack_shapes, pack_u64, packed_offsets, u64_array, unpack_shapes

# 2: per-tensor arrays packed as bin; BUCKET entries by manifest index instead of name/dtype/shape
# 3: BEGIN's names as one NUL-separated UTF-8 bin instead of a list of str
# 4: READY's ``streamed`` and BUCKET's ``ring``: a bucket may stream through a slot's ring
# 5: BEGIN's ``layout`` and ``reuse`` (a repeated manifest is named, not resent) and BUCKET's
#    ``count`` (a bucket of whole tensors packed from 0 leaves its arrays out)
# 6: two-phase commit (PREPARED, then COMMIT only once every rank prepared); per-connection
#    routing identities (PONG's ``known``); a manifest split over BEGIN ``parts`` + MANIFEST
#    frames; BEGIN's ``transport`` (per-push transport parameters); bounded decoding
PROTOCOL_VERSION = 8
ALIGNMENT = 256

# Decoder limits: a hostile or broken peer must not make us allocate without bound.
MAX_MESSAGE_BYTES = 256 << 20  # the largest frame a rank accepts (libzmq MAXMSGSIZE)
# the largest frame a sender accepts: ranks send only small control messages
MAX_PEER_MESSAGE_BYTES = 1 << 20
# frames decoded from a peer whose HELLO (sender) / WELCOME (rank) was not yet accepted
PRE_HELLO_MAX_BYTES = 64 << 10
# the sender splits a manifest into frames of at most this many bytes (BEGIN ``parts``)
MANIFEST_PART_BYTES = 64 << 20
MAX_ENTRIES = 4_000_000
MAX_NAME_LEN = 1024
MAX_NDIM = 16
MAX_TEXT_LEN = 64 << 10
MAX_SLOTS = 64
MAX_DATA_FRAMES = 4096  # data frames after one BUCKET (each at most MAX_MESSAGE_BYTES)
MAX_DIM = 1 << 48
# Every msgpack array/map of a valid message is small (slots <= MAX_SLOTS, transports <= 16,
# per-tensor arrays travel as bin), and a message holds only a few of them. Both bounds keep
# what one decode can allocate near the frame's own size: a frame of nested empty arrays is
# refused after MAX_CONTAINERS of them, not expanded into tens of millions of lists.
MAX_CONTAINER_LEN = 2 * MAX_SLOTS  # over every field limit, so a field check names an overlong list
MAX_CONTAINERS = 128
# a name costs ~60 bytes of Python objects beyond its UTF-8 bytes: a BEGIN may hold at most
# (4 x its names bin + 64 MiB) / 64 names, so 1-byte names cannot blow up a decode 30x
_NAME_OVERHEAD = 64
_DECODE_SLACK = 64 << 20

_INT_MAX = (1 << 63) - 1


# --- field specs -----------------------------------------------------------------

@dataclass(frozen=True)
class _Int:
    lo: int = 0
    hi: int = _INT_MAX


@dataclass(frozen=True)
class _Float:
    lo: float = 0.0
    hi: float = 1e12


@dataclass(frozen=True)
class _Str:
    max_len: int = MAX_TEXT_LEN


@dataclass(frozen=True)
class _List:
    item: Any
    max_len: int = MAX_ENTRIES


@dataclass(frozen=True)
class _Bin:
    """Packed bytes: one byte per entry (dtype codes, ranks)."""

    max_len: int = MAX_ENTRIES


@dataclass(frozen=True)
class _U64s:
    """Packed little-endian uint64, one per entry, each at most ``hi``."""

    hi: int = MAX_VALUE
    max_len: int = MAX_ENTRIES


@dataclass(frozen=True)
class _Names:
    """Tensor names, unique, each 1..``max_len`` characters. On the wire one bin: the names in
    UTF-8 joined by NUL (100k names as a msgpack list cost ~6 ms to unpack, then checks)."""

    max_len: int = MAX_NAME_LEN
    max_count: int = MAX_ENTRIES


@dataclass(frozen=True)
class _Map:
    """A small map of scalar values (transport slot descriptors, stats)."""

    max_len: int = 32


def _spec(kind: Any) -> dict[str, Any]:
    """A field's wire check, as its ``dataclasses.field`` metadata: ``field(metadata=_spec(...))``."""
    return {"spec": kind}


_RANK = _Int(0, 1 << 20)
_VERSION = _Str(MAX_NAME_LEN)
_SESSION = _Str(64)
_NAMES = _Names()
_OFFSETS = _U64s()


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all wire messages: each is a frozen, slotted dataclass with a ``TYPE``, listed in
    :data:`MESSAGES`; every field carries its wire check as metadata (see ``_spec``)."""

    TYPE: ClassVar[str] = ""


# --- the messages ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE = "HELLO"
    rank: int = field(metadata=_spec(_RANK))
    session: str = field(metadata=_spec(_SESSION))
    transports: list[str] = field(metadata=_spec(_List(_Str(32), 16)))
    host: str = field(metadata=_spec(_Str(256)))
    device: str = field(metadata=_spec(_Str(256)))
    pid: int = field(metadata=_spec(_Int()))


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    TYPE = "WELCOME"
    session: str = field(metadata=_spec(_SESSION))
    transport: str = field(metadata=_spec(_Str(32)))
    bucket_bytes: int = field(metadata=_spec(_Int(1)))
    alignment: int = field(metadata=_spec(_Int(1, 1 << 20)))
    slots: list[dict[str, Any]] = field(metadata=_spec(_List(_Map(), MAX_SLOTS)))
    heartbeat_interval: float = field(metadata=_spec(_Float(0.001, 3600.0)))
    heartbeat_timeout: float = field(metadata=_spec(_Float(0.001, 86400.0)))
    pid: int = field(metadata=_spec(_Int()))


@dataclass(frozen=True, slots=True)
class Begin(Message):
    TYPE = "BEGIN"
    version: str = field(metadata=_spec(_VERSION))
    names: list[str] = field(metadata=_spec(_NAMES))
    dtypes: bytes = field(metadata=_spec(_Bin()))  # one dtype code per tensor
    ndims: bytes = field(metadata=_spec(_Bin()))  # the rank of each tensor's shape
    dims: bytes = field(metadata=_spec(_U64s(MAX_DIM, MAX_ENTRIES * MAX_NDIM)))  # all shapes' dims, concatenated
    total_bytes: int = field(metadata=_spec(_Int()))
    buckets: int = field(metadata=_spec(_Int(0, MAX_ENTRIES)))
    # accept a version older than the rank's committed one (a deliberate rollback)
    force: bool | None = field(default=None, metadata=_spec(bool))
    # the sender's number for this manifest (names, dtypes, shapes) within its session
    layout: int | None = field(default=None, metadata=_spec(_Int(1)))
    # names/dtypes/ndims/dims are empty: the manifest is the one this rank took last, under
    # ``layout``. An RL loop pushes one layout every step; at 100k tensors resending it costs
    # a 2.6 MB frame and its decode per version.
    reuse: bool | None = field(default=None, metadata=_spec(bool))
    # the manifest does not fit one frame: this BEGIN carries its first tensors and ``parts - 1``
    # MANIFEST frames follow with the rest, in order (total_bytes and buckets are the whole's)
    parts: int | None = field(default=None, metadata=_spec(_Int(2, 1 << 16)))
    # per-push parameters of the session's transport (a collective's store address, say)
    transport: dict[str, Any] | None = field(default=None, metadata=_spec(_Map()))
    # tied weights: more names for tensors the manifest holds once (the trainer's lm_head.weight
    # sharing embed_tokens.weight's memory); alias_of[i] is the manifest index alias_names[i] names
    alias_names: list[str] | None = field(default=None, metadata=_spec(_NAMES))
    alias_of: bytes | None = field(default=None, metadata=_spec(_OFFSETS))

    @classmethod
    def build(
        cls, version: str, names: list[str], dtypes: list[int], shapes: list[Any], total_bytes: int, buckets: int,
        force: bool | None = None, layout: int | None = None, aliases: list[tuple[str, int]] | None = None,
    ) -> Begin:
        """A BEGIN from per-tensor lists (dtype codes, shapes as int sequences); ``aliases``:
        (name, manifest index) for names that share a listed tensor's memory."""
        ndims, dims = pack_shapes(shapes)
        alias_names, alias_of = pack_aliases(aliases)
        return cls(
            version, names, bytes(dtypes), ndims, dims, total_bytes, buckets, force, layout,
            alias_names=alias_names, alias_of=alias_of,
        )

    @classmethod
    def reusing(cls, version: str, layout: int, total_bytes: int, buckets: int, force: bool | None = None) -> Begin:
        """A BEGIN whose manifest is the rank's last one, named by ``layout``."""
        return cls(version, [], b"", b"", b"", total_bytes, buckets, force, layout, True)

    def shapes(self) -> list[tuple[int, ...]]:
        """Every tensor's shape; one tuple per tensor, so only for paths that need them."""
        return unpack_shapes(self.ndims, np.frombuffer(self.dims, "<u8"))


def pack_aliases(aliases: list[tuple[str, int]] | None) -> tuple[list[str] | None, bytes | None]:
    """BEGIN's ``alias_names`` and ``alias_of`` from (name, manifest index) pairs; None for none."""
    if not aliases:
        return None, None
    return [name for name, _ in aliases], pack_u64([index for _, index in aliases])


@dataclass(frozen=True, slots=True)
class ManifestPart(Message):
    """The rest of a manifest that did not fit its BEGIN's frame: tensors in push order."""

    TYPE = "MANIFEST"
    version: str = field(metadata=_spec(_VERSION))
    part: int = field(metadata=_spec(_Int(1, 1 << 16)))  # 1 .. BEGIN.parts - 1, in order
    names: list[str] = field(metadata=_spec(_NAMES))
    dtypes: bytes = field(metadata=_spec(_Bin()))
    ndims: bytes = field(metadata=_spec(_Bin()))
    dims: bytes = field(metadata=_spec(_U64s(MAX_DIM, MAX_ENTRIES * MAX_NDIM)))


@dataclass(frozen=True, slots=True)
class Ready(Message):
    TYPE = "READY"
    version: str = field(metadata=_spec(_VERSION))
    # this rank copies every tensor of the version out of the slot itself (no view reaches
    # load_weights), so its buckets may stream through a slot's ring (see protocol.shm_ring)
    streamed: bool | None = field(default=None, metadata=_spec(bool))


@dataclass(frozen=True, slots=True)
class Reject(Message):
    TYPE = "REJECT"
    version: str = field(metadata=_spec(_VERSION))
    error: str = field(metadata=_spec(_Str(64)))
    reason: str = field(metadata=_spec(_Str()))
    # whether the rank's served model is whole (it may still be torn from an earlier version)
    model_intact: bool | None = field(default=None, metadata=_spec(bool))


@dataclass(frozen=True, slots=True)
class Bucket(Message):
    TYPE = "BUCKET"
    version: str = field(metadata=_spec(_VERSION))
    seq: int = field(metadata=_spec(_Int(0, MAX_ENTRIES)))
    slot: int = field(metadata=_spec(_Int(0, MAX_SLOTS - 1)))
    # manifest index of the first entry; entries are that tensor and the ones after it, in order
    first: int = field(metadata=_spec(_Int(0, MAX_ENTRIES)))
    offsets: bytes = field(metadata=_spec(_OFFSETS))  # where each piece starts in the slot
    nbytes: bytes = field(metadata=_spec(_OFFSETS))  # bytes of each piece
    # byte offset of each piece inside its tensor; all zero unless a tensor is chunked
    chunks: bytes = field(metadata=_spec(_OFFSETS))
    # xxh3_64 of the slot bytes [0, end of last piece) when the sender enables checksums
    checksum: int | None = field(default=None, metadata=_spec(_Int(0, (1 << 64) - 1)))
    # published before its bytes: they stream through the slot's ring as the sender writes them
    ring: bool | None = field(default=None, metadata=_spec(bool))
    # set: offsets/nbytes/chunks are empty, and the bucket holds the ``count`` whole tensors
    # from ``first`` on, packed from offset 0 (see packed.packed_offsets); both sides derive
    # the arrays from the manifest instead of moving 24 bytes a tensor
    count: int | None = field(default=None, metadata=_spec(_Int(1, MAX_ENTRIES)))
    # data frames that follow this message in its multipart (a data-frame transport's bucket
    # bytes, in order from offset 0); none for memory transports
    frames: int | None = field(default=None, metadata=_spec(_Int(1, MAX_DATA_FRAMES)))

    @classmethod
    def build(
        cls, version: str, seq: int, slot: int, first: int, offsets: Any, nbytes: Any, chunks: Any,
        checksum: int | None = None, ring: bool | None = None,
    ) -> Bucket:
        """A BUCKET from per-entry int sequences (lists or NumPy arrays)."""
        return cls(version, seq, slot, first, pack_u64(offsets), pack_u64(nbytes), pack_u64(chunks), checksum, ring)

    def __len__(self) -> int:
        return self.count if self.count is not None else len(self.offsets) // 8

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, nbytes, chunks) as int64 arrays; decode has bounded every value. A packed
        bucket (``count``) has none: its entries come from the manifest (``packed_entries``)."""
        return tuple(np.frombuffer(b, "<u8").view(np.int64) for b in (self.offsets, self.nbytes, self.chunks))  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Ack(Message):
    TYPE = "ACK"
    version: str = field(metadata=_spec(_VERSION))
    seq: int = field(metadata=_spec(_Int(0, MAX_ENTRIES)))


@dataclass(frozen=True, slots=True)
class Prepared(Message):
    """Every byte of the version is applied (staged: received, verified and held); the rank
    commits it only on COMMIT and drops it on ABORT."""

    TYPE = "PREPARED"
    version: str = field(metadata=_spec(_VERSION))
    tensors: int = field(metadata=_spec(_Int()))
    bytes: int = field(metadata=_spec(_Int()))
    seconds: float = field(metadata=_spec(_Float()))
    # the served model was written already (not staged): an ABORT now leaves it torn
    in_place: bool = field(default=True, metadata=_spec(bool))


@dataclass(frozen=True, slots=True)
class Commit(Message):
    """Sent only once every rank of the push said PREPARED."""

    TYPE = "COMMIT"
    version: str = field(metadata=_spec(_VERSION))


@dataclass(frozen=True, slots=True)
class Committed(Message):
    """``seconds``: BEGIN to commit on the rank. ``changing``: how long its served model was being
    changed, from the first write into it to the commit (staged: the swap at COMMIT alone)."""

    TYPE = "COMMITTED"
    version: str = field(metadata=_spec(_VERSION))
    tensors: int = field(metadata=_spec(_Int()))
    bytes: int = field(metadata=_spec(_Int()))
    seconds: float = field(metadata=_spec(_Float()))
    changing: float | None = field(default=None, metadata=_spec(_Float()))


@dataclass(frozen=True, slots=True)
class Failed(Message):
    TYPE = "FAILED"
    version: str = field(metadata=_spec(_VERSION))
    error: str = field(metadata=_spec(_Str(64)))
    message: str = field(metadata=_spec(_Str()))
    model_intact: bool = field(default=True, metadata=_spec(bool))


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE = "ERROR"
    error: str = field(metadata=_spec(_Str(64)))
    message: str = field(metadata=_spec(_Str()))
    # the version the error is about; a sender fails only that version's round
    version: str | None = field(default=None, metadata=_spec(_VERSION))


@dataclass(frozen=True, slots=True)
class Abort(Message):
    TYPE = "ABORT"
    version: str = field(metadata=_spec(_VERSION))
    reason: str = field(metadata=_spec(_Str()))


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE = "PING"
    session: str = field(metadata=_spec(_SESSION))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE = "PONG"
    session: str = field(metadata=_spec(_SESSION))
    # False: the sender holds no rank for this connection (it was dropped or never welcomed);
    # the rank reconnects and says HELLO again
    known: bool | None = field(default=None, metadata=_spec(bool))


@dataclass(frozen=True, slots=True)
class Bye(Message):
    TYPE = "BYE"
    reason: str = field(metadata=_spec(_Str()))


# every message, by its TYPE; with each one's (field, spec, required) in wire order.
# Built once at import and never written: the codec's only module-level tables.
MESSAGES: tuple[type[Message], ...] = (
    Hello, Welcome, Begin, ManifestPart, Ready, Reject, Bucket, Ack, Prepared, Commit, Committed, Failed, Error,
    Abort, Ping, Pong, Bye,
)
_REGISTRY: dict[str, type[Message]] = {cls.TYPE: cls for cls in MESSAGES}
_FIELDS: dict[str, tuple[tuple[str, Any, bool], ...]] = {
    cls.TYPE: tuple((f.name, f.metadata["spec"], f.default is MISSING) for f in fields(cls)) for cls in MESSAGES
}
# the same with whether each field is a names bin (which a codec remembers), for the per-field loops
_CODED: dict[str, tuple[tuple[str, Any, bool, bool], ...]] = {
    kind: tuple((name, spec, required, type(spec) is _Names) for name, spec, required in specs)
    for kind, specs in _FIELDS.items()
}


# --- codec ---------------------------------------------------------------------------

class Codec:
    """One session's encoder and decoder, with what it remembers between frames.

    An RL loop sends the same manifest every step. A sender's codec keeps the names it joined
    last, a rank's the names bin it split last and the last BEGIN that passed every check, so
    a repeat costs comparisons instead of 100k-name joins, splits and checks. Each
    ``Publisher`` and ``ReceiverDaemon`` owns one: a session never sees another's manifest. The
    module's :func:`encode` and :func:`decode` remember nothing (the same bytes, the same checks).

    Threads may share one codec: each memory is one tuple, replaced whole.
    """

    __slots__ = ("_joined", "_names", "_valid")

    def __init__(self) -> None:
        # the names last encoded (a copy) and their bin: comparing equal lists of the same str
        # objects is ~20x cheaper than joining them
        self._joined: tuple[list[str], bytes] | None = None
        # the last names bin that passed every check, and its names (shared by every decode of it)
        self._names: tuple[bytes, list[str]] | None = None
        # the last BEGIN that passed every check: an identical manifest need not be re-validated
        self._valid: tuple[Begin, ManifestArrays] | None = None

    def encode(self, msg: Message) -> bytes:
        """Serialise a message to one msgpack frame."""
        return _encode(msg, self)

    def decode(self, frame: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
        """Parse and validate one frame, as :func:`decode`; a repeated manifest is answered from memory."""
        return _decode_frame(frame, max_bytes, self)

    def manifest_arrays(self, msg: Begin | ManifestPart) -> ManifestArrays:
        """:func:`manifest_arrays`; the BEGIN this codec decoded last is answered from memory."""
        return _manifest_arrays(msg, self)

    def join_manifest(self, first: Begin, rest: list[ManifestPart]) -> Begin:
        """:func:`join_manifest`, remembering the joined BEGIN as this codec's last valid one."""
        return _join_manifest(first, rest, self)


def encode(msg: Message) -> bytes:
    """Serialise a message to one msgpack frame (remembering nothing; see :class:`Codec`)."""
    return _encode(msg, None)


def _encode(msg: Message, codec: Codec | None) -> bytes:
    body: dict[str, Any] = {"type": msg.TYPE, "v": PROTOCOL_VERSION}
    for name, _, required, names in _CODED[msg.TYPE]:
        value = getattr(msg, name)
        if required or value is not None:  # optional fields travel only when set
            body[name] = _joined_names(value, name, codec) if names else value
    frame: bytes  # msgpack ships no type information
    if msg.TYPE not in _BULK:
        frame = msgpack.packb(body, use_bin_type=True)
        return frame
    with gc_paused():
        frame = msgpack.packb(body, use_bin_type=True)
    if len(frame) > MAX_MESSAGE_BYTES:  # libzmq on the rank would drop the connection unread
        raise ProtocolError(
            f"{msg.TYPE} of {len(frame)} bytes exceeds the ranks' frame limit of {MAX_MESSAGE_BYTES} bytes; "
            "a manifest is split into MANIFEST frames and a bucket holds a bounded number of tensors, so "
            "this is a bug: report it with the tensor count"
        )
    return frame


def _joined_names(names: list[str], where: str, codec: Codec | None) -> bytes:
    if not names:  # an empty or reusing BEGIN must not evict the model's names
        return b""
    last = codec._joined if codec is not None else None
    if last is not None and names == last[0]:  # a private copy: equal even if the caller's list changed
        return last[1]
    try:
        blob = "\0".join(names).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        blob = b""
    if blob.count(b"\0") != max(len(names) - 1, 0) or not all(names) or (names and not blob):
        raise ProtocolError(
            f"field '{where}': expected non-empty names in UTF-8 without NUL characters; "
            "fix: rename the tensors (the sender's describe refuses such names with the name)"
        )
    if codec is not None and not where.startswith("alias"):  # alias names must not evict the model's names
        codec._joined = (list(names), blob)
    return blob


_BULK = frozenset({"BEGIN", "MANIFEST", "BUCKET"})  # per-tensor arrays: see gc_pause
_BULK_FRAME = 64 << 10


def decode(frame: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one frame; raise :class:`ProtocolError` naming what is wrong.

    ``max_bytes``: the largest frame this peer may send now; a larger one is refused before
    a byte of it is parsed (a peer not yet through the handshake gets PRE_HELLO_MAX_BYTES).
    Remembers nothing between frames; a session decodes with its :class:`Codec`.
    """
    return _decode_frame(frame, max_bytes, None)


def _decode_frame(frame: bytes | bytearray | memoryview, max_bytes: int, codec: Codec | None) -> Message:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a bytes frame, got {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise ProtocolError(
            f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes for this peer now"
            + ("; before the handshake only small frames are decoded: say HELLO / WELCOME first"
               if max_bytes < MAX_MESSAGE_BYTES else "; run the same weightstream version on sender and ranks")
        )
    if len(frame) > _BULK_FRAME:
        with gc_paused():
            return _decode(frame, codec)
    return _decode(frame, codec)


class _ContainerBudget:
    """msgpack's list/map hook: counts containers and stops a decode past MAX_CONTAINERS."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ProtocolError(
                f"frame holds more than {MAX_CONTAINERS} msgpack arrays/maps; a message has a few small ones"
            )
        return obj


def _decode(frame: bytes | bytearray | memoryview, codec: Codec | None) -> Message:
    budget = _ContainerBudget()
    try:
        body = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_str_len=4 * MAX_TEXT_LEN,  # bytes; the fields limit characters
            max_bin_len=MAX_MESSAGE_BYTES,
            max_ext_len=0,
            list_hook=budget,
            object_hook=budget,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__}: {exc}); expected one msgpack map") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(body).__name__}")
    kind = body.get("type")
    try:
        return _decode_body(kind, body, codec)
    except ProtocolError as exc:
        exc.msg_type = kind if isinstance(kind, str) else None  # lets a peer avoid answering ERROR with ERROR
        raise


def _decode_body(kind: Any, body: dict[Any, Any], codec: Codec | None) -> Message:
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"field 'type': expected one of {sorted(_REGISTRY)}, got {_short(kind)}")
    v = body.get("v")
    if v != PROTOCOL_VERSION or type(v) is not int:
        raise ProtocolError(
            f"{kind}: field 'v': expected protocol version {PROTOCOL_VERSION}, got {_short(v)}; "
            "run the same weightstream version on sender and receivers"
        )
    values: dict[str, Any] = {}
    for name, spec, required, names in _CODED[kind]:
        if name not in body:
            if required:
                raise ProtocolError(f"{kind}: missing field '{name}'")
            continue
        if names:
            values[name] = _check_names(spec, body[name], f"{kind}.{name}", codec)
        else:
            values[name] = _check(spec, body[name], f"{kind}.{name}")
    extra = set(body) - {"type", "v"} - set(values) - {n for n, _, _ in _FIELDS[kind]}
    if extra:
        raise ProtocolError(f"{kind}: unexpected field(s) {sorted(map(str, extra))[:5]}")
    msg = cls(**values)
    _CROSS_CHECKS.get(kind, _no_check)(msg, codec)
    return msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_bad(values: list[Any], ok: Any, where: str, expected: str) -> None:
    for i, x in enumerate(values):
        if not ok(x):
            raise ProtocolError(f"field '{where}[{i}]': expected {expected}, got {_short(x)}")


def _check(spec: Any, value: Any, where: str) -> Any:
    if spec is bool:
        if type(value) is not bool:
            raise ProtocolError(f"field '{where}': expected bool, got {type(value).__name__}")
        return value
    if isinstance(spec, _Int):
        if type(value) is not int:
            raise ProtocolError(f"field '{where}': expected int, got {type(value).__name__}")
        if not spec.lo <= value <= spec.hi:
            raise ProtocolError(f"field '{where}': expected {spec.lo}..{spec.hi}, got {value}")
        return value
    if isinstance(spec, _Float):
        if type(value) not in (float, int) or not math.isfinite(value):
            raise ProtocolError(f"field '{where}': expected a finite number, got {_short(value)}")
        if not spec.lo <= value <= spec.hi:
            raise ProtocolError(f"field '{where}': expected {spec.lo}..{spec.hi}, got {value}")
        return float(value)
    if isinstance(spec, _Str):
        _sized(value, str, "str", len(value) if type(value) is str else 0, spec.max_len, "characters", where)
        return value
    if isinstance(spec, _List):
        _sized(value, list, "a list", len(value) if type(value) is list else 0, spec.max_len, "items", where)
        item = spec.item
        # Names are checked at C speed (type set, longest); only a failing list is walked
        # in Python to name the offending index.
        if isinstance(item, _Str):
            if value and (set(map(type, value)) != {str} or max(map(len, value)) > item.max_len):
                _first_bad(
                    value, lambda x: type(x) is str and len(x) <= item.max_len, where,
                    f"str of at most {item.max_len} characters",
                )
            return value
        return [_check(item, x, f"{where}[{i}]") for i, x in enumerate(value)]
    if isinstance(spec, _Bin):
        _sized(value, bytes, "bin (packed bytes)", len(value) if type(value) is bytes else 0, spec.max_len, "entries", where)
        return value
    if isinstance(spec, _U64s):
        count = len(value) // 8 if type(value) is bytes else 0
        _sized(value, bytes, "bin of packed little-endian uint64", count, spec.max_len, "entries", where)
        if u64_array(value, spec.hi) is None:
            if len(value) % 8:
                raise ProtocolError(f"field '{where}': expected a multiple of 8 bytes (packed uint64), got {len(value)}")
            values = np.frombuffer(value, "<u8")
            i = int(np.argmax(values > spec.hi))
            raise ProtocolError(f"field '{where}[{i}]': expected 0..{spec.hi}, got {int(values[i])}")
        return value
    if isinstance(spec, _Map):
        if type(value) is not dict:
            raise ProtocolError(f"field '{where}': expected a map, got {type(value).__name__}")
        if len(value) > spec.max_len:
            raise ProtocolError(f"field '{where}': expected at most {spec.max_len} keys, got {len(value)}")
        for k, x in value.items():
            if type(k) is not str or type(x) not in (str, int, float, bytes, bool):
                raise ProtocolError(f"field '{where}': expected str keys and scalar values, got {_short(k)}: {type(x).__name__}")
        return value
    raise TypeError(f"unknown spec {spec!r}")  # programming error, never peer input


def _check_names(spec: _Names, value: Any, where: str, codec: Codec | None) -> list[str]:
    """The names in a BEGIN's bin; a codec answers its last valid bin with the same list (an RL
    loop sends the same names every step), which callers share and must not mutate."""
    _sized(value, bytes, "bin (UTF-8 names joined by NUL)", len(value) if type(value) is bytes else 0,
           MAX_MESSAGE_BYTES, "bytes", where)
    if not value:  # an empty or reusing BEGIN must not evict the model's names
        return []
    last = codec._names if codec is not None else None
    if last is not None and value == last[0]:
        return last[1]
    count = value.count(b"\0") + 1  # before splitting: each name becomes a Python object
    if count > spec.max_count or count * _NAME_OVERHEAD > 4 * len(value) + _DECODE_SLACK:
        limit = min(spec.max_count, (4 * len(value) + _DECODE_SLACK) // _NAME_OVERHEAD)
        raise ProtocolError(
            f"field '{where}': expected at most {limit} names in a bin of {len(value)} bytes, got {count}; "
            "a decode may cost at most 4x its frame + 64 MiB"
        )
    try:
        names: list[str] = value.decode("utf-8").split("\0")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"field '{where}': expected UTF-8 names, got an invalid byte at {exc.start}") from None
    if names and (min(map(len, names)) == 0 or max(map(len, names)) > spec.max_len):
        _first_bad(names, lambda x: 0 < len(x) <= spec.max_len, where, f"a name of 1 to {spec.max_len} characters")
    if len(set(names)) != len(names):
        raise ProtocolError(f"field '{where}' holds duplicate tensor names; each name must appear once")
    if codec is not None and ".alias" not in where:  # alias names must not evict the model's names
        codec._names = (value, names)
    return names


def _sized(value: Any, kind: type, kind_text: str, size: int, limit: int, unit: str, where: str) -> None:
    if type(value) is not kind:
        raise ProtocolError(f"field '{where}': expected {kind_text}, got {type(value).__name__}")
    if size > limit:
        raise ProtocolError(f"field '{where}': expected at most {limit} {unit}, got {size}")


# --- cross-field rules ---------------------------------------------------------------

def _no_check(msg: Any, codec: Codec | None) -> None:
    return None


_ITEMSIZES = np.array([d.itemsize for d in DTYPES], np.int64)


@dataclass(frozen=True)
class ManifestArrays:
    """A BEGIN's per-tensor arrays, validated; int64 NumPy arrays."""

    codes: np.ndarray  # dtype code per tensor (uint8)
    dims: np.ndarray  # all dims, concatenated
    sizes: np.ndarray  # bytes per tensor


def manifest_arrays(msg: Begin | ManifestPart) -> ManifestArrays:
    """Validate a BEGIN's (or MANIFEST part's) packed arrays and derive per-tensor sizes."""
    return _manifest_arrays(msg, None)


def _manifest_arrays(msg: Begin | ManifestPart, codec: Codec | None) -> ManifestArrays:
    # The codec's last valid BEGIN is answered from memory (by identity): the decode check
    # and the receiver's run both need the arrays of the same message.
    last = codec._valid if codec is not None else None
    if last is not None and last[0] is msg:
        return last[1]
    n = len(msg.names)
    if len(msg.dtypes) != n or len(msg.ndims) != n:
        raise ProtocolError(
            f"BEGIN: names/dtypes/ndims must be parallel arrays; got lengths {n}/{len(msg.dtypes)}/{len(msg.ndims)}"
        )
    if n and max(msg.dtypes) >= len(DTYPES):
        i = next(i for i, c in enumerate(msg.dtypes) if c >= len(DTYPES))
        raise ProtocolError(f"field 'BEGIN.dtypes[{i}]': expected a dtype code 0..{len(DTYPES) - 1}, got {msg.dtypes[i]}")
    if n and max(msg.ndims) > MAX_NDIM:
        i = next(i for i, k in enumerate(msg.ndims) if k > MAX_NDIM)
        raise ProtocolError(f"field 'BEGIN.ndims[{i}]': expected at most {MAX_NDIM} dims, got {msg.ndims[i]}")
    dims = u64_array(msg.dims, MAX_DIM)
    want = sum(msg.ndims)
    if dims is None or len(dims) != want:
        raise ProtocolError(
            f"field 'BEGIN.dims': expected {want} dims (the sum of ndims) of 0..{MAX_DIM}, got {len(msg.dims) // 8}"
        )
    counts = element_counts(msg.ndims, dims)
    codes = np.frombuffer(msg.dtypes, np.uint8)
    if counts is None or (n and float(counts.astype(np.float64).max()) * 8 > MAX_VALUE):
        raise ProtocolError(f"field 'BEGIN.dims': a tensor of more than {MAX_VALUE} bytes; expected real tensor shapes")
    sizes = _ITEMSIZES[codes] * counts
    if float(sizes.sum(dtype=np.float64)) > MAX_VALUE:
        raise ProtocolError(f"BEGIN: tensors of more than {MAX_VALUE} bytes in all; expected a real model")
    return ManifestArrays(codes, dims, sizes)


def _check_begin(msg: Begin, codec: Codec | None) -> None:
    if msg.reuse:  # the rank checks total_bytes and buckets against the manifest it holds
        if msg.layout is None or msg.names or msg.dtypes or msg.ndims or msg.dims:
            raise ProtocolError(
                "BEGIN: field 'reuse': expected a 'layout' and empty names/dtypes/ndims/dims with reuse=True, got "
                f"layout={msg.layout} and {len(msg.names)} names; send either the manifest or its layout alone"
            )
        return
    if msg.parts is not None:  # a first part: its arrays are checked now, the whole once joined
        _manifest_arrays(msg, codec)
        return
    n = len(msg.names)
    if (n == 0) != (msg.buckets == 0):
        raise ProtocolError(
            f"BEGIN: field 'buckets': {msg.buckets} bucket(s) for {n} tensor(s); expected 0 buckets exactly when there are no tensors"
        )
    prev = codec._valid if codec is not None else None
    if prev is not None and same_manifest(msg, prev[0]):  # every step of an RL loop: checked last time
        arrays = prev[1]
    else:  # names were checked (unique, sized) with their field
        arrays = _manifest_arrays(msg, codec)
    _check_aliases(msg)
    total = int(arrays.sizes.sum())
    if total != msg.total_bytes:
        raise ProtocolError(f"BEGIN: field 'total_bytes': expected {total} (sum of tensor sizes), got {msg.total_bytes}")
    if codec is not None:
        codec._valid = (msg, arrays)


def _check_aliases(msg: Begin) -> None:
    names, of = msg.alias_names, msg.alias_of
    if names is None and of is None:
        return
    if names is None or of is None or len(of) // 8 != len(names):
        raise ProtocolError(
            f"BEGIN: fields 'alias_names'/'alias_of' must be parallel arrays; got {len(names or [])} names and "
            f"{len(of or b'') // 8} indices"
        )
    indices = u64_array(of, MAX_VALUE)
    if indices is not None and len(indices) and int(indices.max()) >= len(msg.names):
        i = int(np.argmax(indices >= len(msg.names)))
        raise ProtocolError(
            f"field 'BEGIN.alias_of[{i}]': expected a manifest index 0..{len(msg.names) - 1}, got {int(indices[i])}"
        )
    clash = set(names).intersection(msg.names)
    if clash:
        raise ProtocolError(
            f"BEGIN: alias name(s) {sorted(clash)[:3]} also listed as tensors; a name is either a tensor or an alias"
        )


def _check_manifest_part(msg: ManifestPart, codec: Codec | None) -> None:
    _manifest_arrays(msg, codec)  # the same four packed arrays as a BEGIN


def may_need_split(names: list[str], dims_bytes: int, part_bytes: int = MANIFEST_PART_BYTES) -> bool:
    """Could this manifest exceed one part? (UTF-8 takes at most 4 bytes a character.)"""
    return 4 * sum(map(len, names)) + 3 * len(names) + dims_bytes > part_bytes


def split_begin(msg: Begin, part_bytes: int = MANIFEST_PART_BYTES) -> list[Message]:
    """``msg`` as one BEGIN, or, when its manifest exceeds ``part_bytes``, a BEGIN with the
    first tensors (``parts``) followed by MANIFEST frames with the rest, each under the limit."""
    names = msg.names
    if not names:
        return [msg]
    ndims = np.frombuffer(msg.ndims, np.uint8).astype(np.int64)
    # bytes each tensor adds to a frame: its UTF-8 name, a NUL, a dtype code, its rank, 8 per dim
    utf8 = np.fromiter((len(x.encode("utf-8")) for x in names), np.int64, len(names))
    cost = np.cumsum(utf8 + 3 + 8 * ndims)
    if int(cost[-1]) <= part_bytes:
        return [msg]
    dim_ends = np.cumsum(ndims)
    bounds, start = [], 0
    while start < len(names):
        base = int(cost[start - 1]) if start else 0
        stop = int(np.searchsorted(cost, base + part_bytes, side="right"))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        start = stop

    def arrays(a: int, b: int) -> tuple[list[str], bytes, bytes, bytes]:
        d0 = int(dim_ends[a - 1]) if a else 0
        d1 = int(dim_ends[b - 1])
        return names[a:b], msg.dtypes[a:b], msg.ndims[a:b], msg.dims[8 * d0:8 * d1]

    first_names, first_dtypes, first_ndims, first_dims = arrays(*bounds[0])
    out: list[Message] = [
        replace(msg, names=first_names, dtypes=first_dtypes, ndims=first_ndims, dims=first_dims, parts=len(bounds))
    ]
    for i, (a, b) in enumerate(bounds[1:], 1):
        part_names, dtypes, part_ndims, dims = arrays(a, b)
        out.append(ManifestPart(version=msg.version, part=i, names=part_names, dtypes=dtypes, ndims=part_ndims, dims=dims))
    return out


def join_manifest(first: Begin, rest: list[ManifestPart]) -> Begin:
    """A split manifest's BEGIN and its MANIFEST frames as one BEGIN, checked as a whole."""
    return _join_manifest(first, rest, None)


def _join_manifest(first: Begin, rest: list[ManifestPart], codec: Codec | None) -> Begin:
    if first.parts is None or len(rest) != first.parts - 1:
        raise ProtocolError(
            f"BEGIN {first.version!r}: expected {0 if first.parts is None else first.parts - 1} MANIFEST frames, got {len(rest)}"
        )
    pieces: list[Begin | ManifestPart] = [first, *rest]
    names = [n for part in pieces for n in part.names]
    if len(set(names)) != len(names):
        raise ProtocolError(f"BEGIN {first.version!r}: its MANIFEST parts hold duplicate tensor names; each name must appear once")
    whole = replace(
        first,
        names=names,
        dtypes=b"".join(p.dtypes for p in pieces),
        ndims=b"".join(p.ndims for p in pieces),
        dims=b"".join(p.dims for p in pieces),
        parts=None,
    )
    _check_begin(whole, codec)
    return whole


def same_manifest(a: Begin, b: Begin) -> bool:
    """Byte-identical packed arrays and equal names; compared at C speed."""
    same_names = a.names is b.names or a.names == b.names  # decode shares one list while the names repeat
    return a.dims == b.dims and a.dtypes == b.dtypes and a.ndims == b.ndims and same_names


def _check_bucket(msg: Bucket, codec: Codec | None) -> None:
    lengths = (len(msg.offsets), len(msg.nbytes), len(msg.chunks))
    if msg.count is not None and any(lengths):
        raise ProtocolError(
            f"BUCKET: field 'count': expected empty offsets/nbytes/chunks with count={msg.count} (a packed bucket), "
            f"got {lengths[0] // 8}/{lengths[1] // 8}/{lengths[2] // 8} entries; send either count or the arrays"
        )
    if lengths[0] != lengths[1] or lengths[0] != lengths[2]:
        raise ProtocolError(
            f"BUCKET: offsets/nbytes/chunks must be parallel arrays; got {lengths[0] // 8}/{lengths[1] // 8}/{lengths[2] // 8} entries"
        )


_CROSS_CHECKS: dict[str, Any] = {"BEGIN": _check_begin, "MANIFEST": _check_manifest_part, "BUCKET": _check_bucket}


def check_bucket_fits(msg: Bucket, slot_sizes: list[int], alignment: int) -> None:
    """Context checks: the slot exists and every entry lies inside it, aligned. A packed
    bucket's entries are aligned by construction; whether they fit needs the manifest
    (see ``packed_entries``)."""
    if msg.slot >= len(slot_sizes):
        raise ProtocolError(f"BUCKET {msg.seq}: field 'slot': expected 0..{len(slot_sizes) - 1}, got {msg.slot}")
    if not msg.offsets:
        return
    size = slot_sizes[msg.slot]
    offsets, nbytes, _ = msg.arrays()
    ends = offsets + nbytes  # decode bounded both, so no overflow
    misaligned = offsets % alignment != 0
    outside = ends > size
    if misaligned.any() or outside.any():
        i = int(np.argmax(misaligned | outside))  # only a bad frame pays for naming the entry
        off, end = int(offsets[i]), int(ends[i])
        if misaligned[i]:
            raise ProtocolError(f"BUCKET {msg.seq}: entry {i}: offset {off} is not aligned to {alignment} bytes")
        raise ProtocolError(f"BUCKET {msg.seq}: entry {i}: bytes {off}..{end} lie outside slot {msg.slot} of {size} bytes")


def packed_entries(
    msg: Bucket, sizes: np.ndarray, alignment: int, slot_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A packed BUCKET's (offsets, nbytes, chunks) from the manifest's tensor sizes (int64):
    tensors ``first`` .. ``first + count - 1`` whole, packed from 0; checked to fit the slot."""
    first, count = msg.first, msg.count or 0
    if first + count > len(sizes):
        raise ProtocolError(
            f"BUCKET {msg.seq}: {count} tensors from manifest index {first} run past the {len(sizes)} tensors of "
            f"{msg.version!r}"
        )
    nbytes = sizes[first:first + count]
    offsets = packed_offsets(nbytes, alignment)
    end = int(offsets[-1] + nbytes[-1]) if count else 0
    if end > slot_size:
        raise ProtocolError(
            f"BUCKET {msg.seq}: {count} tensors from manifest index {first} need {end} bytes packed, more than "
            f"slot {msg.slot} of {slot_size} bytes"
        )
    return offsets, nbytes, np.zeros(count, np.int64)


class ErrorReplyLimiter:
    """Decides whether a decode failure deserves an ERROR reply.

    Never answer an ERROR with an ERROR (two mismatched peers would bounce
    errors forever), and send at most one reply per ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self._interval = interval
        self._last = -1e9

    def allow(self, exc: ProtocolError, now: float) -> bool:
        if getattr(exc, "msg_type", None) == "ERROR" or now - self._last < self._interval:
            return False
        self._last = now
        return True
