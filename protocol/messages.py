"""Wire messages: typed classes, a msgpack codec and strict structural validation.

Every frame is one msgpack map ``{"type": NAME, "v": PROTOCOL_VERSION, ...fields}``.
Decoding never trusts the peer: size limits are applied by msgpack itself, then
every field is checked for presence, type and range, and cross-field rules
(parallel arrays of equal length, ``nbytes`` consistent with dtype and shape)
are enforced. Anything wrong raises :class:`ProtocolError` naming the field.

Checks that need session context (slot count and size) live in
:func:`check_bucket_fits`, called by the receiver once it knows its slots.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from itertools import chain, repeat
from operator import add, mul
from typing import Any, ClassVar

import msgpack

from .dtypes import DTYPES
from .errors import ProtocolError
from .gc_pause import gc_paused

PROTOCOL_VERSION = 1
ALIGNMENT = 256

# Decoder limits: a hostile or broken peer must not make us allocate without bound.
MAX_MESSAGE_BYTES = 256 << 20
MAX_ENTRIES = 4_000_000
MAX_NAME_LEN = 1024
MAX_NDIM = 16
MAX_TEXT_LEN = 64 << 10
MAX_SLOTS = 64
MAX_DIM = 1 << 48

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
class _Map:
    """A small map of scalar values (transport slot descriptors, stats)."""

    max_len: int = 32


def _spec(kind: Any, **kw: Any) -> Any:
    return field(metadata={"spec": kind}, **kw)


_RANK = _Int(0, 1 << 20)
_VERSION = _Str(MAX_NAME_LEN)
_SESSION = _Str(64)
_NAMES = _List(_Str(MAX_NAME_LEN))
_DTYPES = _List(_Int(0, len(DTYPES) - 1))
_SHAPES = _List(_List(_Int(0, MAX_DIM), MAX_NDIM))
_OFFSETS = _List(_Int())


class Message:
    """Base of all wire messages; subclasses are dataclasses with a TYPE."""

    TYPE: ClassVar[str] = ""


def _message(cls: type) -> type:
    cls = dataclass(frozen=True, slots=True)(cls)
    _REGISTRY[cls.TYPE] = cls
    _FIELDS[cls.TYPE] = tuple((f.name, f.metadata["spec"], f.default is MISSING) for f in fields(cls))
    return cls


_REGISTRY: dict[str, type] = {}
_FIELDS: dict[str, tuple[tuple[str, Any, bool], ...]] = {}


# --- the messages ------------------------------------------------------------------

@_message
class Hello(Message):
    TYPE = "HELLO"
    rank: int = _spec(_RANK)
    session: str = _spec(_SESSION)
    transports: list[str] = _spec(_List(_Str(32), 16))
    host: str = _spec(_Str(256))
    device: str = _spec(_Str(256))
    pid: int = _spec(_Int())


@_message
class Welcome(Message):
    TYPE = "WELCOME"
    session: str = _spec(_SESSION)
    transport: str = _spec(_Str(32))
    bucket_bytes: int = _spec(_Int(1))
    alignment: int = _spec(_Int(1, 1 << 20))
    slots: list[dict[str, Any]] = _spec(_List(_Map(), MAX_SLOTS))
    heartbeat_interval: float = _spec(_Float(0.001, 3600.0))
    heartbeat_timeout: float = _spec(_Float(0.001, 86400.0))
    pid: int = _spec(_Int())


@_message
class Begin(Message):
    TYPE = "BEGIN"
    version: str = _spec(_VERSION)
    names: list[str] = _spec(_NAMES)
    dtypes: list[int] = _spec(_DTYPES)
    shapes: list[list[int]] = _spec(_SHAPES)
    total_bytes: int = _spec(_Int())
    buckets: int = _spec(_Int(0, MAX_ENTRIES))
    # accept a version older than the rank's committed one (a deliberate rollback)
    force: bool | None = _spec(bool, default=None)


@_message
class Ready(Message):
    TYPE = "READY"
    version: str = _spec(_VERSION)


@_message
class Reject(Message):
    TYPE = "REJECT"
    version: str = _spec(_VERSION)
    error: str = _spec(_Str(64))
    reason: str = _spec(_Str())


@_message
class Bucket(Message):
    TYPE = "BUCKET"
    version: str = _spec(_VERSION)
    seq: int = _spec(_Int(0, MAX_ENTRIES))
    slot: int = _spec(_Int(0, MAX_SLOTS - 1))
    names: list[str] = _spec(_NAMES)
    dtypes: list[int] = _spec(_DTYPES)
    shapes: list[list[int]] = _spec(_SHAPES)
    offsets: list[int] = _spec(_OFFSETS)
    nbytes: list[int] = _spec(_OFFSETS)
    # byte offset of each piece inside its tensor; all zero unless a tensor is chunked
    chunks: list[int] = _spec(_OFFSETS)
    # xxh3_64 of the slot bytes [0, end of last piece) when the sender enables checksums
    checksum: int | None = _spec(_Int(0, (1 << 64) - 1), default=None)


@_message
class Ack(Message):
    TYPE = "ACK"
    version: str = _spec(_VERSION)
    seq: int = _spec(_Int(0, MAX_ENTRIES))


@_message
class Commit(Message):
    TYPE = "COMMIT"
    version: str = _spec(_VERSION)


@_message
class Committed(Message):
    TYPE = "COMMITTED"
    version: str = _spec(_VERSION)
    tensors: int = _spec(_Int())
    bytes: int = _spec(_Int())
    seconds: float = _spec(_Float())


@_message
class Failed(Message):
    TYPE = "FAILED"
    version: str = _spec(_VERSION)
    error: str = _spec(_Str(64))
    message: str = _spec(_Str())
    model_intact: bool = _spec(bool, default=True)


@_message
class Error(Message):
    TYPE = "ERROR"
    error: str = _spec(_Str(64))
    message: str = _spec(_Str())
    # the version the error is about; a sender fails only that version's round
    version: str | None = _spec(_VERSION, default=None)


@_message
class Abort(Message):
    TYPE = "ABORT"
    version: str = _spec(_VERSION)
    reason: str = _spec(_Str())


@_message
class Ping(Message):
    TYPE = "PING"
    session: str = _spec(_SESSION)


@_message
class Pong(Message):
    TYPE = "PONG"
    session: str = _spec(_SESSION)


@_message
class Bye(Message):
    TYPE = "BYE"
    reason: str = _spec(_Str())


# --- codec ---------------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    """Serialise a message to one msgpack frame."""
    body: dict[str, Any] = {"type": msg.TYPE, "v": PROTOCOL_VERSION}
    for name, _spec_, required in _FIELDS[msg.TYPE]:
        value = getattr(msg, name)
        if required or value is not None:  # optional fields travel only when set
            body[name] = value
    if msg.TYPE in _BULK:
        with gc_paused():
            return msgpack.packb(body, use_bin_type=True)
    return msgpack.packb(body, use_bin_type=True)


_BULK = frozenset({"BEGIN", "BUCKET"})  # per-tensor arrays: see gc_pause
_BULK_FRAME = 64 << 10


def decode(frame: bytes) -> Message:
    """Parse and validate one frame; raise :class:`ProtocolError` naming what is wrong."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a bytes frame, got {type(frame).__name__}")
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"message of {len(frame)} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes; "
            "split the model into fewer tensors per bucket or raise MAX_MESSAGE_BYTES on both sides"
        )
    if len(frame) > _BULK_FRAME:
        with gc_paused():
            return _decode(frame)
    return _decode(frame)


