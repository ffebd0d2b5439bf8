"""Bounds on what a peer can make us spend (protocol v6): hostile frames cost a decode at
most 4x the frame + 64 MiB (measured as the peak RSS growth of the process that decodes
them), frames before the handshake are dropped undecoded above 64 KiB, a WELCOME cannot
make a rank ping 1000 times a second, and a manifest larger than one frame is split and
still commits bit-exact. Real processes, real sockets."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from fault_workers import BUCKET_BYTES, Collector, SenderProc, digests, make_weights
from hostile_workers import (
    HB,
    DaemonProc,
    FakeRouter,
    FrameTap,
    MiB,
    PeakMemory,
    begin_with_tiny_names,
    cap_address_space,
    nested_empty_arrays,
)

from weightstream import BucketSender, ReceiverDaemon
from weightstream.protocol import messages as m
from weightstream.receiver.sinks import NumpySink

# A process that decodes a hostile frame naively would grow by gigabytes; its address space
# is capped at what it maps + this, so such a decode fails with MemoryError (and the test
# with the figure) instead of taking the machine down.
CAP_HEADROOM = 2 << 30


def _bound(frame: bytes) -> int:
    """SPEC: the memory a decode costs stays under 4x the frame size + 64 MiB."""
    return 4 * len(frame) + 64 * MiB


# --- 6. a hostile frame at the sender, before HELLO ---------------------------------------------


@pytest.mark.timeout(180)
def test_hostile_frame_before_hello_at_the_sender(endpoint: str) -> None:
    collector = Collector()
    proc = SenderProc(endpoint)
    try:
        with ReceiverDaemon(endpoint, collector, rank=0, **HB):
            assert proc.request(cmd="wait", count=1, timeout=20)["ranks"] == [0]
            reply = proc.request(cmd="push", seed=6, version="v1")
            assert reply["ok"], reply

            frame = nested_empty_arrays(48 * MiB)
            cap_address_space(proc.pid, CAP_HEADROOM)
            mem = PeakMemory(proc.pid).start()
            ctx = zmq.Context()
            rogue = ctx.socket(zmq.DEALER)  # never says HELLO
            rogue.setsockopt(zmq.LINGER, 0)
            try:
                rogue.connect(endpoint)
                tracker = rogue.send(frame, copy=False, track=True)
                try:
                    tracker.wait(30)  # libzmq wrote it out (or dropped it with the connection)
                except zmq.NotDone:
                    pass
                time.sleep(0.5)  # let the sender's I/O thread take it in before the next push
                # the sender keeps serving: a real rank commits a push (after the sender has dealt with the frame)
                reply = proc.request(cmd="push", seed=6, version="v2", timeout=120)
            finally:
                rogue.close(linger=0)
                ctx.term()
            growth = mem.growth()
            print(f"sender: {len(frame) / MiB:.1f} MiB frame of nested empty arrays before HELLO -> peak RSS growth "
                  f"{growth / MiB:.1f} MiB (bound 4x frame + 64 MiB = {_bound(frame) / MiB:.0f} MiB; "
                  f"peak from VmHWM: {mem.hwm_reset})")
            assert reply["ok"] and reply["ranks"] == [0], reply
            assert collector.digests() == digests(make_weights(6, "v2"))
            bound = _bound(frame)
            assert growth < bound, f"sender grew by {growth / MiB:.0f} MiB for a {len(frame) / MiB:.0f} MiB frame"
    finally:
        proc.close()


# --- 7. a hostile frame at a rank, after WELCOME ---------------------------------------------------


HOSTILE_AT_RANK = {
    "nested_empty_arrays": lambda: nested_empty_arrays(48 * MiB),
    "begin_with_8MB_of_tiny_names": lambda: begin_with_tiny_names(8 * MiB),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(HOSTILE_AT_RANK))
def test_hostile_frame_at_a_rank(endpoint: str, case: str) -> None:
    frame = HOSTILE_AT_RANK[case]()
    fake = FakeRouter(endpoint, heartbeat_timeout=30.0)
    daemon = DaemonProc(endpoint, rank=0)
    try:
        fake.wait_for(m.Hello)
        fake.send(fake.welcome())
        deadline = time.monotonic() + 15
        while not daemon.status()["connected"] and time.monotonic() < deadline:
            fake.recv(0.05)
        assert daemon.status()["connected"]
        time.sleep(0.15)  # a rank answers at most one ERROR per 0.1 s

        cap_address_space(daemon.pid, CAP_HEADROOM)
        mem = PeakMemory(daemon.pid).start()
        fake.send_raw(frame)
        err = fake.wait_for(m.Error, timeout=120)
        growth = mem.growth()
        print(f"rank: {case} frame of {len(frame) / MiB:.1f} MiB -> peak RSS growth {growth / MiB:.1f} MiB "
              f"(bound 4x frame + 64 MiB = {_bound(frame) / MiB:.0f} MiB; peak from VmHWM: {mem.hwm_reset}); "
              f"ERROR {err.error}: {err.message[:160]}")
        assert err.error == "ProtocolError", err
        status = daemon.status()
        assert (status["last_error"] or "").startswith("ProtocolError"), status
        assert status["connected"] and status["model_intact"], status
        bound = _bound(frame)
        assert growth < bound, f"rank grew by {growth / MiB:.0f} MiB for a {len(frame) / MiB:.0f} MiB frame"

        # it keeps serving: the fake goes away, a real sender takes the endpoint and commits
        fake.close()
        with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB) as sender:
            assert sender.wait_for_receivers(1, timeout=20) == [0]
            report = sender.push(make_weights(7, "v1"), "v1")
            assert set(report.receivers) == {0}
            status = daemon.status(digests=True)
            assert status["digests"] == digests(make_weights(7, "v1")) and status["committed_version"] == "v1", status
    finally:
        daemon.stop()
        fake.close()


# --- 8. before WELCOME, big frames are dropped undecoded ----------------------------------------------


@pytest.mark.timeout(60)
def test_big_frame_before_welcome_is_dropped_undecoded(endpoint: str) -> None:
    fake = FakeRouter(endpoint)
    try:
        with ReceiverDaemon(endpoint, Collector(), rank=0, heartbeat_interval=0.1, heartbeat_timeout=30.0) as daemon:
            fake.wait_for(m.Hello)
            garbage = b"\xc1" + bytes(range(256)) * (4096 - 1) + b"\xc1" * 255  # 1 MiB, not msgpack
            assert len(garbage) == 1 << 20
            time.sleep(0.15)
            fake.send_raw(garbage)
            deadline = time.monotonic() + 10
            while daemon.status.last_error is None and time.monotonic() < deadline:
                fake.recv(0.05)
            last = daemon.status.last_error
            print(f"rank's last_error after a 1 MiB frame before WELCOME: {last!r}")
            assert last is not None, "the rank did not record the oversized frame before WELCOME"
            assert "msgpack" not in last, f"the 1 MiB frame was decoded before WELCOME: {last}"
            sizes = (str(len(garbage)), str(m.PRE_HELLO_MAX_BYTES), "64 KiB", "1 MiB")
            assert any(s in last for s in sizes), f"expected the frame's size or the limit named: {last}"
            assert not daemon.status.connected

            fake.send(fake.welcome())
            deadline = time.monotonic() + 10
            while not daemon.status.connected and time.monotonic() < deadline:
                fake.recv(0.05)
            assert daemon.status.connected
    finally:
        fake.close()


# --- 9. WELCOME's heartbeat interval is clamped ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_welcome_heartbeat_interval_is_clamped(endpoint: str) -> None:
    fake = FakeRouter(endpoint)
    try:
        with ReceiverDaemon(endpoint, Collector(), rank=0, heartbeat_interval=0.1, heartbeat_timeout=30.0) as daemon:
            fake.wait_for(m.Hello)
            fake.send(fake.welcome(heartbeat_interval=0.001, heartbeat_timeout=30.0))
            deadline = time.monotonic() + 10
            while not daemon.status.connected and time.monotonic() < deadline:
                fake.recv(0.05)
            assert daemon.status.connected
            start, until = fake.pings, time.monotonic() + 2.0
            while (left := until - time.monotonic()) > 0:
                fake.recv(left)
            pings = fake.pings - start
            print(f"PINGs in 2 s after a WELCOME with heartbeat_interval=0.001: {pings} (clamp 0.05 s -> ~40)")
            assert 1 <= pings <= 60, f"{pings} PINGs in 2 s; expected at most ~40 (interval clamped to 0.05 s)"
            assert daemon.status.connected
    finally:
        fake.close()


# --- 10. a manifest that needs more than one frame --------------------------------------------------------


TENSORS = 70_000
NAME_LEN = 1000


@pytest.mark.timeout(300)
def test_manifest_split_over_frames_commits_bit_exact(endpoint: str, endpoint_dir: Path) -> None:
    filler = ("abcdefghijklmnopqrstuvwxyz_" * 40)[: NAME_LEN - 8]
    names = [f"t{i:07d}{filler}" for i in range(TENSORS)]
    assert len(set(names)) == TENSORS and all(len(n) == NAME_LEN for n in names)
    # the names alone exceed one manifest frame: this push must be split
    assert sum(len(n) + 1 for n in names) > m.MANIFEST_PART_BYTES
    dtypes = [np.int8 if i % 2 else np.float32 for i in range(TENSORS)]
    state = {n: np.zeros(1, dt) for n, dt in zip(names, dtypes)}

    def weights(seed: int) -> list[tuple[str, np.ndarray]]:
        raw = np.random.default_rng(seed).integers(0, 256, size=4 * TENSORS, dtype=np.uint8)
        return [(n, raw[4 * i: 4 * i + dt(0).itemsize].view(dt).copy()) for i, (n, dt) in enumerate(zip(names, dtypes))]

    def flat(named: list[tuple[str, np.ndarray]] | dict[str, np.ndarray]) -> bytes:
        items = named.items() if isinstance(named, dict) else named
        return b"".join(n.encode() + a.tobytes() for n, a in items)

    started = time.monotonic()
    # the rank reaches the sender through a tap that records the frames the sender sends
    tapped = f"ipc://{endpoint_dir}/tap/t.sock"
    with BucketSender(endpoint, bucket_bytes=1 << 20, timeout=240.0) as sender:
        tap = FrameTap(endpoint, tapped)
        try:
            with ReceiverDaemon(tapped, NumpySink(state), rank=0) as daemon:
                assert sender.wait_for_receivers(1, timeout=20) == [0]
                for version, seed in (("v1", 101), ("v2", 102)):
                    seen = len(tap.frames)
                    pushed = weights(seed)
                    report = sender.push(pushed, version)
                    assert set(report.receivers) == {0} and report.tensors == TENSORS, report
                    daemon.wait_for_version(version, timeout=30)
                    assert flat({n: state[n] for n in names}) == flat(pushed), f"{version} is not bit-exact on the rank"
                    manifest = [(t, size) for t, size in tap.frames[seen:] if t in ("BEGIN", "MANIFEST")]
                    print(f"{version}: {TENSORS} tensors with {NAME_LEN}-character names in {report.seconds:.2f}s; "
                          f"manifest frames {[(t, round(size / MiB, 1)) for t, size in manifest]} (MiB)")
                    if version == "v1":  # ~70 MB of manifest: a BEGIN and one MANIFEST, each within the part size
                        assert [t for t, _ in manifest] == ["BEGIN", "MANIFEST"], manifest
                    assert all(size <= m.MANIFEST_PART_BYTES + (64 << 10) for _, size in manifest), manifest
        finally:
            tap.close()
    print(f"whole test: {time.monotonic() - started:.1f}s")
