"""Processes for the two-phase commit tests (protocol v6): ranks and a killable sender.

- ``RankProc``: a ReceiverDaemon in a spawned process (multiprocessing "spawn"), driven
  over a Pipe. Its ``load_weights`` is a ``Loader``: it copies every tensor into the rank's
  served model (a dict of NumPy arrays, updated in place), records per call which
  version it was handed (from the "head" tensor), an xxh3 digest of every tensor, and
  whether it consumed the iterator to the end; it can sleep per tensor (a slow rank)
  and refuses a version whose "tail" tensor asks it to (like a real loader rejecting a
  weight). The test asks it for its status, its model's digests and those records.
- ``SenderProc``: a BucketSender in its own ``subprocess`` (not multiprocessing: a
  multiprocessing child shares the parent's resource tracker, so its shm segments would
  outlive a ``kill -9`` until pytest exits; a real trainer has its own tracker, which
  unlinks them when the trainer dies). Driven by JSON lines on stdin/stdout.

Every version "v<N>" has weights derived from N alone, so every process can rebuild them
and bit-exactness is checked by comparing per-tensor xxh3 digests. Its first tensor,
"head", and its last, "tail", are int64 [N, refuse_mask]: a rank r refuses the version
(ValueError from load_weights, at the very last tensor) when bit r of refuse_mask is set.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import fault_workers
import numpy as np
import xxhash

HERE = Path(__file__).resolve()
SHM_DIR = Path("/dev/shm")
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
BUCKET_BYTES = 64 << 10
NUM_BUFFERS = 8  # the whole version fits the slots: a sender never waits for a slow rank's ACKs

# name, dtype, shape. ~250 KiB in ~5 buckets of 64 KiB, one tensor chunked over 3 buckets.
LAYOUT: list[tuple[str, str, tuple[int, ...]]] = [
    ("head", "int64", (2,)),
    *[(f"layers.{i}.w", ("float32", "float16", "int32", "uint8")[i % 4], (24, 32 + i)) for i in range(12)],
    ("embed.big", "float32", (160, 256)),  # 160 KiB > a bucket: travels in chunks
    *[(f"layers.{i}.w", ("float32", "float16", "int32", "uint8")[i % 4], (24, 32 + i)) for i in range(12, 24)],
    ("norm.bias", "uint8", (77,)),
    ("tail", "int64", (2,)),
]
EXTRA = ("extra.w", "float32", (3, 5))  # a tensor a strict rank (expected=LAYOUT) does not know


def version_name(step: int) -> str:
    return f"v{step}"


def step_of(version: str) -> int:
    return int(version.lstrip("v"))


def make_weights(step: int, refuse: int = 0, extra: bool = False) -> list[tuple[str, np.ndarray]]:
    """The weights of version ``v<step>``; ``refuse``: bit r set makes rank r refuse it."""
    layout = [*LAYOUT[:-1], EXTRA, LAYOUT[-1]] if extra else LAYOUT
    out = []
    for i, (name, dtype, shape) in enumerate(layout):
        if name in ("head", "tail"):
            out.append((name, np.array([step, refuse], dtype=np.int64)))
            continue
        rng = np.random.default_rng([step, i])
        dt = np.dtype(dtype)
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        out.append((name, raw.view(dt).reshape(shape)))
    return out


def expected_specs() -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (dtype, shape) for name, dtype, shape in LAYOUT}


def digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return f"{a.dtype.str}{list(a.shape)}:{xxhash.xxh3_64_hexdigest(a.view(np.uint8).tobytes())}"


def digests(named: Any) -> dict[str, str]:
    items = named.items() if isinstance(named, dict) else named
    return {name: digest(a) for name, a in items}


def version_digests(version: str | None) -> dict[str, str]:
    """What a rank's model holds when ``version`` is its committed one (None: the initial v0)."""
    return digests(make_weights(0 if version is None else step_of(version)))


