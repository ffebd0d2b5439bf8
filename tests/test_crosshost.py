"""The cross-host transports on loopback, with real rank processes: tcp's data socket and a gloo
group per push, CURVE on the data socket, the insecure refusals, a rank killed mid-broadcast, a
mixed ``auto`` session (a rank made remote by ``host_id``), and ranks without torch.

Explicit transports serve ranks on the sender's own host here, which is how CI runs them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import xxhash
import zmq
from crosshost_workers import rank_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightstream import BucketSender, ConfigError, CurveKeys, PeerTimeout, ReceiverDaemon, WeightstreamError
from weightstream import native as speedups
from weightstream.protocol.errors import ProtocolError, TransportError
from weightstream.protocol.transports import Capabilities, ImportContext
from weightstream.protocol.transports import tcp as tcp_transport
from weightstream.protocol.transports.c10d import _fields as c10d_fields
from weightstream.receiver.sinks import NumpySink
from weightstream.sender.lanes import auto_preference, choose_auto, data_host_port

pytestmark = pytest.mark.timeout(180)

CTX = mp.get_context("spawn")
MiB = 1 << 20
EVENT_TIMEOUT = 90.0


def every_dtype_model(seed: int) -> dict[str, np.ndarray]:
    """Every wire dtype, a 0-d and an empty tensor, and one larger than a 256 KiB bucket."""
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray] = {}
    for dt in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, ml_dtypes.bfloat16,
               np.float32, np.float64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        raw = rng.integers(0, 256, size=(37, 11) if dt is not np.bool_ else (5,), dtype=np.uint8)
        name = np.dtype(dt).name
        model[f"t.{name}"] = (raw % 2).astype(np.bool_) if dt is np.bool_ else np.frombuffer(
            rng.bytes(raw.size * np.dtype(dt).itemsize), dtype=dt).reshape(raw.shape)
    model["scalar"] = np.array(rng.standard_normal(), dtype=np.float32)  # 0-d
    model["empty"] = np.zeros((0, 4), dtype=np.float32)
    model["big"] = rng.standard_normal((300, 1000)).astype(np.float32)  # 1.2 MB: chunked over 256 KiB buckets
    return model


def expected(model: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], int]]:
    return {n: (tuple(a.shape), xxhash.xxh3_64_intdigest(np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()))
            for n, a in model.items()}


def got(event: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], int]]:
    return {n: (tuple(shape), digest) for n, (_dt, shape, digest) in event["digests"].items()}


class Ranks:
    """Rank processes, each with its own event queue: a rank killed while writing to a shared
    queue would leave its lock held and silence every other rank."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.queues: dict[int, Any] = {}
        self.procs: dict[int, Any] = {}
        self.dead: list[Any] = []

    def spawn(self, rank: int, versions: list[str], **options: Any) -> None:
        queue = self.queues[rank] = CTX.Queue()
        proc = CTX.Process(target=rank_main, args=(self.endpoint, rank, versions, queue, options), daemon=True)
        proc.start()
        self.procs[rank] = proc

    def expect(self, rank: int, kind: str, version: str | None = None, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        try:
            event: dict[str, Any] = self.queues[rank].get(timeout=timeout)
        except queue_mod.Empty:
            raise AssertionError(f"rank {rank}: no {kind} within {timeout}s (alive: {self.procs[rank].is_alive()})") from None
        if event["event"] == "crashed":
            raise AssertionError(f"rank {rank} crashed: {event['error']}\n{event['tb']}")
        assert event["event"] == kind and (version is None or event.get("version") == version), (kind, version, event)
        return event

    def kill(self, rank: int) -> None:
        os.kill(self.procs[rank].pid, signal.SIGKILL)
        self.procs[rank].join(10)
        self.dead.append(self.queues.pop(rank))  # its lock may be held forever: never read or joined

    def close(self) -> None:
        for proc in self.procs.values():
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for queue in self.queues.values():
            queue.close()
            queue.join_thread()
        for queue in self.dead:
            queue.cancel_join_thread()
            queue.close()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sender(endpoint: str, transport: str, receivers: int, **options: Any) -> BucketSender:
    options.setdefault("insecure", True)
    options.setdefault("bucket_bytes", 256 << 10)
    return BucketSender(endpoint, receivers=receivers, transport=transport, timeout=60,
                        heartbeat_interval=0.2, heartbeat_timeout=3.0, **options)


# --- end to end ------------------------------------------------------------------------------


def test_a_numpy_only_and_a_paddle_only_rank_over_tcp_three_versions_bit_exact(endpoint: str) -> None:
    """tcp needs neither side's torch: both ranks run with torch unimportable."""
    versions = ["v1", "v2", "v3"]
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, versions, insecure=True, block_torch=True, framework="numpy")
        ranks.spawn(1, versions, insecure=True, block_torch=True, framework="paddle")
        with sender(endpoint, "tcp", 2) as s:
            for r in (0, 1):
                ranks.expect(r, "started")
            for i, version in enumerate(versions):
                model = every_dtype_model(i)
                report = s.push(model.items(), version=version)
                assert report.committed and {r.transport for r in report.receivers.values()} == {"tcp"}
                for r in (0, 1):
                    assert got(ranks.expect(r, "committed", version)) == expected(model)
        for r in (0, 1):
            assert ranks.expect(r, "done")["torch"] is False


