"""Processes and fakes for the fault, leak and security tests.

- ``SenderProc``: a BucketSender in its own ``subprocess`` (not multiprocessing:
  a multiprocessing child shares the parent's resource tracker, so its shm
  segments would outlive a ``kill -9`` until pytest exits; a real trainer has its
  own tracker, which unlinks them when the trainer dies). Driven by JSON lines.
- ``ReceiverProc``: a ReceiverDaemon in a spawned process, driven over a Pipe.
- ``Collector``: a load_weights that copies, counts what it was handed and can
  be told to sleep per tensor or raise.
- ``FakeSender``: a ROUTER speaking the wire protocol by hand, to send frames a
  real BucketSender never would (bad checksums, mutated messages).

Weights are generated from (seed, version) so every process can rebuild them and
bit-exactness is checked by comparing per-tensor xxh3 digests.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil
import xxhash
import zmq

HERE = Path(__file__).resolve()
SHM_DIR = Path("/dev/shm")
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}

# name, dtype, shape: small tensors first (so a kill early in a version hits a whole
# tensor handed to load_weights), then one tensor bigger than a bucket (chunked).
LAYOUT: list[tuple[str, str, tuple[int, ...]]] = [
    *[(f"layers.{i}.w", ("float32", "float16", "bfloat16", "int32")[i % 4], (32, 24 + i)) for i in range(16)],
    ("embed.big", "float32", (160, 256)),  # 160 KiB: chunked over several 64 KiB buckets
    ("norm.bias", "uint8", (77,)),
]
# a layout receivers with ``expected=LAYOUT`` reject (one shape differs)
BAD_LAYOUT = [(n, d, (s[0] + 1, *s[1:]) if n == "layers.3.w" else s) for n, d, s in LAYOUT]
BUCKET_BYTES = 64 << 10


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_weights(seed: int, version: str, layout: list[tuple[str, str, tuple[int, ...]]] = LAYOUT) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng([seed, zlib.crc32(version.encode())])
    out = []
    for name, dtype, shape in layout:
        dt = _np_dtype(dtype)
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        out.append((name, raw.view(dt).reshape(shape)))
    return out


def digest(array: np.ndarray) -> str:
    return f"{array.dtype.str}{list(array.shape)}:{xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).view(np.uint8))}"


def digests(named: list[tuple[str, np.ndarray]] | dict[str, np.ndarray]) -> dict[str, str]:
    items = named.items() if isinstance(named, dict) else named
    return {name: digest(a) for name, a in items}


def expected_specs(layout: list[tuple[str, str, tuple[int, ...]]] = LAYOUT) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (dtype, shape) for name, dtype, shape in layout}


def shm_segments(pid: int | None = None) -> set[str]:
    prefix = "ws_" if pid is None else f"ws_{pid}_"
    try:
        return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def proc_stats(pid: int) -> dict[str, int]:
    p = psutil.Process(pid)
    return {"fds": p.num_fds(), "threads": p.num_threads(), "rss": p.memory_info().rss}


# --- load_weights --------------------------------------------------------------------


class Collector:
    """A plain load_weights: copies every tensor; can sleep per tensor or raise."""

    def __init__(self) -> None:
        self.state: dict[str, np.ndarray] = {}
        self.handed = 0  # tensors handed to load_weights, ever
        self.sleep = 0.0
        self.fail: tuple[str, int] | None = None  # (exception type name, after N tensors of the next call)
        self.lock = threading.Lock()

    def __call__(self, weights: Any) -> None:
        fail, self.fail = self.fail, None
        for i, (name, tensor) in enumerate(weights):
            if fail is not None and i >= fail[1]:
                raise {"KeyError": KeyError, "ValueError": ValueError, "RuntimeError": RuntimeError}[fail[0]]("x")
            with self.lock:
                self.handed += 1
                self.state[name] = np.array(tensor, copy=True)
            if self.sleep:
                time.sleep(self.sleep)
        if fail is not None:  # asked to fail after more tensors than the version had
            raise {"KeyError": KeyError, "ValueError": ValueError, "RuntimeError": RuntimeError}[fail[0]]("x")

    def digests(self) -> dict[str, str]:
        with self.lock:
            return digests(self.state)


# --- a sender in its own process -------------------------------------------------------


class SenderProc:
    """A BucketSender in a subprocess: ``request`` a command, get its JSON reply. A subclass in
    another worker module runs that module's sender (``SCRIPT``) with its own ``DEFAULTS``."""

    SCRIPT: Path = HERE
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, endpoint: str, **opts: Any) -> None:
        cfg = {"endpoint": endpoint, "opts": {**HB, "bucket_bytes": BUCKET_BYTES, "timeout": 30.0, **self.DEFAULTS, **opts}}
        self.proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), "sender", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            ready = self.reply(60.0)
        except Exception:
            self.kill()
            raise
        if not ready.get("ready"):
            self.kill()
            raise RuntimeError(f"sender process did not start: {ready}")
        self.segments: list[str] = ready["segments"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"sender process {self.pid} gave no reply within {timeout}s") from None
        if line is None:
            raise RuntimeError(f"sender process {self.pid} exited (rc={self.proc.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def request(self, timeout: float = 60.0, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.reply(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except Exception:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request(timeout=20.0, cmd="close")
            except Exception as exc:
                print(f"sender {self.pid} did not close cleanly: {exc!r}", file=sys.stderr)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def _error_fields(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "type": type(exc).__name__,
        "rank": getattr(exc, "rank", None),
        "remote_type": getattr(exc, "remote_type", None),
        "message": str(exc)[:2000],
    }


def serve_sender(
    cfg: dict[str, Any],
    push: Callable[[Any, dict[str, Any], Callable[[dict[str, Any]], None]], dict[str, Any]],
    error: Callable[[Exception], dict[str, Any]],
    level: int = logging.WARNING,
) -> None:
    """A sender subprocess's command loop: one JSON command a line on stdin (wait, push, close),
    one JSON answer a line on stdout. ``push(sender, cmd, say)`` does a push and returns its
    answer; ``error(exc)`` is the answer for a command that raised."""
    from weightstream import BucketSender

    logging.basicConfig(level=level, stream=sys.stderr)
    out = sys.stdout
    sender = BucketSender(cfg["endpoint"], **cfg["opts"])

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"ready": True, "pid": os.getpid(), "segments": [s.name for s in sender._slots]})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "close":
                sender.close()
                say({"ok": True})
                return
            if cmd["cmd"] == "wait":
                ranks = sender.wait_for_receivers(cmd.get("count"), timeout=cmd.get("timeout", 30.0))
                say({"ok": True, "ranks": ranks})
            elif cmd["cmd"] == "push":
                say(push(sender, cmd, say))
            else:
                say({"ok": False, "type": "BadCommand", "message": str(cmd)})
        except Exception as exc:  # reported to the test, which asserts on it
            say(error(exc))
    sender.close()


