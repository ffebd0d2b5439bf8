"""Lock-step peer: one shared buffer, REQ/REP, no overlap.

The sender fills the buffer (tensors packed back to back, big ones chunked), sends
the entry list on a REQ socket to each receiver and waits for every reply, which a
receiver sends only after it copied the bucket out; then it fills the buffer again.
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import Any

import msgpack
import numpy as np
import zmq

from .harness import bound_sockets, zmq_ipc

SHM = "/dev/shm"


def plan(sizes: list[int], bucket: int) -> list[list[tuple[int, int, int, int]]]:
    """Buckets of (tensor index, offset in bucket, start in tensor, nbytes); 256-byte aligned."""
    buckets: list[list[tuple[int, int, int, int]]] = [[]]
    pos = 0
    for i, size in enumerate(sizes):
        start = 0
        while True:
            pos = -(-pos // 256) * 256
            if pos >= bucket or (pos and pos + min(size - start, bucket) > bucket):
                buckets.append([])
                pos = 0
            n = min(size - start, bucket - pos)
            buckets[-1].append((i, pos, start, n))
            pos += n
            start += n
            if start >= size:
                break
    return [b for b in buckets if b]


def make_setup(bucket: int) -> Any:
    def setup(workdir: str, receivers: int) -> dict[str, Any]:
        seg = f"wsbench_ls_{os.getpid()}_{secrets.token_hex(3)}"
        path = os.path.join(SHM, seg)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, bucket)
        mm = mmap.mmap(fd, bucket)
        os.close(fd)
        buf = np.frombuffer(mm, dtype=np.uint8)
        buf.fill(0)
        ctx = zmq.Context()
        socks = bound_sockets(ctx, workdir, "ls", receivers, zmq.REQ, {zmq.LINGER: 0, zmq.RCVTIMEO: 120_000})
        with open(os.path.join(workdir, "lockstep.name"), "w") as f:
            f.write(seg)
        return {"ctx": ctx, "socks": socks, "mm": mm, "buf": buf, "path": path}

    return setup


def make_sender(model: Any, bucket: int) -> Any:
    flat = [t.reshape(-1).view(np.uint8) for _, t in model.tensors]
    buckets = plan([f.nbytes for f in flat], bucket)

    def send_version(state: dict[str, Any], version: int) -> None:
        buf = state["buf"]
        for entries in buckets:
            for i, off, start, n in entries:
                buf[off : off + n] = flat[i][start : start + n]
            msg = msgpack.packb([(model.tensors[i][0], off, start, n) for i, off, start, n in entries])
            for s in state["socks"]:
                s.send(msg)
            for s in state["socks"]:
                s.recv()  # lock-step: nothing overlaps the receivers' copy
        for s in state["socks"]:
            s.send(b"END")
        for s in state["socks"]:
            s.recv()

    return send_version


def teardown(state: dict[str, Any]) -> None:
    for s in state["socks"]:
        s.close(0)
    state["ctx"].term()
    del state["buf"]
    state["mm"].close()
    os.unlink(state["path"])


def receive(workdir: str, rank: int, model: dict[str, np.ndarray], options: dict[str, Any],
            versions: int, report: Any, ready: Any) -> None:
    with open(os.path.join(workdir, "lockstep.name")) as f:
        path = os.path.join(SHM, f.read())
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    os.close(fd)
    buf = np.frombuffer(mm, dtype=np.uint8)
    flat = {n: a.reshape(-1).view(np.uint8) for n, a in model.items()}
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 120_000)
    s.connect(zmq_ipc(workdir, f"ls{rank}.sock"))
    ready()
    try:
        for v in range(versions):
            while True:
                frame = s.recv()
                if frame == b"END":
                    s.send(b"ok")
                    break
                for name, off, start, n in msgpack.unpackb(frame):
                    flat[name][start : start + n] = buf[off : off + n]
                s.send(b"ok")
            report(v)
    finally:
        s.close(0)
        ctx.term()
        del buf
        mm.close()
