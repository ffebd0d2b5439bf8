"""Shared harness: spawn receiver processes, time versions, verify digests.

A run is: spawn ``receivers`` processes holding preallocated NumPy copies of the
model; for each version the sender moves the bytes with its peer's method, every
receiver reports "done" (that ends the clock) and then xxh3 digests of its copy,
which must equal the sender's. Control messages are msgpack over a multiprocessing
pipe (the bench's own channel; none of this is a product wire).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from weightstream import WeightstreamError, synthetic

TIMEOUT = 600.0


@dataclass
class RunResult:
    seconds: list[float] = field(default_factory=list)  # timed versions only
    paired: list[float] = field(default_factory=list)  # the ``paired`` baseline, timed just before each
    verified: bool = True
    mismatches: int = 0
    error: str | None = None


def alloc_state(specs: dict[str, Any]) -> dict[str, np.ndarray]:
    from weightstream.protocol.dtypes import by_name

    state = {n: np.empty(tuple(s), dtype=by_name(dt).numpy) for n, (dt, s) in specs.items()}
    for a in state.values():  # resident, like a live model's params
        a.view(np.uint8).fill(0)
    return state


def send(conn: Any, **msg: Any) -> None:
    conn.send_bytes(msgpack.packb(msg))


def recv(conn: Any, what: str) -> dict[str, Any]:
    if not conn.poll(TIMEOUT):
        raise TimeoutError(f"no {what} within {TIMEOUT}s")
    msg = msgpack.unpackb(conn.recv_bytes(), strict_map_key=False)
    if "error" in msg:
        raise RuntimeError(msg["error"])
    return msg


def receiver_entry(module: str, endpoint: str, rank: int, specs: dict[str, Any], versions: int,
                   options: dict[str, Any], conn: Any) -> None:
    """Process entry: ``module.receive(endpoint, rank, state, options, versions, report)``."""
    import importlib

    try:
        state = alloc_state(specs)

        def report(version: int) -> None:
            send(conn, done=version)
            send(conn, digests=synthetic.digests(state))

        importlib.import_module(module).receive(endpoint, rank, state, options, versions, report, lambda: send(conn, ready=True))
    except BaseException as exc:
        try:
            send(conn, error=f"rank {rank}: {type(exc).__name__}: {exc}")
        except (OSError, ValueError):  # the parent is gone too; the exception below says why
            pass
        raise
    finally:
        conn.close()


def new_endpoint_dir() -> str:
    return tempfile.mkdtemp(prefix="ws-bench-", dir="/tmp")


def run(
    module: str,
    model: synthetic.Model,
    send_version: Callable[[Any, int], None],
    *,
    setup: Callable[[str, int], Any] | None = None,
    teardown: Callable[[Any], None] | None = None,
    receivers: int = 1,
    versions: int = 3,
    warmup: int = 1,
    options: dict[str, Any] | None = None,
    paired: Callable[[], float] | None = None,
) -> RunResult:
    """Time ``versions`` pushes (after ``warmup``) of ``model`` to ``receivers`` processes.

    ``setup(endpoint_dir, receivers)`` builds the sender state before receivers start;
    ``send_version(state, v)`` moves one version; the clock stops when every receiver said done.
    ``paired()``, if given, runs just before each timed version and returns its own seconds: a
    baseline taken at the same moment, so that a ratio to it holds while the host's memory
    bandwidth drifts (on a shared VM it moved by a third within minutes).
    """
    options = options or {}
    total = warmup + versions
    specs = {k: [dt, list(s)] for k, (dt, s) in model.specs().items()}
    workdir = new_endpoint_dir()
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    result = RunResult()
    state = None
    try:
        state = setup(workdir, receivers) if setup else workdir
        for rank in range(receivers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=receiver_entry, args=(module, workdir, rank, specs, total, options, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        for c in conns:
            recv(c, "ready")
        for v in range(total):
            if v:
                model.bump()
            expected = synthetic.digests(model)
            if paired is not None and v >= warmup:
                result.paired.append(paired())
            t0 = time.perf_counter()
            send_version(state, v)
            for c in conns:
                recv(c, f"done {v}")
            dt = time.perf_counter() - t0
            for c in conns:
                got = recv(c, f"digests {v}")["digests"]
                bad = sum(1 for n, d in expected.items() if got.get(n) != d)
                result.mismatches += bad
            if v >= warmup:
                result.seconds.append(dt)
        for p in procs:
            p.join(60)
    except (OSError, RuntimeError, TimeoutError, ValueError, WeightstreamError, zmq.ZMQError) as exc:  # recorded as a failed row
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if teardown and state is not None:
            teardown(state)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in conns:
            c.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result.verified = result.error is None and result.mismatches == 0
    return result


def zmq_ipc(workdir: str, name: str) -> str:
    return f"ipc://{os.path.join(workdir, name)}"


def bound_sockets(
    ctx: zmq.Context[Any], workdir: str, prefix: str, receivers: int, kind: int, options: dict[int, int]
) -> list[zmq.Socket[Any]]:
    """The sender's side of a peer: one socket of ``kind`` per rank, bound at ``{prefix}{rank}.sock``."""
    socks = []
    for rank in range(receivers):
        s = ctx.socket(kind)
        for option, value in options.items():
            s.setsockopt(option, value)
        s.bind(zmq_ipc(workdir, f"{prefix}{rank}.sock"))
        socks.append(s)
    return socks


def push_sockets(ctx: zmq.Context[Any], workdir: str, prefix: str, receivers: int) -> list[zmq.Socket[Any]]:
    """One bound PUSH socket per rank, unbounded queue."""
    return bound_sockets(ctx, workdir, prefix, receivers, zmq.PUSH, {zmq.SNDHWM: 0, zmq.LINGER: 0})


def pull_socket(ctx: zmq.Context[Any], workdir: str, prefix: str, rank: int) -> zmq.Socket[Any]:
    """A rank's side: its PULL socket, with a receive timeout so a lost sender fails the run."""
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 120_000)
    s.connect(zmq_ipc(workdir, f"{prefix}{rank}.sock"))
    return s
