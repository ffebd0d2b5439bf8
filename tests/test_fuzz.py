"""Fuzzing the wire decoder: whatever the bytes, ``decode`` returns a valid message or
raises ProtocolError, nothing else. Plus a live daemon fed mutated frames.

Default run: derandomized, ~2k examples. ``-m slow``: >= 100k examples from a printed
seed (set WS_FUZZ_SEED to replay one).
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import msgpack
import numpy as np
import pytest
from fault_workers import HB, Collector, FakeSender, digests, make_weights, wait_until
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from weightstream import ProtocolError, ReceiverDaemon
from weightstream.protocol import messages as m
from weightstream.protocol.dtypes import DTYPES
from weightstream.protocol.packed import pack_u64

SLOW_SEED = int(os.environ.get("WS_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
FAST = {"bytes": 500, "nested": 600, "mutated": 1000}
SLOW = {"bytes": 55_000, "nested": 20_000, "mutated": 30_000}

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    "print_blob": True,
}


def fast(n: int) -> Any:
    return settings(max_examples=n, derandomize=True, **_COMMON)


def slow(n: int) -> Any:
    def wrap(fn: Any) -> Any:
        return seed(SLOW_SEED)(settings(max_examples=n, **_COMMON)(fn))

    return wrap


def check_frame(frame: bytes) -> m.Message | None:
    """The property: a valid message that round-trips, or ProtocolError; anything else fails."""
    try:
        msg = m.decode(frame)
    except ProtocolError:
        return None
    assert isinstance(msg, m.Message)
    assert m.decode(m.encode(msg)) == msg
    return msg


# --- strategies -------------------------------------------------------------------------------------

V = m.PROTOCOL_VERSION
INT64 = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack can carry
EDGE_INTS = st.sampled_from([-1, -(1 << 63), (1 << 63) - 1, 1 << 63, (1 << 64) - 1, m.MAX_ENTRIES + 1, m.MAX_DIM + 1,
                             m.MAX_SLOTS, len(DTYPES), (1 << 20) + 1, 0])
scalars = st.one_of(
    st.none(), st.booleans(), INT64, EDGE_INTS, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.binary(max_size=20),
)
any_value = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["type", "v", "names", "version"])), inner, max_size=4),
    ),
    max_leaves=10,
)
type_names = st.sampled_from(sorted(m._REGISTRY))
nested_maps = st.one_of(
    any_value,
    st.dictionaries(st.one_of(st.text(max_size=6), INT64, st.binary(max_size=4)), any_value, max_size=4),
    st.fixed_dictionaries({"type": type_names, "v": st.sampled_from([V, V, 1, V + 1, str(V), True, float(V)])},
                          optional={"version": any_value, "names": any_value, "session": any_value,
                                    "seq": any_value, "dims": any_value, "offsets": any_value,
                                    "slots": any_value}),
)

name = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)  # NUL separates names
version = st.text(min_size=1, max_size=16)
session = st.text(max_size=16)
text = st.text(max_size=40)
count = st.integers(0, 1 << 40)
seconds = st.floats(0, 1e6, allow_nan=False)


@st.composite
def tensors(draw: Any) -> tuple[list[str], list[int], list[list[int]]]:
    names = draw(st.lists(name, max_size=5, unique=True))
    codes = [draw(st.integers(0, len(DTYPES) - 1)) for _ in names]
    shapes = [draw(st.lists(st.integers(0, 5), max_size=3)) for _ in names]
    return names, codes, shapes


def sizes_of(codes: list[int], shapes: list[list[int]]) -> list[int]:
    return [DTYPES[c].itemsize * math.prod(s) for c, s in zip(codes, shapes)]


@st.composite
def begin(draw: Any) -> m.Begin:
    names, codes, shapes = draw(tensors())
    total = sum(sizes_of(codes, shapes))
    buckets = draw(st.integers(1, 100)) if names else 0  # zero buckets exactly when there are no tensors
    layout = draw(st.none() | st.integers(1, 1 << 62))
    if layout is not None and draw(st.booleans()):  # protocol v5: a repeated manifest named by its layout
        return m.Begin.reusing(draw(version), layout, total, buckets, draw(st.none() | st.booleans()))
    return m.Begin.build(version=draw(version), names=names, dtypes=codes, shapes=shapes, total_bytes=total,
                         buckets=buckets, force=draw(st.none() | st.booleans()), layout=layout)


@st.composite
def bucket(draw: Any) -> m.Bucket:
    names, codes, shapes = draw(tensors())
    sizes = sizes_of(codes, shapes)
    offsets = [draw(st.integers(0, 1 << 30)) * m.ALIGNMENT for _ in names]
    if names and draw(st.booleans()):  # protocol v5: a packed bucket sends only its count
        return m.Bucket(draw(version), draw(st.integers(0, 1000)), draw(st.integers(0, m.MAX_SLOTS - 1)),
                        draw(st.integers(0, 1000)), b"", b"", b"", draw(st.none() | st.integers(0, (1 << 64) - 1)),
                        draw(st.none() | st.booleans()), len(names))
    return m.Bucket.build(version=draw(version), seq=draw(st.integers(0, 1000)), slot=draw(st.integers(0, m.MAX_SLOTS - 1)),
                          first=draw(st.integers(0, 1000)), offsets=offsets, nbytes=sizes, chunks=[0] * len(names),
                          checksum=draw(st.none() | st.integers(0, (1 << 64) - 1)))


slot_desc = st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers(0, 1 << 40), st.booleans()), max_size=4)
valid_messages = st.one_of(
    st.builds(m.Hello, rank=st.integers(0, 1 << 20), session=session, transports=st.lists(st.sampled_from(["shm", "cuda_ipc"]), max_size=3),
              host=text, device=text, pid=count),
    st.builds(m.Welcome, session=session, transport=st.just("shm"), bucket_bytes=st.integers(1, 1 << 40),
              alignment=st.integers(1, 1 << 20), slots=st.lists(slot_desc, max_size=4),
              heartbeat_interval=st.floats(0.001, 3600), heartbeat_timeout=st.floats(0.001, 86400), pid=count),
    begin(),
    bucket(),
    st.builds(m.Ready, version=version),
    st.builds(m.Reject, version=version, error=st.text(max_size=20), reason=text),
    st.builds(m.Ack, version=version, seq=st.integers(0, 1000)),
    st.builds(m.Commit, version=version),
    st.builds(m.Committed, version=version, tensors=count, bytes=count, seconds=seconds),
    st.builds(m.Failed, version=version, error=st.text(max_size=20), message=text, model_intact=st.booleans()),
    st.builds(m.Error, error=st.text(max_size=20), message=text),
    st.builds(m.Abort, version=version, reason=text),
    st.builds(m.Ping, session=session),
    st.builds(m.Pong, session=session),
    st.builds(m.Bye, reason=text),
)


def _paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if depth >= 3:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            out += _paths(v, (*prefix, i), depth + 1)
    return out


def _set(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        body = body[p]
    body[path[-1]] = value


def _get(body: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        body = body[p]
    return body


PARALLEL = ("names", "dtypes", "ndims", "dims", "offsets", "nbytes", "chunks")
LIMITS = {"transports": 16, "slots": m.MAX_SLOTS}


@st.composite
def mutated_frames(draw: Any) -> bytes:
    msg = draw(valid_messages)
    assert check_frame(m.encode(msg)) == msg  # the generator itself makes valid messages
    body = msgpack.unpackb(m.encode(msg), raw=False)
    kind = draw(st.sampled_from(["swap", "swap", "int", "delete", "extra", "type", "v", "parallel", "huge", "long_str"]))
    paths = _paths(body)
    if kind == "swap":  # replace any field or nested item with any value
        _set(body, draw(st.sampled_from(paths)), draw(any_value))
    elif kind == "int":  # an out-of-range (or edge) integer anywhere an int lives
        ints = [p for p in paths if type(_get(body, p)) is int]
        if ints:
            _set(body, draw(st.sampled_from(ints)), draw(EDGE_INTS | INT64))
    elif kind == "delete":
        del body[draw(st.sampled_from(sorted(body)))]
    elif kind == "extra":
        body[draw(st.text(max_size=10))] = draw(any_value)
    elif kind == "type":
        body["type"] = draw(type_names | st.text(max_size=10))
    elif kind == "v":
        body["v"] = draw(st.sampled_from([0, 1, V + 1, -1, str(V), float(V), True, None, [V]]))
    elif kind == "parallel":  # wrong lengths in parallel arrays, packed or not
        fields = [f for f in PARALLEL if f in body]
        if fields:
            f = draw(st.sampled_from(fields))
            if type(body[f]) is bytes:  # drop, add or tear packed entries
                cut = draw(st.integers(0, 9))
                body[f] = body[f][:-cut] if cut and draw(st.booleans()) else body[f] + draw(st.binary(min_size=1, max_size=9))
            elif body[f] and draw(st.booleans()):
                body[f].pop(draw(st.integers(0, len(body[f]) - 1)))
            else:
                body[f].append(draw(any_value | st.just(0) | st.just("x") | st.just([1])))
    elif kind == "huge":  # arrays at and past their limits
        if body.get("ndims"):
            body["ndims"] = bytes([draw(st.sampled_from([m.MAX_NDIM, m.MAX_NDIM + 1, 255]))]) + body["ndims"][1:]
        if body.get("dims"):
            body["dims"] = pack_u64([draw(st.sampled_from([m.MAX_DIM, m.MAX_DIM + 1, (1 << 64) - 1]))]) + body["dims"][8:]
        for f, limit in LIMITS.items():
            if f in body:
                item = body[f][0] if body[f] else ({} if f == "slots" else "shm")
                body[f] = [item] * draw(st.sampled_from([limit, limit + 1]))
        if "names" in body:
            n = draw(st.sampled_from([1000, 20_000]))
            body["names"] = "\0".join(f"t{i}" for i in range(n)).encode()
    elif kind == "long_str":
        strs = [p for p in paths if type(_get(body, p)) is str]
        if strs:
            n = draw(st.sampled_from([m.MAX_NAME_LEN, m.MAX_NAME_LEN + 1, 64 + 1, m.MAX_TEXT_LEN + 1]))
            _set(body, draw(st.sampled_from(strs)), "x" * n)
    return msgpack.packb(body, use_bin_type=True)


# --- property tests -------------------------------------------------------------------------------------


def _bytes_case(frame: bytes) -> None:
    check_frame(frame)


def _nested_case(value: Any) -> None:
    check_frame(msgpack.packb(value, use_bin_type=True))


def _mutated_case(frame: bytes) -> None:
    check_frame(frame)


frames_st = st.one_of(st.binary(max_size=256), valid_messages.map(m.encode).map(lambda b: b[: len(b) // 2]))


@pytest.mark.timeout(60)
@fast(FAST["bytes"])
@given(frames_st)
def test_fuzz_arbitrary_bytes(frame: bytes) -> None:
    _bytes_case(frame)


@pytest.mark.timeout(60)
@fast(FAST["nested"])
@given(nested_maps)
def test_fuzz_msgpack_structures(value: Any) -> None:
    _nested_case(value)


@pytest.mark.timeout(90)
@fast(FAST["mutated"])
@given(mutated_frames())
def test_fuzz_mutated_messages(frame: bytes) -> None:
    _mutated_case(frame)


@pytest.mark.slow
@pytest.mark.timeout(900)
@slow(SLOW["bytes"])
@given(frames_st)
def test_fuzz_arbitrary_bytes_slow(frame: bytes) -> None:
    _bytes_case(frame)


@pytest.mark.slow
@pytest.mark.timeout(900)
@slow(SLOW["nested"])
@given(nested_maps)
def test_fuzz_msgpack_structures_slow(value: Any) -> None:
    _nested_case(value)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@slow(SLOW["mutated"])
@given(mutated_frames())
def test_fuzz_mutated_messages_slow(frame: bytes) -> None:
    _mutated_case(frame)


def test_print_slow_seed() -> None:
    print(f"slow fuzz seed: {SLOW_SEED} (replay with WS_FUZZ_SEED={SLOW_SEED})")


@pytest.mark.timeout(60)
def test_limits_at_the_edge() -> None:
    """The biggest legal parallel arrays decode; one item more is a ProtocolError."""
    n = m.MAX_ENTRIES
    body = {"type": "BEGIN", "v": V, "version": "v", "names": b"", "dtypes": bytes(n), "ndims": b"", "dims": b"",
            "total_bytes": 0, "buckets": 0}
    with pytest.raises(ProtocolError, match="parallel"):
        m.decode(msgpack.packb(body))  # decodes the 4M-entry array, then fails the cross-check
    body["dtypes"] = bytes(n + 1)
    with pytest.raises(ProtocolError, match="at most"):
        m.decode(msgpack.packb(body))
    bucket = {"type": "BUCKET", "v": V, "version": "v", "seq": 0, "slot": 0, "first": 0, "offsets": bytes(8 * n),
              "nbytes": bytes(8 * n), "chunks": bytes(8 * n)}
    assert len(m.decode(msgpack.packb(bucket))) == n  # type: ignore[arg-type]
    bucket["chunks"] = bytes(8 * (n + 1))
    with pytest.raises(ProtocolError, match="at most"):
        m.decode(msgpack.packb(bucket))
    with pytest.raises(ProtocolError):
        m.decode(b"\xdd\xff\xff\xff\xff")  # an array header claiming 4G items, no items
    with pytest.raises(ProtocolError):
        m.decode(msgpack.packb({"type": "BYE", "v": V, "reason": "x" * (m.MAX_TEXT_LEN + 1)}))


# --- a live daemon under mutated frames --------------------------------------------------------------------


def _bad_frames(rng: random.Random, version: str, count: int) -> list[list[bytes]]:
    """Frames that must not disturb ``version``: undecodable ones, and decodable ones a
    sender never sends or that name another version."""
    out: list[list[bytes]] = []
    good = [
        m.Hello(rank=0, session="s", transports=["shm"], host="h", device="", pid=1),
        m.Begin.build(version=version, names=["a"], dtypes=[8], shapes=[[2]], total_bytes=8, buckets=1),
        m.Bucket.build(version=version, seq=0, slot=0, first=0, offsets=[0], nbytes=[8], chunks=[0]),
        m.Commit(version=version),
        m.Abort(version=version, reason="r"),
        m.Welcome(session="other", transport="shm", bucket_bytes=1, alignment=256, slots=[], heartbeat_interval=1.0,
                  heartbeat_timeout=2.0, pid=1),
        m.Bye(reason="r"),
    ]
    harmless = [
        m.Ready(version=version), m.Ack(version=version, seq=0), m.Committed(version=version, tensors=1, bytes=1, seconds=1.0),
        m.Reject(version=version, error="X", reason="r"), m.Hello(rank=0, session="s", transports=[], host="", device="", pid=1),
        m.Bucket.build(version="zz", seq=0, slot=0, first=0, offsets=[], nbytes=[], chunks=[]),
        m.Commit(version="zz"), m.Abort(version="zz", reason="r"), m.Error(error="E", message="m"),
    ]
    while len(out) < count:
        r = rng.random()
        if r < 0.15:
            out.append([rng.randbytes(rng.randrange(0, 64))])
        elif r < 0.25:
            out.append([m.encode(rng.choice(harmless))])
        elif r < 0.3:
            out.append([m.encode(rng.choice(harmless)), b"extra"])
        else:
            body = msgpack.unpackb(m.encode(rng.choice(good)), raw=False)
            path = rng.choice(_paths(body))
            _set(body, path, rng.choice([None, -1, 1 << 63, "x", [], {}, 1.5, b"\x00", [[-1]], True]))
            frame = msgpack.packb(body, use_bin_type=True)
            try:
                m.decode(frame)
            except ProtocolError:
                out.append([frame])  # only frames the decoder rejects: a valid BEGIN/ABORT would rightly change things
    return out


@pytest.mark.timeout(90)
def test_daemon_commits_between_mutated_frames(endpoint: str) -> None:
    rng_seed = 99
    rng = random.Random(rng_seed)
    print(f"seed={rng_seed}")
    collector = Collector()
    fake = FakeSender(endpoint)
    sent = 0
    try:
        with ReceiverDaemon(endpoint, collector, rank=0, **HB) as daemon:
            ident = fake.wait_hello()
            assert wait_until(lambda: daemon.status.connected, 5)
            for v in ("v1", "v2", "v3"):
                named = make_weights(9, v)[:5]

                def noise(v: str = v) -> None:
                    nonlocal sent
                    for frames in _bad_frames(rng, v, 150):
                        fake.send_raw(ident, *frames)
                        sent += 1

                noise()
                fake.send_msg(ident, fake.begin(v, named))
                noise()
                fake.expect((m.Ready,), 10, lambda x, v=v: x.version == v)
                noise()
                fake.send_msg(ident, fake.bucket_messages(v, named, checksum=True))
                noise()
                fake.expect((m.Prepared,), 10, lambda x, v=v: x.version == v)
                fake.send_msg(ident, m.Commit(version=v))
                noise()
                fake.expect((m.Committed,), 10, lambda x, v=v: x.version == v)
                daemon.wait_for_version(v, 5)
                assert collector.digests() == digests(named)
                st = daemon.status
                assert st.model_intact and st.connected and st.committed_version == v, st
            print(f"sent {sent} bad frames; last_error={daemon.status.last_error!r:.120}")
            assert daemon.status.last_error is not None  # the noise was noticed, and ignored
            assert np.array_equal(collector.state[named[0][0]].view(np.uint8), named[0][1].view(np.uint8))
    finally:
        fake.close()
