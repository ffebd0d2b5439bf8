"""The wire codec: every message round-trips, and decode lets only ProtocolError escape."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightstream.protocol import messages as m
from weightstream.protocol.errors import (
    ManifestMismatch,
    ProtocolError,
    RemoteError,
    VersionAborted,
    WeightstreamError,
    from_wire,
    wire_name,
)
from weightstream.protocol.packed import pack_u64
from weightstream.sender.manifest import describe

pytestmark = pytest.mark.timeout(120)

SLOT = {"name": "ws_1_abcd", "size": 4096, "host": "h"}

EXAMPLES: list[m.Message] = [
    m.Hello(rank=3, session="s1", transports=["shm", "cuda_ipc"], host="node-1", device="GPU-uuid", pid=123),
    m.Welcome(session="s1", transport="shm", bucket_bytes=4096, alignment=256, slots=[SLOT, SLOT],
              heartbeat_interval=1.0, heartbeat_timeout=10.0, pid=9),
    m.Begin.build(version="step_1", names=["a.w", "模型.🙂", "e"], dtypes=[8, 7, 0], shapes=[[2, 3], [], [0, 4]],
                  total_bytes=26, buckets=1),
    m.Begin.build(version="empty", names=[], dtypes=[], shapes=[], total_bytes=0, buckets=0),
    m.Ready(version="step_1"),
    m.Reject(version="step_1", error="ManifestMismatch", reason="1 missing: x"),
    m.Bucket.build(version="step_1", seq=0, slot=1, first=0, offsets=[0, 256], nbytes=[24, 3840], chunks=[0, 0]),
    m.Bucket.build(version="step_1", seq=2, slot=0, first=1, offsets=[0], nbytes=[4096], chunks=[3840],
                   checksum=(1 << 64) - 1),
    m.Ack(version="step_1", seq=7),
    m.Commit(version="step_1"),
    m.Committed(version="step_1", tensors=3, bytes=26, seconds=0.5),
    m.Failed(version="step_1", error="ValueError", message="bad", model_intact=False),
    m.Failed(version="step_1", error="ValueError", message="bad"),
    m.Error(error="ProtocolError", message="field 'x'"),
    m.Abort(version="step_1", reason="trainer interrupted"),
    m.Ping(session="s1"),
    m.Pong(session="s1"),
    m.Bye(reason="closing"),
    # protocol v6: two-phase commit, per-connection identities, split manifests, transport parameters
    m.Prepared(version="step_1", tensors=3, bytes=26, seconds=0.25, in_place=False),
    m.Pong(session="s1", known=False),
    m.ManifestPart(version="step_1", part=1, names=["b.w"], dtypes=b"\x08", ndims=b"\x01", dims=pack_u64([2])),
    m.Begin(version="step_1", names=["a.w"], dtypes=b"\x08", ndims=b"\x01", dims=pack_u64([2]), total_bytes=16,
            buckets=1, parts=2, transport={"store": "127.0.0.1:29500", "group": 3}),
    # protocol v5: a repeated manifest named by its layout, and a bucket that sends only its count
    m.Begin.build(version="step_1", names=["a"], dtypes=[8], shapes=[[2]], total_bytes=8, buckets=1, layout=3),
    m.Begin.reusing("step_2", layout=3, total_bytes=8, buckets=1, force=True),
    m.Bucket(version="step_2", seq=0, slot=1, first=0, offsets=b"", nbytes=b"", chunks=b"", ring=True, count=1),
]
REUSE, PACKED = EXAMPLES[-2], EXAMPLES[-1]


def test_every_message_type_has_an_example() -> None:
    assert {type(x).TYPE for x in EXAMPLES} == set(m._REGISTRY)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: f"{type(x).TYPE}")
def test_round_trip(msg: m.Message) -> None:
    frame = m.encode(msg)
    assert isinstance(frame, bytes)
    body = msgpack.unpackb(frame)
    assert body["type"] == type(msg).TYPE and body["v"] == m.PROTOCOL_VERSION
    assert m.decode(frame) == msg
    assert m.decode(bytearray(frame)) == msg and m.decode(memoryview(frame)) == msg


def test_optional_field_travels_only_when_set() -> None:
    assert "checksum" not in msgpack.unpackb(m.encode(EXAMPLES[6]))
    assert msgpack.unpackb(m.encode(EXAMPLES[7]))["checksum"] == (1 << 64) - 1


def body_of(msg: m.Message, **changes: Any) -> bytes:
    body = msgpack.unpackb(m.encode(msg))
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k)
        else:
            body[k] = v
    return msgpack.packb(body, use_bin_type=True)


_DROP = object()
BEGIN, BUCKET = EXAMPLES[2], EXAMPLES[6]


@pytest.mark.parametrize(
    ("frame", "mentions"),
    [
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),
        (msgpack.packb([1, 2]), "map"),
        (msgpack.packb({1: 2}), "msgpack"),  # non-str map keys refused by strict_map_key
        (msgpack.packb({"type": "NOPE", "v": 1}), "'type'"),
        (msgpack.packb({"type": 5, "v": 1}), "'type'"),
        (body_of(EXAMPLES[9], v=1), "'v'"),  # the previous protocol
        (body_of(EXAMPLES[9], v=True), "'v'"),
        (body_of(EXAMPLES[9], v=_DROP), "'v'"),
        (body_of(EXAMPLES[9], version=_DROP), "missing field 'version'"),
        (body_of(EXAMPLES[9], version=5), "COMMIT.version"),
        (body_of(EXAMPLES[9], extra=1), "unexpected field"),
        (body_of(EXAMPLES[8], seq=-1), "ACK.seq"),
        (body_of(EXAMPLES[8], seq=1.0), "ACK.seq"),
        (body_of(EXAMPLES[10], seconds=float("nan")), "COMMITTED.seconds"),
        (body_of(EXAMPLES[11], model_intact=1), "FAILED.model_intact"),
        (body_of(BEGIN, names=b"a\0a\0b"), "duplicate"),
        (body_of(BEGIN, names=["a.w", "e", "f"]), "BEGIN.names"),  # a v2 list where the bin belongs
        (body_of(BEGIN, names=b"a\0\xff\0b"), "invalid byte at 2"),
        (body_of(BEGIN, names=b"a\0\0b"), "BEGIN.names[1]"),  # an empty name
        (body_of(BEGIN, names=b"a\0b"), "parallel"),  # two names, three dtypes
        (body_of(BEGIN, dtypes=bytes([8, 7])), "parallel"),
        (body_of(BEGIN, dtypes=[8, 7, 0]), "BEGIN.dtypes"),  # a list where packed bytes belong
        (body_of(BEGIN, dtypes=bytes([8, 7, 12])), "BEGIN.dtypes[2]"),
        (body_of(BEGIN, ndims=bytes([2, 0, 17])), "BEGIN.ndims[2]"),
        (body_of(BEGIN, ndims=bytes([2, 0, 1])), "BEGIN.dims"),  # 3 dims where 4 are listed
        (body_of(BEGIN, dims=pack_u64([2, 3, 0, 1 << 60])), "BEGIN.dims[3]"),
        (body_of(BEGIN, dims=pack_u64([2, 3, 0])[:-1]), "multiple of 8"),
        (body_of(BEGIN, dims=pack_u64([2, 3, 1 << 47, 1 << 47])), "more than"),  # a tensor of 2**94 elements
        (body_of(BEGIN, total_bytes=27), "total_bytes"),
        (body_of(BEGIN, names=b"x" * 1025 + b"\0b\0c"), "BEGIN.names[0]"),
        (body_of(BUCKET, offsets=pack_u64([0])), "parallel"),
        (body_of(BUCKET, offsets=[0, 256]), "BUCKET.offsets"),
        (body_of(BUCKET, nbytes=pack_u64([24, 1 << 63])), "BUCKET.nbytes[1]"),
        (body_of(BUCKET, first=-1), "BUCKET.first"),
        (body_of(BUCKET, slot=64), "BUCKET.slot"),
        (body_of(BUCKET, checksum=-1), "BUCKET.checksum"),
        (body_of(BUCKET, names=["a.w"]), "unexpected field"),
        (body_of(REUSE, names=b"a"), "'reuse'"),  # a manifest and reuse at once
        (body_of(REUSE, dims=pack_u64([2])), "'reuse'"),
        (body_of(REUSE, layout=_DROP), "'reuse'"),
        (body_of(REUSE, layout=0), "BEGIN.layout"),
        (body_of(REUSE, reuse=1), "BEGIN.reuse"),
        (body_of(PACKED, offsets=pack_u64([0]), nbytes=pack_u64([8]), chunks=pack_u64([0])), "'count'"),
        (body_of(PACKED, count=0), "BUCKET.count"),
        (body_of(EXAMPLES[1], slots=[{"k": [1]}]), "WELCOME.slots"),
        (body_of(EXAMPLES[1], slots=[SLOT] * 65), "WELCOME.slots"),
        (body_of(EXAMPLES[1], alignment=0), "WELCOME.alignment"),
        (body_of(EXAMPLES[0], transports=[b"shm"]), "HELLO.transports[0]"),
    ],
)
def test_decode_rejects_with_the_field_named(frame: bytes, mentions: str) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode(frame)
    assert mentions in str(info.value)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(ProtocolError, match="bytes"):
        m.decode("not bytes")  # type: ignore[arg-type]


def test_msg_type_is_recorded_for_the_error_limiter() -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode(msgpack.packb({"type": "ERROR", "v": m.PROTOCOL_VERSION, "error": 1, "message": "x"}))
    assert info.value.msg_type == "ERROR"
    limiter = m.ErrorReplyLimiter(interval=0.1)
    assert not limiter.allow(info.value, now=100.0), "never answer an ERROR with an ERROR"
    other = ProtocolError("x")
    assert limiter.allow(other, now=100.0) and not limiter.allow(other, now=100.05) and limiter.allow(other, now=100.2)


# --- check_bucket_fits -----------------------------------------------------------------

def test_check_bucket_fits_accepts_a_good_bucket() -> None:
    m.check_bucket_fits(BUCKET, [4096, 4096], 256)


@pytest.mark.parametrize(
    ("changes", "slots", "mentions"),
    [
        ({"slot": 2}, [4096, 4096], "'slot'"),
        ({"offsets": pack_u64([0, 300])}, [4096, 4096], "not aligned"),
        ({"offsets": pack_u64([0, 512])}, [4096, 4096], "outside slot"),
        ({}, [4096, 2048], "outside slot"),
    ],
)
def test_check_bucket_fits_rejects(changes: dict[str, Any], slots: list[int], mentions: str) -> None:
    msg = m.decode(body_of(BUCKET, **changes))
    with pytest.raises(ProtocolError, match=mentions):
        m.check_bucket_fits(msg, slots, 256)  # type: ignore[arg-type]


def test_packed_entries_are_the_planner_layout_and_must_fit() -> None:
    sizes = np.array([4000, 0, 24, 300, 256], np.int64)
    msg = dataclasses.replace(PACKED, first=1, count=4)
    m.check_bucket_fits(msg, [4096, 4096], 256)  # only the slot: the entries need the manifest
    offsets, nbytes, chunks = m.packed_entries(msg, sizes, 256, 4096)
    assert offsets.tolist() == [0, 0, 256, 768] and nbytes.tolist() == [0, 24, 300, 256] and chunks.tolist() == [0] * 4
    with pytest.raises(ProtocolError, match="run past the 5 tensors"):
        m.packed_entries(dataclasses.replace(msg, count=5), sizes, 256, 4096)
    with pytest.raises(ProtocolError, match="need 4120 bytes packed, more than slot 1 of 4096"):
        m.packed_entries(dataclasses.replace(msg, first=0, count=3), sizes, 256, 4096)
    with pytest.raises(ProtocolError, match="'slot'"):
        m.check_bucket_fits(dataclasses.replace(msg, slot=2), [4096, 4096], 256)


def test_an_empty_or_reusing_begin_keeps_the_names_cache() -> None:
    """A rank that is sent the manifest again after a reusing BEGIN must still get the shared list."""
    codec = m.Codec()
    first = codec.decode(m.encode(BEGIN))
    codec.decode(m.encode(REUSE))
    codec.decode(m.encode(EXAMPLES[3]))  # no tensors at all
    assert codec.decode(m.encode(BEGIN)).names is first.names


# --- errors across the wire ------------------------------------------------------------

def test_errors_are_rebuilt_by_name() -> None:
    err = from_wire("ManifestMismatch", "1 missing", rank=2)
    assert type(err) is ManifestMismatch and err.rank == 2 and "rank 2" in str(err)
    err = from_wire("KeyError", "boom", rank=1)
    assert type(err) is RemoteError and err.remote_type == "KeyError" and err.rank == 1
    assert wire_name(VersionAborted("x")) == "VersionAborted" and wire_name(ValueError()) == "RemoteError"


# --- fuzz --------------------------------------------------------------------------------

def _decode_only_protocol_errors(frame: bytes) -> None:
    try:
        msg = m.decode(frame)
    except ProtocolError:
        return
    # whatever decodes must re-encode to an equal message
    assert m.decode(m.encode(msg)) == msg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_decode_arbitrary_bytes(frame: bytes) -> None:
    _decode_only_protocol_errors(frame)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
)
_values = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
_field_names = st.sampled_from([*sorted({name for fields in m._FIELDS.values() for name, _, _ in fields}), "x"])


@st.composite
def _message_like(draw: Any) -> dict[str, Any]:
    """Maps that look like messages: a real type and version, fields with random values."""
    kind = draw(st.sampled_from([*sorted(m._REGISTRY), "BOGUS"]))
    v = m.PROTOCOL_VERSION
    body: dict[str, Any] = {"type": kind, "v": draw(st.sampled_from([v, v, v, 0, v - 1, v + 1, str(v), True]))}
    for name, _, _ in m._FIELDS.get(kind, ()):
        if draw(st.integers(0, 9)):  # usually present
            body[name] = draw(_values)
    body.update(draw(st.dictionaries(_field_names, _values, max_size=2)))
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, _message_like()))
def test_fuzz_decode_msgpack_structures(value: Any) -> None:
    _decode_only_protocol_errors(msgpack.packb(value, use_bin_type=True))


@st.composite
def _mutated_example(draw: Any) -> bytes:
    """Real messages with one field swapped for a random value."""
    msg = draw(st.sampled_from(EXAMPLES))
    body = msgpack.unpackb(m.encode(msg))
    key = draw(st.sampled_from(sorted(body)))
    body[key] = draw(_values)
    return msgpack.packb(body, use_bin_type=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_example())
def test_fuzz_decode_mutated_messages(frame: bytes) -> None:
    _decode_only_protocol_errors(frame)


HOSTILE = {
    "deep_array": b"\x91" * 100_000 + b"\xc0",
    "deep_map": b"\x81\xa1a" * 50_000 + b"\xc0",
    "timestamp_ext": msgpack.packb({"type": "PING", "v": m.PROTOCOL_VERSION, "session": msgpack.Timestamp(1, 2)}),
    "ext": msgpack.packb(msgpack.ExtType(5, b"abc")),
    "huge_array_header": b"\xdd\xff\xff\xff\xff",
    "huge_str_header": b"\xdb\xff\xff\xff\xff",
    "map_of_65_keys": msgpack.packb({str(i): i for i in range(65)}),
    "trailing_bytes": msgpack.packb({"type": "PING", "v": m.PROTOCOL_VERSION, "session": "x"}) + b"\x00",
    "uint64_in_int_field": msgpack.packb({"type": "ACK", "v": m.PROTOCOL_VERSION, "version": "x", "seq": (1 << 64) - 1}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frames_are_protocol_errors(name: str) -> None:
    with pytest.raises(ProtocolError):
        m.decode(HOSTILE[name])


def test_oversized_frame_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        m.decode(b"\x00" * (m.MAX_MESSAGE_BYTES + 1))


def test_names_travel_as_one_bin_and_repeat_as_the_same_list() -> None:
    names = ["a.w", "模型.🙂", "e"]
    frame = m.encode(BEGIN)
    assert msgpack.unpackb(frame)["names"] == "\0".join(names).encode()
    codec = m.Codec()  # a session's codec remembers; the module's decode does not
    first, again = codec.decode(frame), codec.decode(frame)
    assert first.names == names and again.names is first.names  # no 100k str objects per step


@pytest.mark.parametrize(
    "names", [["a", "b\0c", "d"], ["a", "", "d"], [""], ["a", "\ud800"]], ids=["nul", "empty", "only-empty", "surrogate"]
)
def test_a_name_the_wire_cannot_carry_is_refused_when_encoding(names: list[str]) -> None:
    begin = dataclasses.replace(BEGIN, names=names)
    with pytest.raises(ProtocolError, match="non-empty names in UTF-8 without NUL"):
        m.encode(begin)


@pytest.mark.parametrize(("bad", "shown"), [("b\0c", r"'b\\x00c'"), ("b\ud800", r"'b\\ud800'")], ids=["nul", "surrogate"])
def test_describe_names_a_tensor_whose_name_the_wire_cannot_carry(bad: str, shown: str) -> None:
    with pytest.raises(WeightstreamError, match=f"valid UTF-8 without NUL, got {shown}"):
        describe([("a", np.zeros(1)), (bad, np.zeros(1))])


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ({"a": np.zeros(1)}, r"got a mapping \(dict, 1 entries\), whose iteration gives names only; pass its items, e\.g\. push\(state_dict\.items\(\)\)"),
        (["a"], "item 0 is a str"),
        ([("a", np.zeros(1)), ("b", np.zeros(1), 0)], "item 1 is a tuple of 3"),
    ],
    ids=["state-dict", "names", "triple"],
)
def test_describe_says_which_item_is_not_a_pair_and_how_to_pass_a_state_dict(bad: Any, said: str) -> None:
    with pytest.raises(WeightstreamError, match=said):
        describe(bad)


def test_a_state_dict_passed_whole_is_refused_before_the_push_waits_for_a_rank(tmp_path: Any) -> None:
    from weightstream import BucketSender

    with BucketSender(f"ipc://{tmp_path}/s.sock", receivers=1, timeout=30.0) as sender:
        t0 = time.monotonic()
        with pytest.raises(WeightstreamError, match=r"push\(state_dict\.items\(\)\)"):
            sender.push({"w": np.zeros(4, np.float32)}, version="1")
        assert time.monotonic() - t0 < 5.0  # refused at once, not after waiting for the rank


def test_a_repeated_manifest_is_still_checked_where_it_differs() -> None:
    """A codec remembers the last valid BEGIN to skip re-validating an identical manifest;
    anything that differs from it is checked in full."""
    codec = m.Codec()
    good = m.encode(BEGIN)
    assert codec.decode(good) == BEGIN and codec.decode(good) == BEGIN
    with pytest.raises(ProtocolError, match="total_bytes"):
        codec.decode(body_of(BEGIN, total_bytes=25))
    with pytest.raises(ProtocolError, match="duplicate"):
        codec.decode(body_of(BEGIN, names=b"a.w\0a.w\0e"))
    with pytest.raises(ProtocolError, match=r"BEGIN.dtypes"):
        codec.decode(body_of(BEGIN, dtypes=bytes([8, 7, 99])))
    assert codec.decode(good) == BEGIN


# --- protocol v6: split manifests and bounded decoding ---------------------------------------


def test_a_large_manifest_is_split_into_frames_and_joined_whole() -> None:
    names = [f"layer.{i:05d}." + "w" * 200 for i in range(2000)]
    shapes = [[i % 7 + 1, 3] for i in range(2000)]
    begin = m.Begin.build("step_1", names, [8] * 2000, shapes, sum(4 * 3 * (i % 7 + 1) for i in range(2000)), 1, layout=2)
    frames = [m.encode(x) for x in m.split_begin(begin, part_bytes=100_000)]
    assert len(frames) > 4 and all(len(f) <= 100_000 + 1024 for f in frames)
    first, *rest = (m.decode(f) for f in frames)
    assert isinstance(first, m.Begin) and first.parts == len(frames)
    whole = m.join_manifest(first, rest)  # type: ignore[arg-type]
    assert whole.names == names and whole.dims == begin.dims and whole.dtypes == begin.dtypes and whole.parts is None
    assert m.split_begin(begin) == [begin]  # under the default limit: one frame


def test_a_split_manifest_with_a_name_in_two_parts_is_refused() -> None:
    begin = m.Begin.build("v", ["a", "b", "a2"], [8] * 3, [[1]] * 3, 24, 1)
    first, second = m.split_begin(begin, part_bytes=8)[:2]
    dup = m.ManifestPart(version="v", part=1, names=["a"], dtypes=b"\x08", ndims=b"\x01", dims=pack_u64([1]))
    with pytest.raises(ProtocolError, match="duplicate"):
        m.join_manifest(first, [dup, dup])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="MANIFEST frames"):
        m.join_manifest(first, [second])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91" * 2_000_000 + b"\x90",  # nested empty arrays
        b"\xdd" + (2_000_000).to_bytes(4, "big") + b"\x90" * 2_000_000,  # one array of empty arrays
        b"\x81\xa1k" + b"\x9f" * 200 + b"\x90" * 3000,  # a tree of arrays
        b"\xdf" + (1_000_000).to_bytes(4, "big") + b"\xa1k\x80" * 1_000_000,  # a huge map
    ],
    ids=["nested", "wide", "tree", "map"],
)
def test_decode_refuses_frames_of_many_containers_before_expanding_them(frame: bytes) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            m.decode(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(frame) + (1 << 20), peak


def test_names_bin_of_tiny_names_is_bounded_by_its_size() -> None:
    blob = b"\0".join([b"x"] * 2_000_000)  # 4 MB of 1-character names: 2M Python strs
    body = msgpack.packb({"type": "BEGIN", "v": m.PROTOCOL_VERSION, "version": "v", "names": blob, "dtypes": b"",
                          "ndims": b"", "dims": b"", "total_bytes": 0, "buckets": 1}, use_bin_type=True)
    with pytest.raises(ProtocolError, match=r"at most .* names in a bin"):
        m.decode(body)


def test_a_small_frame_limit_refuses_before_parsing() -> None:
    frame = m.encode(m.Error(error="E", message="é" * 40_000))  # 80 kB of UTF-8
    with pytest.raises(ProtocolError, match="before the handshake"):
        m.decode(frame, m.PRE_HELLO_MAX_BYTES)
    assert isinstance(m.decode(frame), m.Error)
