"""A ROUTER socket that plays the sender's side of the conversation by hand, for the tests'
hand-played senders (hostile_workers.FakeRouter, same_host_workers.HandSender). Single-threaded:
the test calls ``recv``/``poll_for``, which answer PING with PONG on the way."""

from __future__ import annotations

import time
from typing import Any

import zmq


class HandRouter:
    """``pong_session``: the session a PONG names (None: the PING's own)."""

    def __init__(self, endpoint: str, *, pong_session: str | None = None, unbounded_send: bool = False) -> None:
        self.pong_session = pong_session
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if unbounded_send:  # a flood test must not lose frames to the high-water mark
            self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.bind(endpoint)
        self.ident = b""
        self.pings = 0

    def recv(self, timeout: float) -> Any:
        """The next message (decoded; None for a frame that does not decode, or for several
        frames), or None on timeout."""
        from weightstream.protocol import messages as m

        if not self.sock.poll(max(0, int(timeout * 1000))):
            return None
        ident, *rest = self.sock.recv_multipart()
        self.ident = ident
        try:
            msg = m.decode(rest[0]) if len(rest) == 1 else None
        except Exception:
            return None
        if isinstance(msg, m.Ping):
            self.pings += 1
            self.send(m.Pong(session=self.pong_session if self.pong_session is not None else msg.session))
        return msg

    def poll_for(self, kinds: type | tuple[type, ...], timeout: float = 10.0) -> Any:
        """The next message of one of ``kinds``, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if isinstance(msg, kinds):
                return msg
        return None

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.ident, *frames])

    def send(self, msg: Any) -> None:
        from weightstream.protocol import messages as m

        self.send_raw(m.encode(msg))

    def close_socket(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