def test_tcp_with_curve_serves_an_allowed_key_and_refuses_another(endpoint: str) -> None:
    """Full 16 MiB data frames under CURVE (whose per-message overhead must fit the rank's frame limit)."""
    server, good, wrong = CurveKeys.generate(), CurveKeys.generate(), CurveKeys.generate()
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, ["v1"], curve=((good.public, good.secret), server.public))
        ranks.spawn(1, ["v1"], curve=((wrong.public, wrong.secret), server.public), wait=8.0)
        with sender(endpoint, "tcp", 1, insecure=False, curve_keys=server, allowed_clients=[good.public],
                    bucket_bytes=40 * MiB) as s:
            ranks.expect(0, "started")
            ranks.expect(1, "started")
            assert s.wait_for_receivers(1) == [0]
            with pytest.raises(PeerTimeout, match="waiting for 2 receiver"):
                s.wait_for_receivers(2, timeout=2.0)  # the wrong key never gets through CURVE
            model = every_dtype_model(7)
            model["huge"] = np.random.default_rng(7).integers(0, 255, 36 * MiB, dtype=np.uint8)  # 3 frames
            report = s.push(model.items(), version="v1")
            assert list(report.receivers) == [0]
            assert got(ranks.expect(0, "committed", "v1")) == expected(model)
            assert "PeerTimeout" in ranks.expect(1, "failed", "v1")["error"]


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_a_rank_killed_mid_broadcast_fails_the_push_and_the_next_after_its_restart_is_exact(
    endpoint: str, transport: str
) -> None:
    """Nobody hangs: the push fails within the heartbeat timeout, the surviving rank reports the
    abort and keeps serving, and a push after the killed rank restarts is bit-exact on both."""
    rng = np.random.default_rng(3)
    model = {f"layer{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(24)}  # 24 buckets
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, ["v1", "v2", "v3"], insecure=True)
        ranks.spawn(1, ["v1", "v2"], insecure=True, slow=0.1, slow_version="v2")
        with sender(endpoint, transport, 2) as s:
            ranks.expect(0, "started")
            ranks.expect(1, "started")
            s.push(model.items(), version="v1")
            for r in (0, 1):
                assert got(ranks.expect(r, "committed", "v1")) == expected(model)
            failure: list[BaseException] = []
            ended = threading.Event()

            def push_v2() -> None:
                try:
                    s.push(model.items(), version="v2")
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    ended.set()

            thread = threading.Thread(target=push_v2, daemon=True)
            thread.start()
            ranks.expect(1, "applying", "v2")  # rank 1 is inside the version: buckets are moving
            ranks.kill(1)
            killed = time.monotonic()
            assert ended.wait(30), "the push did not end after a rank was killed"
            # liveness, not speed: bounded by the heartbeat timeout (3 s) plus slack for a busy box
            assert time.monotonic() - killed < 20
            thread.join(5)
            assert failure and isinstance(failure[0], WeightstreamError), failure
            report = failure[0].report  # type: ignore[attr-defined]
            assert report.receivers[1].outcome == "lost" and report.receivers[0].outcome in ("aborted", "failed")
            ranks.expect(0, "failed", "v2")
            ranks.spawn(1, ["v3"], insecure=True)
            ranks.expect(1, "started")
            model3 = {name: a + 1 for name, a in model.items()}
            report = s.push(model3.items(), version="v3")
            assert report.committed
            for r in (0, 1):
                assert got(ranks.expect(r, "committed", "v3")) == expected(model3)


