"""End to end over real ZMQ sockets and real shared memory, receivers in spawned processes.

Every check is bit-exact: digests of raw bytes plus dtype and shape (NaN payloads included).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue as queue_mod
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import workers as w

from weightstream import (
    BucketSender,
    ManifestMismatch,
    PeerLost,
    ReceiverDaemon,
    RemoteError,
    WeightstreamError,
)
from weightstream import native as speedups
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("spawn")
BUCKET = 4096
EVENT_TIMEOUT = 90.0  # a spawned rank importing torch/paddle on a busy 2-core box


_BucketSender = BucketSender
_ReceiverDaemon = ReceiverDaemon
RANKS_INSECURE = False  # the ranks' insecure=: a c10d group (and plain tcp data) needs it on both sides


@pytest.fixture(params=["shm", "frames", "tcp", "gloo"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs over shm, the tests' own transport (frame_transport: bucket bytes as data
    frames beside BUCKET, registered in one line), and the cross-host ones on loopback (tcp's data
    socket, a gloo group per push): the same checks hold for any transport behind the interface."""
    if request.param == "gloo":
        pytest.importorskip("torch")  # a c10d group needs torch on both sides (CI's NumPy-1.24 env has none)
    network = request.param in ("tcp", "gloo")
    options: dict[str, Any] = {"transport": request.param, **({"insecure": True} if network else {})}
    monkeypatch.setattr(sys.modules[__name__], "BucketSender", functools.partial(_BucketSender, **options))
    monkeypatch.setattr(sys.modules[__name__], "RANKS_INSECURE", network)
    if network:
        monkeypatch.setattr(sys.modules[__name__], "ReceiverDaemon", functools.partial(_ReceiverDaemon, insecure=True))
    return str(request.param)


class Ranks:
    """Spawned receiver processes and their report queue."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.queue: Any = CTX.Queue()
        self.procs: dict[int, Any] = {}
        self.pending: dict[int, list[dict[str, Any]]] = {}

    def spawn(
        self, rank: int, kind: str, seed: int, versions: list[str], delay: float = 0.0, direct: bool = False
    ) -> None:
        proc = CTX.Process(
            target=w.receiver_main,
            args=(self.endpoint, rank, kind, seed, versions, self.queue, 60.0, delay, direct, RANKS_INSECURE),
            name=f"ws-test-rank{rank}",
            daemon=True,
        )
        proc.start()
        self.procs[rank] = proc
        self.pending[rank] = []

    def next(self, rank: int, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.pending[rank]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"rank {rank} reported nothing within {timeout}s (alive: {self.procs[rank].is_alive()})")
            try:
                event = self.queue.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                continue
            self.pending[event["rank"]].append(event)
        event = self.pending[rank].pop(0)
        if event["event"] == "crashed":
            raise AssertionError(f"rank {rank} crashed: {event['error']}\n{event['tb']}")
        return event

    def expect(self, rank: int, kind: str, version: str | None = None) -> dict[str, Any]:
        event = self.next(rank)
        assert event["event"] == kind, f"rank {rank}: expected {kind} {version}, got {event}"
        if version is not None:
            assert event["version"] == version
        return event

    def close(self) -> None:
        for proc in self.procs.values():
            proc.join(timeout=15)
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.queue.close()
        self.queue.join_thread()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expected(named: dict[str, Any]) -> dict[str, w.Digest]:
    return {name: w.digest(t) for name, t in named.items()}


def finish(ranks: Ranks, *rank_ids: int) -> None:
    for rank in rank_ids:
        done = ranks.expect(rank, "done")
        assert done["status"]["state"] == "stopped"


# --- every dtype and edge shape ------------------------------------------------------

ALL_DTYPES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16",
    "float32", "float64", "float8_e4m3fn", "float8_e5m2",
]


def _random(dtype_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return w.make_weights({"x": (dtype_name, shape)}, int(rng.integers(1 << 30)))["x"]


def dtype_version(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All 12 dtypes: odd sizes (not multiples of 256 bytes), 0-d scalars, empty tensors."""
    out: dict[str, np.ndarray] = {}
    for dt in ALL_DTYPES:
        out[f"odd.{dt}.weight"] = _random(dt, (3, 37), rng)
        out[f"scalar.{dt}"] = _random(dt, (), rng)
        out[f"empty.{dt}"] = _random(dt, (0,), rng)
        out[f"empty2d.{dt}"] = _random(dt, (4, 0), rng)
    # NaN, inf and signed zeros in every float dtype travel as bytes
    for dt in ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"):
        np_dt = w.by_name(dt).numpy
        out[f"special.{dt}"] = np.array([np.nan, -0.0, 0.0, 1.5, -2.0], dtype=np_dt)
    out["模型.层.0.权重"] = _random("float32", (5, 7), rng)
    out["emoji.🙂.w"] = _random("bfloat16", (11,), rng)
    out["a.b.c.d.e.f.g"] = _random("int32", (1,), rng)
    # non-contiguous inputs travel in C order
    out["strided.transposed"] = _random("float32", (6, 9), rng).T
    out["strided.every_other"] = _random("int64", (20,), rng)[::2]
    out["strided.fortran"] = np.asfortranarray(_random("bfloat16", (5, 4), rng))
    return out