def _push(sender: Any, cmd: dict[str, Any], say: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    layout = BAD_LAYOUT if cmd.get("layout") == "bad" else LAYOUT
    weights = make_weights(cmd["seed"], cmd["version"], layout)
    report = sender.push(weights, cmd["version"], timeout=cmd.get("timeout", 30.0))
    return {"ok": True, "bytes": report.bytes, "buckets": report.buckets, "ranks": sorted(report.receivers)}


def _sender_main(cfg: dict[str, Any]) -> None:
    serve_sender(cfg, _push, _error_fields)


# --- a receiver in a spawned process --------------------------------------------------------


class ReceiverProc:
    """A ReceiverDaemon with a Collector in a spawned process."""

    _ctx = mp.get_context("spawn")

    def __init__(self, endpoint: str, rank: int, **opts: Any) -> None:
        self.rank = rank
        self._conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_receiver_main, args=(child, endpoint, rank, {**HB, **opts}), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(30.0):
            self.kill()
            raise TimeoutError(f"receiver rank {rank} did not start")
        self._conn.recv()
        self.pid = self.proc.pid

    def request(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"receiver rank {self.rank} gave no reply to {cmd} within {timeout}s")
        return self._conn.recv()  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self.request(cmd="status")

    def wait_connected(self, timeout: float = 15.0) -> bool:
        return wait_until(lambda: self.status()["connected"], timeout, 0.05)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self._conn.close()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.request(timeout=15.0, cmd="stop")
            except Exception:
                pass
            self.proc.join(15)
        self.kill()


def _receiver_main(conn: Any, endpoint: str, rank: int, opts: dict[str, Any]) -> None:
    from weightstream import ReceiverDaemon

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    sleep = opts.pop("sleep", 0.0)
    layout = opts.pop("expected_layout", None)
    collector = Collector()
    collector.sleep = sleep
    daemon = ReceiverDaemon(
        endpoint, collector, rank=rank, expected=expected_specs(LAYOUT) if layout == "base" else None, **opts
    )
    daemon.start()
    conn.send({"started": True})
    while True:
        cmd = conn.recv()
        kind = cmd["cmd"]
        if kind == "status":
            s = daemon.status
            conn.send(
                {
                    "state": s.state,
                    "committed": s.committed_version,
                    "model_intact": s.model_intact,
                    "connected": s.connected,
                    "last_error": s.last_error,
                    "handed": collector.handed,
                    "digests": collector.digests() if cmd.get("digests") else None,
                }
            )
        elif kind == "fail_next":
            collector.fail = (cmd["exc"], cmd.get("after", 0))
            conn.send({"ok": True})
        elif kind == "stop":
            daemon.stop()
            conn.send({"ok": True})
            return


# --- a hand-written sender ---------------------------------------------------------------


class FakeSender:
    """A ROUTER at ``endpoint`` that answers HELLO with WELCOME (real shm slots) and PING with PONG.

    Everything else is up to the test: ``send_msg``/``send_raw`` push frames to a rank,
    ``expect`` waits for a message of a type from the receiver.
    """

    def __init__(self, endpoint: str, *, slots: int = 2, slot_bytes: int = BUCKET_BYTES, session: str = "fake0001") -> None:
        from weightstream.protocol import messages as m
        from weightstream.protocol.transports.shm import TRANSPORT
        from weightstream.security import prepare_ipc_endpoint

        self.m = m
        self.session = session
        self.slots = TRANSPORT.create_slots(slots, slot_bytes, session=session)
        self.welcome = m.Welcome(
            session=session,
            transport="shm",
            bucket_bytes=slot_bytes,
            alignment=m.ALIGNMENT,
            slots=[s.descriptor() for s in self.slots],
            heartbeat_interval=HB["heartbeat_interval"],
            heartbeat_timeout=HB["heartbeat_timeout"],
            pid=os.getpid(),
        )
        prepare_ipc_endpoint(endpoint)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.bind(endpoint)
        self._out: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self.inbox: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self.hellos: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        m = self.m
        while not self._stop:
            while True:
                try:
                    frames = self._out.get_nowait()
                except queue.Empty:
                    break
                if frames is None:
                    return
                try:
                    self._sock.send_multipart(frames)
                except zmq.ZMQError:
                    pass
            if not self._sock.poll(5):
                continue
            ident, *rest = self._sock.recv_multipart()
            try:
                msg = m.decode(rest[0]) if len(rest) == 1 else None
            except Exception:
                msg = None
            if isinstance(msg, m.Hello):
                self.hellos.append(ident)
                self._sock.send_multipart([ident, m.encode(self.welcome)])
            elif isinstance(msg, m.Ping):
                self._sock.send_multipart([ident, m.encode(m.Pong(session=self.session))])
            self.inbox.put((ident, msg))

    def send_raw(self, ident: bytes, *frames: bytes) -> None:
        self._out.put([ident, *frames])

    def send_msg(self, ident: bytes, msg: Any) -> None:
        self.send_raw(ident, self.m.encode(msg))

    def expect(self, types: tuple[type, ...], timeout: float, where: Any = None) -> Any:
        """Next message of one of ``types`` (others are dropped) satisfying ``where``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {[t.TYPE for t in types]} from the receiver within {timeout}s")
            try:
                _, msg = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(msg, types) and (where is None or where(msg)):
                return msg

    def wait_hello(self, timeout: float = 10.0) -> bytes:
        if not wait_until(lambda: bool(self.hellos), timeout):
            raise TimeoutError("no HELLO reached the fake sender")
        return self.hellos[-1]

    def bucket_messages(
        self, version: str, named: list[tuple[str, np.ndarray]], *, slot: int = 0, checksum: bool = False, first: int = 0
    ) -> Any:
        """Write ``named`` (small tensors, the manifest's from index ``first``) into ``slot`` and
        return one BUCKET (seq 0) for them."""
        m = self.m
        view = self.slots[slot].host_view()
        offsets, nbytes, off = [], [], 0
        for _, a in named:
            raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            view[off : off + raw.nbytes] = raw
            offsets.append(off)
            nbytes.append(raw.nbytes)
            off += -(-raw.nbytes // m.ALIGNMENT) * m.ALIGNMENT
        used = offsets[-1] + nbytes[-1]
        return m.Bucket.build(
            version=version,
            seq=0,
            slot=slot,
            first=first,
            offsets=offsets,
            nbytes=nbytes,
            chunks=[0] * len(named),
            checksum=self.slots[slot].digest(used) if checksum else None,
        )

    def begin(self, version: str, named: list[tuple[str, np.ndarray]], buckets: int = 1) -> Any:
        from weightstream.protocol.dtypes import from_numpy

        return self.m.Begin.build(
            version=version,
            names=[n for n, _ in named],
            dtypes=[from_numpy(a.dtype).code for _, a in named],
            shapes=[list(a.shape) for _, a in named],
            total_bytes=sum(a.nbytes for _, a in named),
            buckets=buckets,
        )

    def close(self) -> None:
        self._out.put(None)
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()
        for s in self.slots:
            s.close()


if __name__ == "__main__":
    if sys.argv[1] == "sender":
        _sender_main(json.loads(sys.argv[2]))