def _decode(frame: bytes | bytearray | memoryview) -> Message:
    try:
        body = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=MAX_ENTRIES,
            max_map_len=64,
            max_str_len=MAX_TEXT_LEN,
            max_bin_len=1 << 16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__}: {exc}); expected one msgpack map") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(body).__name__}")
    kind = body.get("type")
    try:
        return _decode_body(kind, body)
    except ProtocolError as exc:
        exc.msg_type = kind if isinstance(kind, str) else None  # lets a peer avoid answering ERROR with ERROR
        raise


def _decode_body(kind: Any, body: dict[Any, Any]) -> Message:
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
    for name, spec, required in _FIELDS[kind]:
        if name not in body:
            if required:
                raise ProtocolError(f"{kind}: missing field '{name}'")
            continue
        values[name] = _check(spec, body[name], f"{kind}.{name}")
    extra = set(body) - {"type", "v"} - set(values) - {n for n, _, _ in _FIELDS[kind]}
    if extra:
        raise ProtocolError(f"{kind}: unexpected field(s) {sorted(map(str, extra))[:5]}")
    msg = cls(**values)
    _CROSS_CHECKS.get(kind, _no_check)(msg)
    return msg  # type: ignore[no-any-return]


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
        if type(value) is not str:
            raise ProtocolError(f"field '{where}': expected str, got {type(value).__name__}")
        if len(value) > spec.max_len:
            raise ProtocolError(f"field '{where}': expected at most {spec.max_len} characters, got {len(value)}")
        return value
    if isinstance(spec, _List):
        if type(value) is not list:
            raise ProtocolError(f"field '{where}': expected a list, got {type(value).__name__}")
        if len(value) > spec.max_len:
            raise ProtocolError(f"field '{where}': expected at most {spec.max_len} items, got {len(value)}")
        item = spec.item
        # The big parallel arrays of BUCKET/BEGIN are checked at C speed (type sets, min/max);
        # only a failing list is walked in Python to name the offending index.
        if isinstance(item, _Int):
            if value and (set(map(type, value)) != {int} or min(value) < item.lo or max(value) > item.hi):
                _first_bad(value, lambda x: type(x) is int and item.lo <= x <= item.hi, where, f"int {item.lo}..{item.hi}")
            return value
        if isinstance(item, _Str):
            if value and (set(map(type, value)) != {str} or max(map(len, value)) > item.max_len):
                _first_bad(
                    value, lambda x: type(x) is str and len(x) <= item.max_len, where,
                    f"str of at most {item.max_len} characters",
                )
            return value
        if isinstance(item, _List) and isinstance(item.item, _Int):  # shapes: a list of int lists
            lo, hi, max_len = item.item.lo, item.item.hi, item.max_len
            if value and (set(map(type, value)) != {list} or max(map(len, value)) > max_len):
                _first_bad(value, lambda x: type(x) is list and len(x) <= max_len, where, f"a list of at most {max_len} ints")
            flat = list(chain.from_iterable(value))
            if flat and (set(map(type, flat)) != {int} or min(flat) < lo or max(flat) > hi):
                _first_bad(
                    value, lambda x: all(type(d) is int and lo <= d <= hi for d in x), where, f"a list of ints {lo}..{hi}"
                )
            return value
        return [_check(item, x, f"{where}[{i}]") for i, x in enumerate(value)]
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