def test_every_dtype_edge_shape_exact_fill_and_chunking(endpoint: str, transport: str) -> None:
    rng = np.random.default_rng(7)
    versions = {
        "dtypes": dtype_version(rng),
        # two tensors of exactly one bucket each: two full buckets, no padding
        "exact": {"fill.a": _random("float32", (BUCKET // 4,), rng), "fill.b": _random("uint8", (BUCKET,), rng)},
        # a small tensor, then one of 3 buckets + 100 bytes that starts in the rest of bucket 0
        "chunked": {
            "head": _random("int8", (10,), rng),
            "big.weight": _random("uint8", (3 * BUCKET + 100,), rng),
            "big.float": _random("float32", (3, 1111), rng),
            "tail": _random("float16", (3,), rng),
        },
    }
    assert versions["dtypes"]["special.float32"].dtype == np.float32
    assert versions["dtypes"]["special.bfloat16"].dtype == ml_dtypes.bfloat16
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, "collector", 0, list(versions))  # started before the sender
        ranks.expect(0, "started")
        with BucketSender(endpoint, receivers=1, bucket_bytes=BUCKET, num_buffers=2, timeout=60) as sender:
            for version, named in versions.items():
                report = sender.push(named.items(), version=version)
                want = expected(named)
                got = ranks.expect(0, "committed", version)
                assert got["received"] == want, f"{version}: received tensors differ"
                model = {k: v for k, v in got["model"].items() if k in want}
                assert model == want, f"{version}: model differs"
                total = sum(a.nbytes for a in named.values())
                assert (report.version, report.tensors, report.bytes) == (version, len(named), total)
                assert set(report.receivers) == {0}
                assert report.receivers[0].tensors == len(named)
                if version == "exact":
                    assert report.buckets == 2
                if version == "chunked":
                    assert report.buckets >= 5
        finish(ranks, 0)


# --- two receivers, three versions, each framework --------------------------------------

def trainer_tensors(kind: str, seed: int) -> list[tuple[str, Any]]:
    """What a trainer of that framework pushes: its model's parameters (requiring grad) and buffers."""
    if kind == "numpy":
        return list(w.make_weights(w.NUMPY_SPECS, seed).items())
    model = w.build_torch(w.TORCH_SPECS, seed) if kind == "torch" else w.build_paddle(w.PADDLE_SPECS, seed)
    return [*model.named_parameters(), *model.named_buffers()]


@pytest.mark.parametrize("direct", [False, True], ids=["load_weights", "direct"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "paddle"])
def test_two_receivers_three_versions_reusing_slots(endpoint: str, transport: str, kind: str, direct: bool) -> None:
    """Every tensor through load_weights (a recording wrapper), or, given the sink itself, copied
    straight into the model's memory (direct mode: load_weights sees none of them)."""
    two_receivers_three_versions(endpoint, kind, direct, native=speedups.NATIVE)


@pytest.mark.parametrize("direct", [False, True], ids=["load_weights", "direct"])
def test_without_the_c_accelerator_the_same_bytes_arrive(
    endpoint: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an install without a C compiler runs: the pure-Python copy loops on both sides."""
    monkeypatch.setenv("WEIGHTSTREAM_PURE_PYTHON", "1")  # read at import by the spawned ranks
    monkeypatch.setattr(speedups, "NATIVE", False)  # this process imported spans already
    two_receivers_three_versions(endpoint, "numpy", direct, native=False)


@pytest.mark.parametrize("direct", [False, True], ids=["load_weights", "direct"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_streaming_stores_land_the_same_bytes(
    endpoint: str, kind: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy into and out of the slots by streaming stores (chosen by size for slots of at
    least half the cache, forced here for 4 KiB ones): whole tensors, chunk pieces
    written into the model, torch sources, each bit-exact on both ranks."""
    monkeypatch.setenv("WEIGHTSTREAM_STREAMING_STORES", "1")  # read per slot, here and in the spawned ranks
    two_receivers_three_versions(endpoint, kind, direct, native=speedups.NATIVE)


def two_receivers_three_versions(endpoint: str, kind: str, direct: bool, native: bool) -> None:
    specs = w.SPECS[kind]
    versions = ["v1", "v2", "v3"]
    initial = expected(w.make_weights(specs, 100))
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, kind, 100, versions, direct=direct)  # rank 0 before the sender binds
        with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, num_buffers=2, timeout=60) as sender:
            ranks.spawn(1, kind, 100, versions, direct=direct)  # rank 1 after
            for rank in (0, 1):
                started = ranks.expect(rank, "started")
                assert started["model"] == initial
                assert started["native"] is native
            sender.wait_for_receivers(2, timeout=EVENT_TIMEOUT)
            for seed, version in enumerate(versions, start=1):
                weights = w.make_weights(specs, seed)
                named = trainer_tensors(kind, seed)
                report = sender.push(named, version=version)
                assert report.buckets > 2, "the model must span more buckets than slots"
                assert set(report.receivers) == {0, 1}
                want = expected(weights)
                assert want != initial
                for rank in (0, 1):
                    got = ranks.expect(rank, "committed", version)
                    assert got["model"] == want, f"rank {rank} {version}: model is not bit-exact"
                    if direct:  # the daemon was given the sink, not the recording wrapper
                        assert got["received"] == {}
                    else:
                        assert got["received"], "load_weights saw no tensors"
                    for name, d in got["received"].items():
                        assert d == want[name], f"rank {rank} {version}: received {name} differs"
                    assert got["status"]["committed_version"] == version
                    assert got["status"]["model_intact"] is True
                    assert report.receivers[rank].tensors == len(weights)
        finish(ranks, 0, 1)


# --- load_weights raising ---------------------------------------------------------------

def test_load_weights_error_becomes_remote_error_and_daemon_keeps_serving(endpoint: str, transport: str) -> None:
    state: dict[str, np.ndarray] = {}
    sink = NumpySink(state)
    calls: list[int] = []

    def load_weights(weights: Any) -> None:
        calls.append(1)
        for name, tensor in weights:
            if name == "poison":
                raise ValueError(f"cannot load {name!r}: shape {list(tensor.shape)} is not what the layer wants")
            sink.load_one(name, tensor)

    good = {"a.weight": np.arange(300, dtype=np.float32), "b": np.ones((2, 3), dtype=np.int64)}
    bad = {**good, "poison": np.zeros(5, dtype=np.float16)}
    with BucketSender(endpoint, bucket_bytes=BUCKET, num_buffers=2, timeout=30) as sender:
        daemon = ReceiverDaemon(endpoint, load_weights, rank=3, heartbeat_interval=0.2).start()
        try:
            with pytest.raises(RemoteError) as info:
                sender.push(bad.items(), version="bad")
            err = info.value
            assert err.rank == 3
            assert err.remote_type == "ValueError"
            assert "cannot load 'poison'" in str(err) and "rank 3" in str(err)
            with pytest.raises(RemoteError):
                daemon.wait_for_version("bad", timeout=5)
            # "a.weight" and "b" were loaded before "poison": the model is no longer intact
            assert daemon.status.model_intact is False
            assert "poison" in (daemon.status.last_error or "")
            sender.push(good.items(), version="good")
            daemon.wait_for_version("good", timeout=10)
            assert daemon.committed_version == "good"
            assert expected(state) == expected(good)
            assert daemon.status.model_intact is True and daemon.status.state == "idle"
        finally:
            daemon.stop()


# --- version.yaml -------------------------------------------------------------------------

def test_version_from_version_yaml(endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "version.yaml").write_text("step: 42\n")
    state: dict[str, np.ndarray] = {}
    named = {"w": np.arange(10, dtype=np.float64)}
    with BucketSender(endpoint, bucket_bytes=BUCKET, model_dir=tmp_path, timeout=30) as sender:
        with ReceiverDaemon(endpoint, NumpySink(state), heartbeat_interval=0.2) as daemon:
            report = sender.push(named.items())
            assert report.version == "42"
            daemon.wait_for_version("42", timeout=10)
            assert expected(state) == expected(named)
            (tmp_path / "version.yaml").write_text("step: step_43\n")
            assert sender.push(named.items()).version == "step_43"
            assert daemon.committed_version == "step_43"


def test_push_without_version_or_model_dir_says_how_to_fix(endpoint: str) -> None:
    with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=5) as sender:
        with pytest.raises(WeightstreamError, match="version"):
            sender.push([("w", np.zeros(3, np.float32))])


