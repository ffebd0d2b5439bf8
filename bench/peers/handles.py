"""Per-tensor-handle peer: one shared-memory segment per tensor, its name sent over ZMQ.

What ``torch.multiprocessing`` tensor sharing and early RL stacks did: the sender
creates a segment per tensor and copies the tensor in, the receiver opens each
segment, copies out and closes it, and after the version the sender unlinks them
all. Segments are plain /dev/shm files (``shm_open`` semantics) named ``wsbench_*`` (not ``ws_``: test leak guards own that prefix).
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import Any

import msgpack
import numpy as np
import zmq

from .harness import pull_socket, push_sockets, zmq_ipc

SHM = "/dev/shm"
END = b"END"


def _map(path: str, size: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, max(size, 1))
        return mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)


def setup(workdir: str, receivers: int) -> dict[str, Any]:
    ctx = zmq.Context()
    socks = push_sockets(ctx, workdir, "h", receivers)
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack.setsockopt(zmq.RCVTIMEO, 120_000)
    ack.bind(zmq_ipc(workdir, "hack.sock"))
    return {"ctx": ctx, "socks": socks, "ack": ack, "segments": [], "prefix": f"wsbench_{os.getpid()}_{secrets.token_hex(3)}_"}


def make_sender(model: Any) -> Any:
    def send_version(state: dict[str, Any], version: int) -> None:
        _unlink(state)
        for i, (name, t) in enumerate(model.tensors):
            seg = f"{state['prefix']}{version}_{i}"
            path = os.path.join(SHM, seg)
            mm = _map(path, t.nbytes, create=True)
            state["segments"].append(path)
            np.frombuffer(mm, dtype=np.uint8, count=t.nbytes)[:] = t.reshape(-1).view(np.uint8)
            mm.close()
            msg = msgpack.packb((name, seg, t.nbytes))
            for s in state["socks"]:
                s.send(msg)
        for s in state["socks"]:
            s.send(END)
        for _ in state["socks"]:
            state["ack"].recv()  # every receiver closed every segment: now they may go

    return send_version


def _unlink(state: dict[str, Any]) -> None:
    for path in state["segments"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    state["segments"].clear()


def teardown(state: dict[str, Any]) -> None:
    _unlink(state)
    for s in [*state["socks"], state["ack"]]:
        s.close(0)
    state["ctx"].term()


def receive(workdir: str, rank: int, model: dict[str, np.ndarray], options: dict[str, Any],
            versions: int, report: Any, ready: Any) -> None:
    ctx = zmq.Context()
    s = pull_socket(ctx, workdir, "h", rank)
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 1000)
    ack.connect(zmq_ipc(workdir, "hack.sock"))
    ready()
    try:
        for v in range(versions):
            while True:
                frame = s.recv()
                if frame == END:
                    break
                name, seg, nbytes = msgpack.unpackb(frame)
                mm = _map(os.path.join(SHM, seg), nbytes, create=False)
                src = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
                model[name].reshape(-1).view(np.uint8)[:] = src
                del src
                mm.close()
            ack.send(b"ok")  # before report(): the sender waits for this while we would block on the pipe
            report(v)
    finally:
        s.close(0)
        ack.close()
        ctx.term()
