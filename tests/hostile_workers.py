"""Helpers for the identity and bounds tests (test_identity.py, test_bounds.py).

- ``DaemonProc``: a ReceiverDaemon (with a copying Collector) in a spawned process,
  driven over a Pipe; its status comes back as ``dataclasses.asdict(daemon.status)``,
  so fields added to DaemonStatus (``reconnects``, ...) show up without changes here.
- ``FakeRouter``: a bare ROUTER bound at an endpoint with real shm slots, that plays the
  sender's side of the protocol by hand (HELLO -> WELCOME, PING -> PONG, raw frames).
- Hostile frames: ``nested_empty_arrays`` (a tree of empty msgpack arrays, every array of
  at most 64 items, so only a bound on containers per frame stops it) and
  ``begin_with_tiny_names`` (a BEGIN whose names bin is millions of 1-character names).
- Memory of another process: current RSS, its peak (VmHWM, reset through
  /proc/<pid>/clear_refs), and a cap on its address space, so a decoder that does expand
  a hostile frame fails with MemoryError instead of eating the machine.
- ``hello``: a HELLO as a rank would send it, with any session token.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

import psutil
import zmq
from fault_workers import wait_until as wait_until  # the tests import it from here too
from hand_router import HandRouter

HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}


# --- a daemon in a spawned process ------------------------------------------------------


class DaemonProc:
    """A ReceiverDaemon with a fault_workers.Collector in a spawned process."""

    _ctx = mp.get_context("spawn")

    def __init__(self, endpoint: str, rank: int = 0, **opts: Any) -> None:
        self.rank = rank
        self._conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_daemon_main, args=(child, endpoint, rank, {**HB, **opts}), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        if not self._conn.poll(60.0):
            self.kill()
            raise TimeoutError(f"daemon process of rank {rank} did not start")
        started = self._conn.recv()
        if not started.get("started"):
            self.kill()
            raise RuntimeError(f"daemon process of rank {rank} failed to start: {started}")

    def request(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"daemon process of rank {self.rank} gave no reply to {cmd} within {timeout}s")
        return self._conn.recv()  # type: ignore[no-any-return]

    def status(self, digests: bool = False) -> dict[str, Any]:
        """asdict(daemon.status) plus ``handed`` (tensors given to load_weights) and optionally digests."""
        return self.request(cmd="status", digests=digests)

    def wait_status(self, predicate: Any, timeout: float) -> dict[str, Any]:
        """Poll the status until ``predicate(status)``; return the last status either way."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if predicate(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (kill -9): no BYE, no cleanup in the child."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self._conn.close()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.request(timeout=20.0, cmd="stop")
            except Exception:
                pass
            self.proc.join(20)
        self.kill()


def _daemon_main(conn: Any, endpoint: str, rank: int, opts: dict[str, Any]) -> None:
    try:
        from fault_workers import Collector

        from weightstream import ReceiverDaemon

        logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
        collector = Collector()
        daemon = ReceiverDaemon(endpoint, collector, rank=rank, **opts)
        daemon.start()
    except BaseException as exc:
        conn.send({"started": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"started": True, "pid": os.getpid()})
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            daemon.stop()
            return
        if cmd["cmd"] == "status":
            out = dataclasses.asdict(daemon.status)
            out["handed"] = collector.handed
            out["digests"] = collector.digests() if cmd.get("digests") else None
            conn.send(out)
        elif cmd["cmd"] == "stop":
            daemon.stop()
            conn.send({"ok": True})
            return


# --- a hand-played sender ---------------------------------------------------------------


class FakeRouter(HandRouter):
    """A ROUTER at ``endpoint`` speaking the sender's side by hand. Single-threaded: the test
    calls ``recv``/``wait_for``, which answer PING with PONG on the way."""

    def __init__(self, endpoint: str, *, slot_bytes: int = 4096, slots: int = 2, session: str = "fake0001",
                 heartbeat_interval: float = 0.2, heartbeat_timeout: float = 30.0) -> None:
        from weightstream.protocol.transports.shm import TRANSPORT
        from weightstream.security import prepare_ipc_endpoint

        self.session = session
        self.slot_bytes = slot_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        prepare_ipc_endpoint(endpoint)
        self.slots = TRANSPORT.create_slots(slots, slot_bytes, session=self.session)
        super().__init__(endpoint, pong_session=session, unbounded_send=True)
        self.closed = False

    def wait_for(self, kind: type, timeout: float = 10.0) -> Any:
        msg = self.poll_for(kind, timeout)
        if msg is None:
            raise AssertionError(f"no {kind.TYPE} reached the fake sender within {timeout}s")  # type: ignore[attr-defined]
        return msg

    def welcome(self, **changes: Any) -> Any:
        from weightstream.protocol import messages as m

        fields = dict(
            session=self.session, transport="shm", bucket_bytes=self.slot_bytes, alignment=m.ALIGNMENT,
            slots=[s.descriptor() for s in self.slots], heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout, pid=os.getpid(),
        )
        fields.update(changes)
        return m.Welcome(**fields)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_socket()
        for slot in self.slots:
            slot.close()


def hello(rank: int, session: str) -> Any:
    """A HELLO as a real rank sends it (same host, shm), claiming ``rank`` with ``session``."""
    from weightstream.protocol import messages as m
    from weightstream.protocol.transports import available_transports
    from weightstream.protocol.transports.cuda_ipc.wire import device_identity
    from weightstream.protocol.transports.shm import host_identity

    return m.Hello(rank=rank, session=session, transports=available_transports(), host=host_identity(),
                   device=device_identity(), pid=os.getpid())