# --- peers coming and going -----------------------------------------------------------------

def test_a_restarted_sender_at_the_same_endpoint_is_served(endpoint: str) -> None:
    state: dict[str, np.ndarray] = {}
    v1 = {"w": np.arange(5000, dtype=np.float32)}
    v2 = {"w": -np.arange(5000, dtype=np.float32), "new": np.ones(3, np.int8)}
    with ReceiverDaemon(endpoint, NumpySink(state), heartbeat_interval=0.1) as daemon:
        with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30, heartbeat_interval=0.1) as sender:
            sender.push(v1.items(), version="v1")
        with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30, heartbeat_interval=0.1) as sender:
            sender.push(v2.items(), version="v2")
        assert daemon.committed_version == "v2"
        assert expected(state) == expected(v2)


def test_a_repeated_layout_is_named_and_a_new_rank_or_layout_gets_the_manifest(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Protocol v5: a rank that took a layout is sent only its number on the next push; a restarted
    rank, a changed layout and a rank that rejected the last BEGIN get the manifest. Bit-exact."""
    def version(seed: int, extra: bool = False) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {f"layer.{i}.w": rng.standard_normal(300 + i, dtype=np.float32) for i in range(40)}
        if extra:
            out["head.bias"] = rng.integers(-9, 9, 7, dtype=np.int64)
        return out

    def begins(since: int) -> list[str]:
        return [r.getMessage() for r in caplog.records[since:] if r.getMessage().startswith("BEGIN ")]

    caplog.set_level("DEBUG", logger="weightstream.sender")
    states: list[dict[str, np.ndarray]] = [{}, {}]
    pushes = [("v1", version(1)), ("v2", version(2)), ("v3", version(3)), ("v4", version(4, True)), ("v5", version(5, True))]
    want = [
        "layout 1 named to ranks: none; its manifest sent to ranks: 0, 1",
        "layout 1 named to ranks: 0, 1; its manifest sent to ranks: none",
        "layout 1 named to ranks: 0; its manifest sent to ranks: 1",  # rank 1 restarted before v3
        "layout 2 named to ranks: none; its manifest sent to ranks: 0, 1",
        "layout 2 named to ranks: 0, 1; its manifest sent to ranks: none",
    ]
    with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, timeout=30, heartbeat_interval=0.1) as sender:
        daemons = [ReceiverDaemon(endpoint, NumpySink(states[r]), rank=r, heartbeat_interval=0.1).start() for r in (0, 1)]
        try:
            for (name, weights), line in zip(pushes, want):
                if name == "v3":
                    daemons[1].stop()
                    states[1] = {}
                    daemons[1] = ReceiverDaemon(endpoint, NumpySink(states[1]), rank=1, heartbeat_interval=0.1).start()
                    sender.wait_for_receivers(2, timeout=30)
                    deadline = time.monotonic() + 10  # the old rank's BYE, then the new one's HELLO
                    while 1 not in sender.wait_for_receivers(2) and time.monotonic() < deadline:
                        time.sleep(0.05)
                since = len(caplog.records)
                sender.push(weights.items(), version=name)
                assert begins(since) == [f"BEGIN {name}: {line}"]
                for r in (0, 1):
                    daemons[r].wait_for_version(name, timeout=30)
                    assert expected(states[r]) == expected(weights)
            # a rank that rejects a BEGIN is sent the manifest next time, even of the same layout
            fixed = ReceiverDaemon(endpoint, NumpySink(dict(version(6))), rank=2, heartbeat_interval=0.1).start()
            daemons.append(fixed)  # a model without head.bias
            sender.wait_for_receivers(3, timeout=30)
            for name, line in [("v6", "0, 1; its manifest sent to ranks: 2")] * 2:
                since = len(caplog.records)
                with pytest.raises(ManifestMismatch, match=r"head.bias"):
                    sender.push(version(7, True).items(), version=name)
                assert begins(since) == [f"BEGIN {name}: layout 2 named to ranks: {line}"]
        finally:
            for daemon in daemons:
                daemon.stop()
    assert expected(states[0]) == expected(states[1]) == expected(version(5, True))


def test_a_receiver_killed_mid_version_fails_the_push_with_peer_lost(endpoint: str, transport: str) -> None:
    """The dead peer is noticed by heartbeat; push raises PeerLost instead of hanging."""
    weights = w.make_weights(w.NUMPY_SPECS, 1)
    with Ranks(endpoint) as ranks:
        with BucketSender(endpoint, receivers=1, bucket_bytes=BUCKET, timeout=60,
                          heartbeat_interval=0.1, heartbeat_timeout=1.0) as sender:
            ranks.spawn(0, "numpy", 0, ["v1"], delay=0.5)  # load_weights takes ~7 s
            ranks.expect(0, "started")
            sender.wait_for_receivers(1, timeout=EVENT_TIMEOUT)
            killer = threading.Timer(1.0, ranks.procs[0].kill)
            killer.start()
            try:
                with pytest.raises(PeerLost) as info:
                    sender.push(weights.items(), version="v1")
            finally:
                killer.cancel()
            assert info.value.rank == 0 or "rank 0" in str(info.value)


@pytest.mark.parametrize(("num_buffers", "prefetch"), [(1, 1), (3, 4)])
def test_ring_and_prefetch_sizes(endpoint: str, transport: str, num_buffers: int, prefetch: int) -> None:
    """One slot (every bucket waits for the previous ack) and more slots than buckets in flight."""
    state: dict[str, np.ndarray] = {}
    with BucketSender(endpoint, bucket_bytes=BUCKET, num_buffers=num_buffers, timeout=30) as sender:
        with ReceiverDaemon(endpoint, NumpySink(state), prefetch=prefetch, heartbeat_interval=0.2) as daemon:
            for seed in (1, 2):
                weights = w.make_weights(w.NUMPY_SPECS, seed)
                report = sender.push(weights.items(), version=f"s{seed}")
                assert report.buckets > num_buffers
                assert daemon.committed_version == f"s{seed}"
                assert expected(state) == expected(weights)


def test_an_empty_version_commits(endpoint: str, transport: str) -> None:
    calls: list[list[str]] = []

    def load_weights(weights: Any) -> None:
        calls.append([name for name, _ in weights])

    with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30) as sender:
        with ReceiverDaemon(endpoint, load_weights, heartbeat_interval=0.2) as daemon:
            report = sender.push([], version="nothing")
            assert (report.tensors, report.bytes, report.buckets) == (0, 0, 0)
            assert daemon.committed_version == "nothing"
            assert calls == [[]]


@pytest.mark.asyncio
async def test_serve_in_the_hosts_own_event_loop(endpoint: str) -> None:
    """``await daemon.serve()`` in a loop the rank owns, while the trainer pushes from a thread."""
    import asyncio

    state: dict[str, np.ndarray] = {}
    weights = w.make_weights(w.NUMPY_SPECS, 4)
    daemon = ReceiverDaemon(endpoint, NumpySink(state), heartbeat_interval=0.1)
    serving = asyncio.ensure_future(daemon.serve())
    try:
        def trainer() -> str:
            with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30) as sender:
                return sender.push(weights.items(), version="async").version

        assert await asyncio.wait_for(asyncio.to_thread(trainer), timeout=60) == "async"
        assert daemon.committed_version == "async"
        assert expected(state) == expected(weights)
    finally:
        daemon.stop()
        await asyncio.wait_for(serving, timeout=10)
    assert daemon.status.state == "stopped"


def test_wait_for_version_times_out_with_peer_timeout(endpoint: str) -> None:
    from weightstream import PeerTimeout

    with ReceiverDaemon(endpoint, NumpySink({}), heartbeat_interval=0.1) as daemon:
        with pytest.raises(PeerTimeout, match="never"):
            daemon.wait_for_version("never", timeout=0.3)


def test_a_slot_is_reused_only_after_every_rank_acked_it(endpoint: str, transport: str) -> None:
    """A fast and a slow rank: were a slot refilled after only the fast rank's ACK, the slow
    rank's model (copied after a per-tensor delay) would not be bit-exact."""
    versions = ["v1", "v2"]
    with Ranks(endpoint) as ranks:
        ranks.spawn(0, "numpy", 0, versions)
        ranks.spawn(1, "numpy", 0, versions, delay=0.03)
        with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, num_buffers=2, timeout=60) as sender:
            for rank in (0, 1):
                ranks.expect(rank, "started")
            for seed, version in enumerate(versions, start=1):
                weights = w.make_weights(w.NUMPY_SPECS, seed)
                report = sender.push(weights.items(), version=version)
                assert report.buckets > 2
                for rank in (0, 1):
                    assert ranks.expect(rank, "committed", version)["model"] == expected(weights)
        finish(ranks, 0, 1)