def test_auto_serves_a_local_rank_by_shm_and_remote_ones_by_gloo_and_tcp_in_one_push(endpoint: str) -> None:
    """host_id makes a rank remote without mocking; one without torch gets tcp, one with it gloo."""
    versions = ["v1", "v2", "v3"]
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, versions)
        ranks.spawn(1, versions, insecure=True, host_id="other-node/1")
        ranks.spawn(2, versions, insecure=True, host_id="other-node/2", block_torch=True)
        with socket.socket() as probe:  # a free port for data_address (the first network lane's; later ones any)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with sender(endpoint, "auto", 3, data_address=f"127.0.0.1:{port}") as s:
            for r in (0, 1, 2):
                ranks.expect(r, "started")
            for i, version in enumerate(versions):
                model = every_dtype_model(10 + i)
                report = s.push(model.items(), version=version)
                assert report.committed
                assert {r: res.transport for r, res in report.receivers.items()} == {0: "shm", 1: "gloo", 2: "tcp"}
                for r in (0, 1, 2):
                    assert got(ranks.expect(r, "committed", version)) == expected(model)


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_large_tensors_move_from_the_trainers_memory_into_the_models(endpoint: str, transport: str, checksum: bool) -> None:
    """A piece of >= 1 MiB travels from the tensor itself and, to a rank that copies into its
    model (direct mode), lands in the model's memory without touching the slot; small pieces,
    an aliased (tied) tensor and, with checksums, everything go through the slot. Bit-exact
    across three versions either way."""
    rng = np.random.default_rng(5)
    named: dict[str, np.ndarray] = {}
    for i in range(4):
        named[f"norm{i}"] = rng.standard_normal(300).astype(np.float32)
        named[f"w{i}"] = rng.standard_normal((512, 600 + i)).astype(np.float32)  # ~1.2 MiB
    named["lm_head"] = named["w0"]  # tied on the trainer: sent once, its other name as an alias
    model = {name: np.zeros_like(a) for name, a in named.items()}  # untied on the rank
    # a slot per bucket (the first buckets are small, see planner.RAMP): nothing is overwritten
    with sender(endpoint, transport, 1, bucket_bytes=4 * MiB, num_buffers=8, checksum=checksum) as s, ReceiverDaemon(
        endpoint, NumpySink(model), insecure=True, heartbeat_interval=0.1
    ) as daemon:
        for v in range(3):
            for a in {id(a): a for a in named.values()}.values():
                a += 1.0
            s.push(named.items(), version=f"v{v}")
            daemon.wait_for_version(f"v{v}", timeout=30)
            assert expected(model) == expected(named)
        slots = b"".join(slot.raw(0, slot.size).tobytes() for slot in daemon._session.slots)
    # the model's addresses come from the C module (native.destinations): without it every piece
    # goes through the slot (WEIGHTSTREAM_PURE_PYTHON=1, or an install without a compiler)
    lands = speedups.NATIVE and speedups.SPANS
    for name in ("w1", "w2", "w3", "w0", "norm1"):
        in_slot = named[name].reshape(-1)[:16].tobytes() in slots
        assert in_slot == (checksum or name in ("w0", "norm1") or not lands), (name, in_slot)


# --- refusals --------------------------------------------------------------------------------


def test_network_transports_without_insecure_or_curve_are_refused_with_the_reason(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"transport='gloo': it cannot authenticate its peers .*insecure=True"):
        BucketSender(endpoint, transport="gloo")
    with pytest.raises(ConfigError, match=r"transport='tcp': its bytes cross the network, so it needs CURVE keys"):
        BucketSender(endpoint, transport="tcp")
    # a rank without insecure=True does not offer gloo: the sender's wait names why
    with sender(endpoint, "gloo", 1) as s, ReceiverDaemon(endpoint, NumpySink({}), heartbeat_interval=0.1):
        with pytest.raises(PeerTimeout, match=r"offers .*'gloo' only with insecure=True"):
            s.wait_for_receivers(timeout=3.0)


