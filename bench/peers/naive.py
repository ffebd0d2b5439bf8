"""Naive peer: every tensor pickled and sent as its own ZMQ message over ipc.

The way many RL stacks started (``socket.send_pyobj(tensor)``). A baseline only:
weightstream never pickles (pickle off a socket is remote code execution).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import zmq

from .harness import pull_socket, push_sockets

END = b"END"


def setup(workdir: str, receivers: int) -> dict[str, Any]:
    ctx = zmq.Context()
    socks = push_sockets(ctx, workdir, "naive", receivers)
    return {"ctx": ctx, "socks": socks}


def make_sender(model: Any) -> Any:
    def send_version(state: dict[str, Any], version: int) -> None:
        for name, t in model.tensors:
            payload = pickle.dumps((name, t), protocol=pickle.HIGHEST_PROTOCOL)
            for s in state["socks"]:
                s.send(payload, copy=False)
        for s in state["socks"]:
            s.send(END)

    return send_version


def teardown(state: dict[str, Any]) -> None:
    for s in state["socks"]:
        s.close(0)
    state["ctx"].term()


def receive(workdir: str, rank: int, model: dict[str, np.ndarray], options: dict[str, Any],
            versions: int, report: Any, ready: Any) -> None:
    ctx = zmq.Context()
    s = pull_socket(ctx, workdir, "naive", rank)
    ready()
    try:
        for v in range(versions):
            while True:
                frame = s.recv(copy=False)
                if len(frame) == 3 and frame.bytes == END:
                    break
                name, t = pickle.loads(frame.buffer)  # the unsafe part this baseline stands for
                np.copyto(model[name], t, casting="no")
            report(v)
    finally:
        s.close(0)
        ctx.term()