# --- the manifest check is skipped only while nothing changed ------------------------------

def test_a_replaced_param_is_checked_again(endpoint: str) -> None:
    """The daemon skips re-checking an unchanged manifest against unchanged specs; replacing an
    array in the model's dict (new shape) must bring the check back and reject the old shape."""
    state = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(3, np.int64)}
    sink = NumpySink(state)
    named = {"w": np.ones((4, 4), np.float32), "b": np.arange(3, dtype=np.int64)}
    with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30) as sender:
        with ReceiverDaemon(endpoint, sink, heartbeat_interval=0.2) as daemon:
            sender.push(named.items(), version="v1")
            specs = sink.param_specs()
            sender.push(named.items(), version="v2")
            assert sink.param_specs() is specs  # unchanged: the same object, so the check was skipped
            assert expected(state) == expected(named)
            state["w"] = np.zeros((2, 8), np.float32)  # the model changed shape under the daemon
            with pytest.raises(ManifestMismatch, match=r"w: expected float32\[2, 8\], got float32\[4, 4\]"):
                sender.push(named.items(), version="v3")
            assert daemon.committed_version == "v2"
            assert not state["w"].any(), "a rejected version must not touch the model"


def _moving_model(framework: str) -> tuple[Any, Any, Any, Any]:
    """(sink, weight shape, move(): give the weight new memory and return the old one, read(t))."""
    if framework == "torch":
        torch = pytest.importorskip("torch")
        from weightstream.receiver.sinks import TorchModuleSink

        module = torch.nn.Linear(8, 4)

        def move() -> Any:
            old = module.weight.data
            module.weight.data = torch.zeros(4, 8)  # new memory, same Parameter object
            return old

        return TorchModuleSink(module), (4, 8), move, lambda: (module.weight.detach().numpy(), module.bias.detach().numpy())
    paddle = pytest.importorskip("paddle")
    from weightstream.receiver.sinks import PaddleLayerSink

    layer = paddle.nn.Linear(8, 4)

    def move() -> Any:
        old = layer.weight
        layer.weight = paddle.create_parameter([8, 4], "float32")  # a new parameter, new memory
        return old

    return PaddleLayerSink(layer), (8, 4), move, lambda: (layer.weight.numpy(), layer.bias.numpy())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_a_param_whose_memory_moves_gets_the_next_version(endpoint: str, framework: str) -> None:
    """A framework sink keeps its specs (and so the daemon its direct-copy destinations) while
    every tensor stays where it was. When a parameter's memory moves (torch ``.data = ...``, a
    new Paddle parameter), the next version must land in the new memory, bit-exact."""
    sink, shape, move, read = _moving_model(framework)
    with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30) as sender:
        with ReceiverDaemon(endpoint, sink, heartbeat_interval=0.2) as daemon:
            for step in range(2):
                named = {"weight": np.full(shape, step, np.float32), "bias": np.arange(4, dtype=np.float32) + step}
                sender.push(named.items(), version=f"v{step}")
            specs = sink.param_specs()
            assert sink.param_specs() is specs, "unchanged model: the same specs object"
            old = move()
            assert sink.param_specs() is not specs
            named = {"weight": np.full(shape, 7, np.float32), "bias": np.full(4, 9, np.float32)}
            sender.push(named.items(), version="v2")
            assert daemon.committed_version == "v2"
    weight, bias = read()
    assert weight.tobytes() == named["weight"].tobytes() and bias.tobytes() == named["bias"].tobytes()
    assert old.numpy().tolist() == np.full(shape, 1, np.float32).tolist(), "the old memory is left alone"