def test_auto_refuses_a_remote_rank_it_cannot_serve_and_says_how(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import weightstream.protocol.transports as transports

    for name in [n for n in transports.TRANSPORTS if n not in ("shm", "cuda_ipc", "tcp", "gloo", "nccl")]:
        monkeypatch.delitem(transports.TRANSPORTS, name)  # the tests' own transports, registered by other tests
    monkeypatch.setattr(transports, "_available", None)
    with sender(endpoint, "auto", 1, insecure=False) as s, ReceiverDaemon(
        endpoint, NumpySink({}), heartbeat_interval=0.1, host_id="far/away"
    ):
        with pytest.raises(PeerTimeout, match=r"rank 0 runs on another host and offers \['shm'\]"):
            s.wait_for_receivers(timeout=3.0)


# --- pure parts and bad input ----------------------------------------------------------------


def test_auto_prefers_shared_memory_on_one_host_then_a_collective_then_a_network_receiver() -> None:
    shm = Capabilities(same_host=True)
    tcp = Capabilities(same_host=False, receives=True, network=True)
    gloo = Capabilities(same_host=False, receives=True, collective=True, network=True, authenticated=False)
    frames = Capabilities(same_host=False, data_frames=True)
    device = Capabilities(same_host=False, device="cuda", receives=True, collective=True)
    table = {"shm": shm, "tcp": tcp, "gloo": gloo, "frames": frames, "nccl": device}
    assert choose_auto(0, ["tcp", "shm", "gloo"], True, table.get) == ("shm", "")
    assert choose_auto(0, ["shm", "tcp", "gloo", "frames"], False, table.get) == ("gloo", "")
    assert choose_auto(0, ["shm", "tcp", "frames"], False, table.get) == ("tcp", "")
    assert choose_auto(0, ["tcp"], True, table.get) == ("tcp", "")  # no shm offered: a network one will do
    assert auto_preference(device, False) is None  # device memory is chosen by name, never by auto
    name, why = choose_auto(4, ["shm", "nccl"], False, lambda n: None if n == "tcp" else table.get(n))
    assert name is None and "rank 4 runs on another host and offers ['shm', 'nccl']" in why


def test_data_address_defaults_and_errors() -> None:
    assert data_host_port(None, "ipc:///tmp/x.sock") == ("127.0.0.1", 0)
    assert data_host_port(None, "tcp://10.1.2.3:5555") == ("10.1.2.3", 0)
    assert data_host_port(None, "tcp://*:5555") == ("0.0.0.0", 0)
    assert data_host_port("10.0.0.5:29600", "ipc:///x") == ("10.0.0.5", 29600)
    for bad in ("", "tcp://host:1", "host:0", "host:http", "host:\u00b2"):  # a superscript passes str.isdigit
        with pytest.raises(ConfigError, match="data_address="):
            data_host_port(bad, "ipc:///x")


def test_c10d_begin_fields_are_checked_by_the_rank() -> None:
    good = {"store": "10.0.0.1:29500", "group": "ab12", "world": 3, "fresh": True, "timeout": 30.0}
    assert c10d_fields("gloo", good) == ("10.0.0.1", 29500, "ab12", 3, True, 30.0)
    for bad in (None, {**good, "world": 1}, {**good, "store": "nohost"}, {**good, "extra": 1}, {**good, "fresh": 1},
                {**good, "store": "10.0.0.1:\u00b2"}):
        with pytest.raises(ProtocolError, match="BEGIN: field 'transport': expected"):
            c10d_fields("gloo", bad)


def test_tcp_slot_descriptors_are_checked() -> None:
    context = ImportContext(rank=0, token="t", insecure=True)
    for bad, field in (
        ({"size": 0, "address": "tcp://127.0.0.1:1", "frame": 1024}, "size"),
        ({"size": 10, "address": "ipc:///x", "frame": 1024}, "address"),
        ({"size": 10, "address": "tcp://127.0.0.1:1", "frame": 1 << 40}, "frame"),
    ):
        with pytest.raises(TransportError, match=f"field '{field}'"):
            tcp_transport.TRANSPORT.attach([bad], context)
    with pytest.raises(TransportError, match="expected CURVE keys on the rank or insecure=True"):
        tcp_transport.TRANSPORT.attach([], ImportContext(rank=0, token="t"))


@contextlib.contextmanager
def hand_played_data_socket(size: int, frame: int, token: str) -> Iterator[tuple[Any, bytes, Any]]:
    """A sender's data socket played by hand, and a rank's tcp side attached to it (one slot):
    (the ROUTER, the rank's routing id once it said hello, the rank's Imported)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    desc = {"size": size, "address": f"tcp://127.0.0.1:{port}", "frame": frame}
    imported = tcp_transport.TRANSPORT.attach([desc], ImportContext(rank=0, token=token, insecure=True))
    try:
        assert router.poll(10_000), "the rank's data socket did not say hello"
        ident, hello = router.recv_multipart()
        assert hello == tcp_transport.HELLO
        yield router, ident, imported
    finally:
        imported.close()
        router.close(0)
        ctx.term()


def test_a_tcp_rank_skips_stale_frames_and_refuses_bad_ones() -> None:
    """A hand-played data socket: frames of another push are skipped, then a frame at the wrong
    offset is a ProtocolError naming both."""
    with hand_played_data_socket(1024, 512, "tok") as (router, ident, imported):
        assert ident == tcp_transport.data_identity("tok")
        imported.join({"push": 7}, 5.0)
        header = tcp_transport.HEADER
        router.send_multipart([ident, header.pack(6, 0, 0, 4), b"old!"])  # a frame of an aborted push
        router.send_multipart([ident, header.pack(7, 0, 0, 512), bytes(range(256)) * 2])
        router.send_multipart([ident, header.pack(7, 0, 512, 88), b"\x01" * 88])
        slot = imported.slots[0]
        slot.receive(0, None, 600, lambda: None, 5.0)
        assert bytes(slot.raw(0, 512)) == bytes(range(256)) * 2 and bytes(slot.raw(512, 88)) == b"\x01" * 88
        router.send_multipart([ident, header.pack(7, 1, 100, 10), b"x" * 10])
        with pytest.raises(ProtocolError, match=r"expected a frame of bucket 1 at offset 0 .* got bucket 1 at 100"):
            slot.receive(1, None, 600, lambda: None, 5.0)
        with pytest.raises(PeerTimeout, match="no data frame arrived"):
            slot.receive(2, None, 10, lambda: None, 0.3)


# --- fuzz: what a rank takes from the network -------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True),
                     st.text(max_size=40), st.binary(max_size=40))
_fields_st = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["store", "group", "world", "fresh", "timeout", "push", "x"]), _scalars, max_size=7))
_fuzz = settings(max_examples=400, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@_fuzz
@given(_fields_st)
def test_fuzz_begin_fields_of_the_network_transports_are_taken_or_refused_by_name(fields: Any) -> None:
    """Any BEGIN ``transport`` map a rank may be sent: a valid one, or a ProtocolError naming the field."""
    refusals = []
    try:
        c10d_fields("gloo", fields)
    except ProtocolError as exc:
        refusals.append(str(exc))
    imported = tcp_transport.TcpImported.__new__(tcp_transport.TcpImported)  # join touches no socket
    try:
        imported.join(fields, 1.0)
        assert isinstance(fields, dict) and type(fields["push"]) is int
    except ProtocolError as exc:
        refusals.append(str(exc))
    assert all("field 'transport'" in text for text in refusals), refusals


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=48), min_size=1, max_size=3))
def test_fuzz_tcp_data_frames_are_taken_skipped_or_refused(parts: list[bytes]) -> None:
    """Arbitrary data messages before a valid bucket: each is skipped or refused with a
    ProtocolError, never written past the slot, and a refusal leaves the socket in step."""
    with hand_played_data_socket(64, 32, "f") as (router, ident, imported):
        imported.join({"push": 5}, 1.0)
        router.send_multipart([ident, *parts])
        router.send_multipart([ident, tcp_transport.HEADER.pack(5, 0, 0, 16), b"y" * 16])
        slot = imported.slots[0]
        try:
            slot.receive(0, None, 16, lambda: None, 2.0)
        except ProtocolError:
            slot.receive(0, None, 16, lambda: None, 2.0)  # the bad message was consumed whole
        assert bytes(slot.raw(0, 16)) == b"y" * 16
