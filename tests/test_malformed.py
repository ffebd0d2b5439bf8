"""Malformed frames sent straight at a daemon: typed ProtocolError, an ERROR reply, and the
daemon keeps serving. The fake sender is a bare zmq ROUTER bound at the endpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
import workers as w
import zmq

from weightstream import BucketSender, ReceiverDaemon
from weightstream.protocol import messages as m
from weightstream.protocol.packed import pack_u64
from weightstream.protocol.transports.shm import ShmTransport
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(60)

SLOT = 4096
REPLY_TIMEOUT = 10.0


class FakeSender:
    """A ROUTER that plays the sender's side of the protocol by hand."""

    def __init__(self, endpoint: str) -> None:
        os.makedirs(os.path.dirname(endpoint[len("ipc://"):]), mode=0o700, exist_ok=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        # a rank maps only segments named for the session it is connected to
        self.slots_session = "fake0001"
        self.slots = ShmTransport().create_slots(2, SLOT, session=self.slots_session)
        self.ident = b""

    def recv(self, timeout: float) -> m.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        ident, body = self.sock.recv_multipart()
        self.ident = ident
        return m.decode(body)

    def wait_for(self, kind: type[m.Message], timeout: float = REPLY_TIMEOUT) -> Any:
        """The next message of ``kind``, skipping HELLO/PING chatter."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, m.Ping):
                self.send(m.Pong(session=msg.session))
        raise AssertionError(f"no {kind.TYPE} within {timeout}s")

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.ident, *frames])

    def send(self, msg: m.Message) -> None:
        self.send_raw(m.encode(msg))

    def welcome(self, session: str = "fake0001") -> m.Welcome:
        if session != self.slots_session:  # a new sender session comes with its own slots
            for slot in self.slots:
                slot.close()
            self.slots_session = session
            self.slots = ShmTransport().create_slots(2, SLOT, session=session)
        return m.Welcome(
            session=session, transport="shm", bucket_bytes=SLOT, alignment=256,
            slots=[s.descriptor() for s in self.slots], heartbeat_interval=0.2, heartbeat_timeout=30.0, pid=os.getpid(),
        )

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        for slot in self.slots:
            slot.close()


@pytest.fixture
def fake(endpoint: str) -> Iterator[FakeSender]:
    f = FakeSender(endpoint)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def daemon_state() -> dict[str, np.ndarray]:
    return {"a.weight": np.zeros(1000, np.float32), "b": np.zeros(3, np.int64)}


@pytest.fixture
def daemon(endpoint: str, fake: FakeSender, daemon_state: dict[str, np.ndarray]) -> Iterator[ReceiverDaemon]:
    d = ReceiverDaemon(endpoint, NumpySink(daemon_state), rank=0, heartbeat_interval=0.1, heartbeat_timeout=30.0).start()
    try:
        yield d
    finally:
        d.stop()


def expect_protocol_error(fake: FakeSender, daemon: ReceiverDaemon, *frames: bytes, mentions: str) -> None:
    time.sleep(0.15)  # the daemon answers at most one ERROR per 0.1 s
    fake.send_raw(*frames)
    err = fake.wait_for(m.Error)
    assert err.error == "ProtocolError"
    assert mentions in err.message, err.message
    last = daemon.status.last_error
    assert last is not None and last.startswith("ProtocolError") and mentions in last, last


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _welcome_body(fake: FakeSender, **changes: Any) -> dict[str, Any]:
    body = msgpack.unpackb(m.encode(fake.welcome()))
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


PRE_WELCOME_CASES = {
    "garbage": (lambda f: [b"\xc1\xffnot msgpack at all"], "msgpack"),
    "non_map": (lambda f: [pack([1, 2, 3])], "map"),
    "unknown_type": (lambda f: [pack({"type": "LAUNCH_MISSILES", "v": 1})], "'type'"),
    "missing_field": (lambda f: [pack(_welcome_body(f, bucket_bytes=None))], "bucket_bytes"),
    "wrong_field_type": (lambda f: [pack(_welcome_body(f, bucket_bytes="4096"))], "WELCOME.bucket_bytes"),
    "wrong_nested_type": (lambda f: [pack(_welcome_body(f, slots=[["not", "a", "map"]]))], "WELCOME.slots"),
    "extra_field": (lambda f: [pack(_welcome_body(f, evil="x"))], "unexpected field"),
    "wrong_protocol_version": (lambda f: [pack({"type": "PING", "v": 99, "session": "x"})], "'v'"),
    "bool_as_int": (lambda f: [pack(_welcome_body(f, pid=True))], "WELCOME.pid"),
    "two_frames": (lambda f: [m.encode(m.Ping(session="x")), b"extra"], "1 frame"),
    "begin_before_welcome": (
        lambda f: [m.encode(m.Begin.build(version="v", names=["b"], dtypes=[5], shapes=[[3]], total_bytes=24, buckets=1))],
        "before WELCOME",
    ),
}


@pytest.mark.parametrize("case", list(PRE_WELCOME_CASES))
def test_bad_frame_before_welcome(fake: FakeSender, daemon: ReceiverDaemon, case: str) -> None:
    hello = fake.wait_for(m.Hello)
    assert hello.rank == 0 and "shm" in hello.transports
    frames, mentions = PRE_WELCOME_CASES[case]
    expect_protocol_error(fake, daemon, *frames(fake), mentions=mentions)
    assert not daemon.status.connected
    # still serving: the handshake completes afterwards
    fake.send(fake.welcome())
    deadline = time.monotonic() + REPLY_TIMEOUT
    while not daemon.status.connected and time.monotonic() < deadline:
        fake.recv(0.05)
    assert daemon.status.connected


def begin(version: str = "v1") -> m.Begin:
    return m.Begin.build(version=version, names=["a.weight", "b"], dtypes=[8, 5], shapes=[[1000], [3]], total_bytes=4024, buckets=2)


def bucket(seq: int, name: str, **kw: Any) -> m.Bucket:
    index, nbytes = {"a.weight": (0, 4000), "b": (1, 24)}[name]
    fields = dict(version="v1", seq=seq, slot=seq % 2, first=index, offsets=[0], nbytes=[nbytes], chunks=[0])
    fields.update(kw)
    return m.Bucket.build(**fields)


def test_bad_buckets_and_begins_in_session_then_a_real_version_commits(
    fake: FakeSender, daemon: ReceiverDaemon, daemon_state: dict[str, np.ndarray]
) -> None:
    fake.wait_for(m.Hello)
    fake.send(fake.welcome())
    # BUCKET before BEGIN
    expect_protocol_error(fake, daemon, m.encode(bucket(0, "a.weight")), mentions="no such version")
    # BEGIN with a duplicate name
    dup = pack({**msgpack.unpackb(m.encode(begin())), "names": b"b\0b", "dtypes": bytes([5, 5]), "ndims": bytes([1, 1]),
                "dims": pack_u64([3, 3]), "total_bytes": 48})
    expect_protocol_error(fake, daemon, dup, mentions="duplicate")
    # BEGIN with an unknown dtype code
    raw = {**msgpack.unpackb(m.encode(begin())), "dtypes": bytes([99, 5])}
    expect_protocol_error(fake, daemon, pack(raw), mentions="BEGIN.dtypes[0]")
    # BEGIN whose total_bytes lies
    lie = pack({**msgpack.unpackb(m.encode(begin())), "total_bytes": 1})
    expect_protocol_error(fake, daemon, lie, mentions="total_bytes")
    fake.send(begin())
    assert fake.wait_for(m.Ready).version == "v1"
    # offsets past the slot, misaligned, a slot that does not exist, an unknown dtype code
    expect_protocol_error(fake, daemon, m.encode(bucket(0, "a.weight", offsets=[256])), mentions="outside slot")
    expect_protocol_error(fake, daemon, m.encode(bucket(0, "b", offsets=[100])), mentions="not aligned")
    expect_protocol_error(fake, daemon, m.encode(bucket(0, "b", slot=5)), mentions="'slot'")
    raw = {**msgpack.unpackb(m.encode(bucket(0, "b"))), "offsets": [0]}
    expect_protocol_error(fake, daemon, pack(raw), mentions="BUCKET.offsets")
    assert daemon.committed_version is None and daemon.status.model_intact

    # the same session goes on: a well-formed version commits bit-exact
    a = np.arange(1000, dtype=np.float32) * 0.5
    b = np.array([7, -1, 1 << 40], dtype=np.int64)
    fake.slots[0].host_view()[:4000] = a.view(np.uint8)
    fake.send(bucket(0, "a.weight"))
    assert fake.wait_for(m.Ack).seq == 0
    fake.slots[1].host_view()[:24] = b.view(np.uint8)
    fake.send(bucket(1, "b"))
    assert fake.wait_for(m.Ack).seq == 1
    assert fake.wait_for(m.Prepared).version == "v1"  # two-phase: COMMIT only after PREPARED
    fake.send(m.Commit(version="v1"))
    done = fake.wait_for(m.Committed)
    assert (done.version, done.tensors, done.bytes) == ("v1", 2, 4024)
    daemon.wait_for_version("v1", timeout=5)
    assert daemon_state["a.weight"].tobytes() == a.tobytes() and daemon_state["b"].tobytes() == b.tobytes()


def test_data_frames_where_the_session_takes_none_are_refused(fake: FakeSender, daemon: ReceiverDaemon) -> None:
    """Frames after a message are bucket bytes: only after a BUCKET that announces them, and only
    on a session whose transport moves bytes that way (shm moves none)."""
    fake.wait_for(m.Hello)
    fake.send(fake.welcome())
    fake.send(begin())
    assert fake.wait_for(m.Ready).version == "v1"
    announced = m.encode(dataclasses.replace(bucket(0, "b"), frames=1))
    expect_protocol_error(fake, daemon, announced, b"\0" * 24, mentions="field 'frames'")
    short = m.encode(dataclasses.replace(bucket(0, "b"), frames=2))
    expect_protocol_error(fake, daemon, short, b"\0" * 24, mentions="expected 3 frame(s)")
    expect_protocol_error(fake, daemon, m.encode(m.Ping(session="fake0001")), b"x", mentions="expected 1 frame(s)")
    assert daemon.committed_version is None and daemon.status.model_intact


def test_after_garbage_and_a_vanished_fake_sender_a_real_sender_is_served(
    endpoint: str, fake: FakeSender, daemon: ReceiverDaemon, daemon_state: dict[str, np.ndarray]
) -> None:
    fake.wait_for(m.Hello)
    fake.send(fake.welcome())
    expect_protocol_error(fake, daemon, b"\x00\x01garbage", mentions="msgpack")
    fake.send(begin())
    fake.wait_for(m.Ready)
    fake.close()  # gone mid-version, without BYE
    good = {"a.weight": np.linspace(-1, 1, 1000, dtype=np.float32), "b": np.array([1, 2, 3], np.int64)}
    with BucketSender(endpoint, bucket_bytes=SLOT, timeout=30, heartbeat_interval=0.2) as sender:
        sender.push(good.items(), version="real")
        daemon.wait_for_version("real", timeout=10)
    assert {k: w.digest(v) for k, v in daemon_state.items()} == {k: w.digest(v) for k, v in good.items()}


def test_error_from_sender_is_not_answered_with_error(fake: FakeSender, daemon: ReceiverDaemon) -> None:
    """An ERROR that fails to decode gets no ERROR back (two broken peers must not ping-pong)."""
    fake.wait_for(m.Hello)
    time.sleep(0.15)
    fake.send_raw(pack({"type": "ERROR", "v": m.PROTOCOL_VERSION, "error": 5, "message": "x"}))
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0:
        msg = fake.recv(left)
        assert not isinstance(msg, m.Error), "the daemon answered an ERROR with an ERROR"
    assert "ERROR.error" in (daemon.status.last_error or "")


@pytest.mark.parametrize(
    ("bad", "mentions"),
    [
        (lambda: bucket(1, "b"), "seq"),  # seq 1 before seq 0
        (lambda: bucket(0, "b"), "'first'"),  # the manifest's second tensor first
        (lambda: bucket(0, "a.weight", nbytes=[4032]), "expected its bytes"),  # size disagrees with BEGIN
        (lambda: bucket(0, "a.weight", nbytes=[0]), "expected its bytes"),  # an empty piece of a real tensor
    ],
    ids=["seq", "first", "nbytes", "empty"],
)
def test_out_of_order_bucket_fails_the_version_and_the_next_one_commits(
    fake: FakeSender, daemon: ReceiverDaemon, daemon_state: dict[str, np.ndarray], bad: Any, mentions: str
) -> None:
    before = {k: v.tobytes() for k, v in daemon_state.items()}
    fake.wait_for(m.Hello)
    fake.send(fake.welcome())
    fake.send(begin("v1"))
    fake.wait_for(m.Ready)
    fake.send(bad())
    failed = fake.wait_for(m.Failed)
    assert failed.version == "v1" and failed.model_intact
    assert mentions in (daemon.status.last_error or ""), daemon.status.last_error
    assert {k: v.tobytes() for k, v in daemon_state.items()} == before
    assert daemon.status.model_intact

    fake.send(begin("v2"))
    fake.wait_for(m.Ready)
    b = np.array([4, 5, 6], np.int64)
    fake.slots[0].host_view()[:4000] = 1
    fake.slots[1].host_view()[:24] = b.view(np.uint8)
    fake.send(bucket(0, "a.weight", version="v2"))
    fake.send(bucket(1, "b", version="v2"))
    assert fake.wait_for(m.Prepared).version == "v2"  # two-phase: COMMIT only after PREPARED
    fake.send(m.Commit(version="v2"))
    assert fake.wait_for(m.Committed).version == "v2"
    assert daemon_state["b"].tobytes() == b.tobytes()
    assert daemon_state["a.weight"].view(np.uint8).tolist() == [1] * 4000


def packed(seq: int, first: int, count: int, version: str) -> m.Bucket:
    """A protocol-v5 BUCKET that sends only its count: the rank derives its entries."""
    return m.Bucket(version=version, seq=seq, slot=seq % 2, first=first, offsets=b"", nbytes=b"", chunks=b"", count=count)


def test_reusing_begins_and_packed_buckets_by_hand(
    fake: FakeSender, daemon: ReceiverDaemon, daemon_state: dict[str, np.ndarray]
) -> None:
    """A BEGIN that names a layout the rank does not hold, or disagrees with it, and packed buckets
    that run past the manifest, skip a tensor or overflow the slot are refused with the field
    named; the model is untouched, and a reusing BEGIN with packed buckets then commits bit-exact."""
    fake.wait_for(m.Hello)
    fake.send(fake.welcome())

    def rejected(msg: m.Begin, mentions: str) -> None:
        fake.send(msg)
        reject = fake.wait_for(m.Reject)
        assert reject.error == "ProtocolError" and mentions in reject.reason, reject.reason

    def failed(version: str, bad: m.Bucket, mentions: str) -> None:
        fake.send(m.Begin.reusing(version, layout=7, total_bytes=4024, buckets=2))
        fake.wait_for(m.Ready)
        fake.send(bad)
        assert fake.wait_for(m.Failed).model_intact
        assert mentions in (daemon.status.last_error or ""), daemon.status.last_error

    rejected(m.Begin.reusing("v0", layout=7, total_bytes=4024, buckets=2), "holds from this sender (none)")
    full = replace(begin("v1"), layout=7)
    fake.send(full)
    fake.wait_for(m.Ready)
    a = np.arange(1000, dtype=np.float32) - 3.25
    b = np.array([9, -9, 1 << 50], dtype=np.int64)
    fake.slots[0].host_view()[:4000] = a.view(np.uint8)
    fake.slots[1].host_view()[:24] = b.view(np.uint8)
    for bucket_ in (packed(0, 0, 1, "v1"), packed(1, 1, 1, "v1")):
        fake.send(bucket_)
        fake.wait_for(m.Ack)
    assert fake.wait_for(m.Prepared).version == "v1"  # two-phase: COMMIT only after PREPARED
    fake.send(m.Commit(version="v1"))
    assert fake.wait_for(m.Committed).version == "v1"
    assert daemon_state["a.weight"].tobytes() == a.tobytes() and daemon_state["b"].tobytes() == b.tobytes()
    before = {k: v.tobytes() for k, v in daemon_state.items()}

    rejected(m.Begin.reusing("v2", layout=8, total_bytes=4024, buckets=2), "holds from this sender (7), got 8")
    rejected(m.Begin.reusing("v2", layout=7, total_bytes=4025, buckets=2), "total_bytes=4025")
    rejected(m.Begin.reusing("v2", layout=7, total_bytes=4024, buckets=0), "in 0 buckets")
    failed("v2", packed(0, 0, 2, "v2"), "need 4120 bytes packed, more than slot 0 of 4096")
    failed("v3", packed(0, 1, 1, "v3"), "field 'first': expected manifest index 0")
    failed("v4", packed(0, 0, 3, "v4"), "run past the 2 tensors")
    assert {k: v.tobytes() for k, v in daemon_state.items()} == before and daemon.status.model_intact

    # chunked first: the next packed bucket must not skip the tensor's remaining bytes
    fake.send(m.Begin.reusing("v5", layout=7, total_bytes=4024, buckets=3))
    fake.wait_for(m.Ready)
    fake.send(bucket(0, "a.weight", version="v5", nbytes=[2048]))
    fake.send(packed(1, 1, 1, "v5"))
    fake.wait_for(m.Failed)
    assert "from byte 2048" in (daemon.status.last_error or ""), daemon.status.last_error

    # a new sender session: layout numbers start over, so the old one is not taken
    fake.send(fake.welcome(session="fake0002"))
    time.sleep(0.2)
    rejected(m.Begin.reusing("v6", layout=7, total_bytes=4024, buckets=2), "(none)")
    fake.send(replace(full, version="v6"))
    fake.wait_for(m.Ready)
    fake.slots[0].host_view()[:4000] = 0
    fake.slots[1].host_view()[:24] = 0
    for bucket_ in (packed(0, 0, 1, "v6"), packed(1, 1, 1, "v6")):
        fake.send(bucket_)
    assert fake.wait_for(m.Prepared).version == "v6"  # two-phase: COMMIT only after PREPARED
    fake.send(m.Commit(version="v6"))
    assert fake.wait_for(m.Committed).version == "v6"
    assert not daemon_state["a.weight"].any() and not daemon_state["b"].any()


@pytest.mark.parametrize(
    ("slot", "mentions"),
    [
        ({"name": f"ws_{os.getpid()}_fake0001_doesnotexist", "size": SLOT}, "could not open"),
        ({"name": "ws_0_fake0001_1234", "size": SLOT}, "not a segment of the connected sender"),
        ({"name": "ws_../../etc/passwd", "size": SLOT}, "expected a name"),
        ({"name": "not_ours", "size": SLOT}, "expected a name"),
        ({"name": "ws_x", "size": -1}, "size"),
    ],
    ids=["missing", "other_sender", "path", "foreign", "size"],
)
def test_welcome_with_bad_slot_descriptor(fake: FakeSender, daemon: ReceiverDaemon, slot: dict[str, Any], mentions: str) -> None:
    """A WELCOME whose slots cannot be mapped is answered with a TransportError; a good one still works."""
    fake.wait_for(m.Hello)
    from weightstream.protocol.transports.shm import host_identity

    bad = fake.welcome()
    bad_slots = [dict(s) for s in bad.slots]
    bad_slots[1] = {"host": host_identity(), **slot}
    fake.send(replace(bad, slots=bad_slots))
    err = fake.wait_for(m.Error)
    assert err.error == "TransportError" and mentions in err.message, err.message
    assert not daemon.status.connected
    fake.send(fake.welcome(session="fake0002"))
    deadline = time.monotonic() + REPLY_TIMEOUT
    while not daemon.status.connected and time.monotonic() < deadline:
        fake.recv(0.05)
    assert daemon.status.connected