def read_reply(sock: zmq.Socket, timeout: float) -> Any:
    """The first decodable message a raw DEALER gets within ``timeout`` (None if none)."""
    from weightstream.protocol import messages as m

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        frames = sock.recv_multipart()
        try:
            return m.decode(frames[-1])
        except Exception:
            continue
    return None


class FrameTap:
    """A forwarding proxy between one rank and a sender that records what the sender sends.

    The rank connects to ``downstream`` (a ROUTER here); each of its frames goes on to the
    sender at ``upstream`` through one DEALER, and the sender's frames come back to the
    rank's latest connection. ``frames`` lists (message type, frame bytes) of every frame the
    sender sent, read off the frame's first key without decoding the rest."""

    def __init__(self, upstream: str, downstream: str) -> None:
        from weightstream.security import prepare_ipc_endpoint

        prepare_ipc_endpoint(downstream)
        self.frames: list[tuple[str, int]] = []
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind(downstream)
        self._back = self._ctx.socket(zmq.DEALER)
        self._back.setsockopt(zmq.LINGER, 0)
        self._back.connect(upstream)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def frame_type(frame: bytes) -> str:
        # encode() writes {"type": NAME, ...} with "type" first: fixmap, fixstr "type", fixstr NAME
        if len(frame) > 7 and frame[1:6] == b"\xa4type" and 0xA0 <= frame[6] <= 0xBF:
            return frame[7:7 + frame[6] - 0xA0].decode("ascii", "replace")
        return "?"

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        ident = b""
        while not self._stop.is_set():
            events = dict(poller.poll(20))
            if self._front in events:
                ident, *rest = self._front.recv_multipart()
                self._back.send_multipart(rest)
            if self._back in events:
                frames = self._back.recv_multipart()
                self.frames.append((self.frame_type(frames[-1]), len(frames[-1])))
                if ident:
                    try:
                        self._front.send_multipart([ident, *frames])
                    except zmq.ZMQError:
                        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._front.close(linger=0)
        self._back.close(linger=0)
        self._ctx.term()


# --- hostile frames -----------------------------------------------------------------------


def nested_empty_arrays(target_bytes: int) -> bytes:
    """A msgpack frame of ~``target_bytes`` that is nothing but empty arrays in a tree of fanout
    64: ~1 container per byte, yet no array holds more than 64 items (a per-array limit alone
    does not stop it). Expanded naively it is ~70 bytes of Python objects per frame byte."""
    head = b"\xdc\x00\x40"  # array16 of 64 items
    leaf = head + b"\x90" * 64
    l2 = head + leaf * 64
    l3 = head + l2 * 64
    l4 = head + l3 * 64
    children: list[bytes] = []
    size = 3
    for block in (l4, l3, l2, leaf, b"\x90"):
        while len(children) < 64 and size + len(block) <= target_bytes:
            children.append(block)
            size += len(block)
    return b"\xdc" + len(children).to_bytes(2, "big") + b"".join(children)


def begin_with_tiny_names(names_bytes: int, version: str = "hostile") -> bytes:
    """A BEGIN frame whose names bin is ``names_bytes`` of 1-character names joined by NUL.

    The characters are U+0100..U+07FF (2 bytes of UTF-8, so 3 bytes a name): CPython caches
    only Latin-1 one-character strings, so a naive split makes ~2.8M str objects of 8 MB."""
    import msgpack

    from weightstream.protocol import messages as m

    block = "\0".join(chr(c) for c in range(0x100, 0x800)).encode("utf-8") + b"\0"
    blob = (block * (names_bytes // len(block) + 1))[:names_bytes]
    blob = blob.rstrip(b"\0")
    while True:  # end on a whole character, not a NUL
        try:
            blob.decode("utf-8")
            break
        except UnicodeDecodeError:
            blob = blob[:-1].rstrip(b"\0")
    body = {"type": "BEGIN", "v": m.PROTOCOL_VERSION, "version": version, "names": blob, "dtypes": b"",
            "ndims": b"", "dims": b"", "total_bytes": 0, "buckets": 1}
    return msgpack.packb(body, use_bin_type=True)


# --- memory of another process ------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def cap_address_space(pid: int, headroom: int) -> None:
    """Limit ``pid``'s address space to what it maps now + ``headroom`` (soft limit only)."""
    proc = psutil.Process(pid)
    _, hard = proc.rlimit(psutil.RLIMIT_AS)
    proc.rlimit(psutil.RLIMIT_AS, (_status_kb(pid, "VmSize") + headroom, hard))


class PeakMemory:
    """The peak RSS growth of a process over a stretch of a test.

    ``start()`` takes the current RSS as the base and resets the kernel's peak (VmHWM) to it;
    ``growth()`` is the peak since then minus the base. Where the reset is not allowed, a
    thread samples the RSS every 5 ms instead (and the larger of both is reported)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = 0
        self.hwm_reset = False
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self.base = psutil.Process(self.pid).memory_info().rss
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._max = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.wait(0.005):
            try:
                self._max = max(self._max, proc.memory_info().rss)
            except psutil.Error:
                return

    def growth(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        peak = self._max
        if self.hwm_reset:
            try:
                peak = max(peak, _status_kb(self.pid, "VmHWM"))
            except (OSError, KeyError):
                pass
        return peak - self.base


MiB = 1 << 20