# --- cross-field rules ---------------------------------------------------------------

def _no_check(msg: Any) -> None:
    return None


_ITEMSIZES = tuple(d.itemsize for d in DTYPES)


def tensor_sizes(dtype_codes: list[int], shapes: list[list[int]]) -> list[int]:
    """Bytes of every tensor; C-level iteration, so 100k entries cost milliseconds.

    The last result is remembered by the identity of its inputs: a BEGIN's sizes are
    needed by its decode check and again by the receiver's run, from the same lists.
    """
    global _last_sizes
    last = _last_sizes
    if last is not None and last[0] is dtype_codes and last[1] is shapes and len(last[2]) == len(shapes):
        return last[2]
    sizes = list(map(mul, map(_ITEMSIZES.__getitem__, dtype_codes), map(math.prod, shapes)))
    _last_sizes = (dtype_codes, shapes, sizes)
    return sizes


_last_sizes: tuple[list[int], list[list[int]], list[int]] | None = None


def _check_begin(msg: Begin) -> None:
    n = len(msg.names)
    if len(msg.dtypes) != n or len(msg.shapes) != n:
        raise ProtocolError(
            f"BEGIN: names/dtypes/shapes must be parallel arrays; got lengths {n}/{len(msg.dtypes)}/{len(msg.shapes)}"
        )
    if (n == 0) != (msg.buckets == 0):
        raise ProtocolError(
            f"BEGIN: field 'buckets': {msg.buckets} bucket(s) for {n} tensor(s); expected 0 buckets exactly when there are no tensors"
        )
    if len(set(msg.names)) != n:
        raise ProtocolError("BEGIN: field 'names' holds duplicate tensor names; each name must appear once")
    total = sum(tensor_sizes(msg.dtypes, msg.shapes))
    if total != msg.total_bytes:
        raise ProtocolError(f"BEGIN: field 'total_bytes': expected {total} (sum of tensor sizes), got {msg.total_bytes}")


def _check_bucket(msg: Bucket) -> None:
    n = len(msg.names)
    lengths = (len(msg.dtypes), len(msg.shapes), len(msg.offsets), len(msg.nbytes), len(msg.chunks))
    if any(x != n for x in lengths):
        raise ProtocolError(
            f"BUCKET: names/dtypes/shapes/offsets/nbytes/chunks must be parallel arrays; got lengths {(n, *lengths)}"
        )
    fulls = tensor_sizes(msg.dtypes, msg.shapes)
    ends = list(map(add, msg.chunks, msg.nbytes))
    if any(map(int.__gt__, ends, fulls)) or (0 in msg.nbytes and any(map(bool, fulls))):
        for i, (full, end) in enumerate(zip(fulls, ends)):  # only a bad frame pays for naming the entry
            if end > full:
                raise ProtocolError(
                    f"BUCKET: entry {i} ('{msg.names[i][:80]}'): chunk at byte {msg.chunks[i]} of {msg.nbytes[i]} bytes "
                    f"runs past the tensor's {full} bytes (dtype {DTYPES[msg.dtypes[i]].name}, shape {msg.shapes[i]})"
                )
            if msg.nbytes[i] == 0 and full != 0:
                raise ProtocolError(f"BUCKET: entry {i} ('{msg.names[i][:80]}'): empty piece of a non-empty tensor")


_CROSS_CHECKS: dict[str, Any] = {"BEGIN": _check_begin, "BUCKET": _check_bucket}


def check_bucket_fits(msg: Bucket, slot_sizes: list[int], alignment: int) -> None:
    """Context checks: the slot exists and every entry lies inside it, aligned."""
    if msg.slot >= len(slot_sizes):
        raise ProtocolError(f"BUCKET {msg.seq}: field 'slot': expected 0..{len(slot_sizes) - 1}, got {msg.slot}")
    size = slot_sizes[msg.slot]
    ends = list(map(add, msg.offsets, msg.nbytes))
    if (ends and max(ends) > size) or any(map(int.__mod__, msg.offsets, repeat(alignment))):
        for i, (off, end) in enumerate(zip(msg.offsets, ends)):
            if off % alignment:
                raise ProtocolError(f"BUCKET {msg.seq}: entry {i}: offset {off} is not aligned to {alignment} bytes")
            if end > size:
                raise ProtocolError(
                    f"BUCKET {msg.seq}: entry {i}: bytes {off}..{end} lie outside slot {msg.slot} of {size} bytes"
                )



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