def shm_segments(pid: int | None = None) -> set[str]:
    prefix = "ws_" if pid is None else f"ws_{pid}_"
    try:
        return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


wait_until = fault_workers.wait_until


# --- the rank's load_weights ---------------------------------------------------------------


class Loader:
    """A plain load_weights over a served model (dict of NumPy arrays, written in place).

    Per call it records: the step of the version (its "head"), how many tensors it took,
    their digests, whether it consumed the iterator to the end ("complete"), its error,
    and CLOCK_MONOTONIC (system-wide on Linux) at entry and exit.
    """

    def __init__(self, model: dict[str, np.ndarray], rank: int, delay: float = 0.0) -> None:
        self.model = model
        self.rank = rank
        self.delay = delay
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, weights: Any) -> None:
        call: dict[str, Any] = {
            "step": None, "count": 0, "complete": False, "error": None,
            "t0": time.monotonic(), "t1": None, "digests": {},
        }
        with self.lock:
            self.calls.append(call)
        try:
            for name, tensor in weights:
                if self.delay:
                    time.sleep(self.delay)
                arr = np.asarray(tensor)
                if name == "head":
                    call["step"] = int(arr[0])
                if name == "tail" and (int(arr[1]) >> self.rank) & 1:
                    raise ValueError(f"rank {self.rank} refuses tensor 'tail' of step {int(arr[0])}")
                with self.lock:
                    dst = self.model.get(name)
                    if dst is not None and dst.dtype == arr.dtype and dst.shape == arr.shape:
                        np.copyto(dst, arr)
                    else:
                        self.model[name] = np.array(arr, copy=True)
                    call["digests"][name] = digest(self.model[name])
                    call["count"] += 1
            call["complete"] = True
        except BaseException as exc:
            call["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            call["t1"] = time.monotonic()

    def snapshot(self, last: int = 4) -> dict[str, Any]:
        with self.lock:
            model = digests(self.model)
            calls = [dict(c, digests=dict(c["digests"])) for c in self.calls[-last:]]
            full = [c for c in self.calls if c["complete"]]
            last_full = dict(full[-1], digests=dict(full[-1]["digests"])) if full else None
            ncalls = len(self.calls)
            handed = sum(c["count"] for c in self.calls)
        return {
            "model": model,
            "calls": calls,
            "ncalls": ncalls,
            "handed": handed,  # tensors handed to load_weights, ever
            "last_full": None if last_full is None or last_full["step"] is None else version_name(last_full["step"]),
            "last_full_call": last_full,
        }


# --- a rank in a spawned process ------------------------------------------------------------


class RankProc:
    """A ReceiverDaemon over a ``Loader`` in a spawned process."""

    _ctx = mp.get_context("spawn")

    def __init__(self, endpoint: str, rank: int, *, staged: bool = False, delay: float = 0.0, strict: bool = False) -> None:
        self.rank = rank
        self._conn, child = self._ctx.Pipe()
        opts = {"staged": staged, "delay": delay, "strict": strict}
        self.proc = self._ctx.Process(target=rank_main, args=(child, endpoint, rank, opts), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(60.0):
            self.kill()
            raise TimeoutError(f"rank {rank} did not start")
        self.started = self._conn.recv()
        if "error" in self.started:
            self.kill()
            raise RuntimeError(f"rank {rank} failed to start: {self.started}")
        self.pid = self.proc.pid

    def request(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"rank {self.rank} gave no reply to {cmd} within {timeout}s")
        reply = self._conn.recv()
        if "crashed" in reply:
            raise RuntimeError(f"rank {self.rank} crashed: {reply}")
        return reply  # type: ignore[no-any-return]

    def query(self) -> dict[str, Any]:
        """{"status": asdict(daemon.status), "model": digests, "calls", "ncalls", "last_full", ...}."""
        return self.request(cmd="query")

    def settled(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the rank holds no version in flight (state idle or aborted); return its query."""
        box: dict[str, Any] = {}

        def done() -> bool:
            box["q"] = self.query()
            return box["q"]["status"]["state"] in ("idle", "aborted")

        assert wait_until(done, timeout, 0.05), f"rank {self.rank} still has a version in flight after {timeout}s: {box['q']['status']}"
        return box["q"]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self._conn.close()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.request(timeout=20.0, cmd="stop")
            except Exception as exc:
                print(f"rank {self.rank} did not stop cleanly: {exc!r}", file=sys.stderr)
            self.proc.join(15)
        self.kill()


def rank_main(conn: Any, endpoint: str, rank: int, opts: dict[str, Any]) -> None:
    try:
        import weightstream
        from weightstream import ReceiverDaemon

        logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
        model = {name: a.copy() for name, a in make_weights(0)}
        loader = Loader(model, rank, opts.get("delay", 0.0))
        daemon = ReceiverDaemon(
            endpoint, loader, rank=rank, framework="numpy", prefetch=2, staged=opts.get("staged", False),
            expected=expected_specs() if opts.get("strict") else None, **HB,
        )
        daemon.start()
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"started": True, "pid": os.getpid(), "weightstream": weightstream.__file__})
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            daemon.stop()
            return
        try:
            if cmd["cmd"] == "query":
                conn.send({"status": asdict(daemon.status), **loader.snapshot()})
            elif cmd["cmd"] == "stop":
                daemon.stop()
                conn.send({"ok": True})
                return
            else:
                conn.send({"crashed": f"unknown command {cmd}"})
        except Exception as exc:  # report, never hang the test
            import traceback

            conn.send({"crashed": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


# --- a sender in its own process --------------------------------------------------------------


def report_dict(report: Any) -> dict[str, Any] | None:
    """A PushReport as plain data (fields the v5 report lacks come back as "<missing>")."""
    if report is None:
        return None
    miss = "<missing>"
    return {
        "version": getattr(report, "version", miss),
        "committed": getattr(report, "committed", miss),
        "seconds": getattr(report, "seconds", miss),
        "tensors": getattr(report, "tensors", miss),
        "bytes": getattr(report, "bytes", miss),
        "type": type(report).__name__,
        "receivers": {
            str(rank): {
                "outcome": getattr(res, "outcome", miss),
                "error": getattr(res, "error", miss),
                "model_intact": getattr(res, "model_intact", miss),
                "tensors": getattr(res, "tensors", miss),
                "bytes": getattr(res, "bytes", miss),
            }
            for rank, res in dict(getattr(report, "receivers", {}) or {}).items()
        },
    }


class SenderProc(fault_workers.SenderProc):
    """A BucketSender in a subprocess running this module's sender; ``request`` a command."""

    SCRIPT = HERE
    DEFAULTS: ClassVar[dict[str, Any]] = {"num_buffers": NUM_BUFFERS}


def _push(sender: Any, cmd: dict[str, Any], say: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    version = version_name(cmd["step"])
    weights = make_weights(cmd["step"], cmd.get("refuse", 0))
    if cmd.get("announce"):
        say({"pushing": version, "t": time.monotonic()})
    report = sender.push(weights, version, timeout=cmd.get("timeout", 30.0))
    return {"ok": True, "report": report_dict(report), "seconds": report.seconds}


def _error(exc: Exception) -> dict[str, Any]:
    return {
        "ok": False, "type": type(exc).__name__, "rank": getattr(exc, "rank", None),
        "message": str(exc)[:2000], "report": report_dict(getattr(exc, "report", None)),
    }


def _sender_main(cfg: dict[str, Any]) -> None:
    fault_workers.serve_sender(cfg, _push, _error, logging.ERROR)


if __name__ == "__main__":
    if sys.argv[1] == "sender":
        _sender_main(json.loads(sys.argv[2]))
