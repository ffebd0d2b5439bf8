"""Raw ZMQ engine: the cross-host yardstick for weightstream's ``tcp`` transport.

The same bytes as bare ZMQ frames over TCP, nothing else: one ROUTER bound by the sender,
one DEALER per rank. Frames are the size weightstream's tcp transport uses
(``FRAME_BYTES``), sent zero-copy (``copy=False``) from a preallocated buffer; each rank
receives them with ``recv_into`` into its own preallocated buffer of one bucket, bucket by
bucket. No header, no metadata, no acks, no copy into a model: what the wire alone costs.
CURVE on both sides when keys are given, as weightstream's tcp transport does it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from weightstream import CurveKeys
from weightstream.protocol.transports.tcp import FRAME_BYTES

HELLO = b"raw-hello"
RCV_TIMEOUT_MS = 60_000  # a rank gives up on a silent sender after this


def identity(rank: int) -> bytes:
    return f"raw-{rank}".encode()


def spans(total: int, bucket: int) -> list[tuple[int, int]]:
    """(offset, bytes) of each bucket of ``total`` bytes."""
    return [(at, min(bucket, total - at)) for at in range(0, total, bucket)]


class RawZmqSender:
    """The sender's ROUTER: bound before the ranks start, told their data path is up by a hello."""

    def __init__(self, curve: CurveKeys | None) -> None:
        self._ctx: Any = zmq.Context()
        sock = self._sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a rank that is gone fails the run instead of dropping bytes
        sock.setsockopt(zmq.SNDHWM, 0)  # zero-copy frames only reference the buffer: queue them all
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._idents: list[bytes] = []

    def wait_hellos(self, ranks: int, timeout: float) -> None:
        idents: set[bytes] = set()
        while len(idents) < ranks:
            if not self._sock.poll(int(timeout * 1000), zmq.POLLIN):
                raise TimeoutError(f"raw zmq: {ranks - len(idents)} of {ranks} ranks did not say hello in {timeout}s")
            frames = self._sock.recv_multipart()
            if len(frames) == 2 and frames[1] == HELLO:
                idents.add(frames[0])
        self._idents = sorted(idents)

    def send(self, buffer: np.ndarray, bucket: int) -> None:
        """Queue every bucket's frames to every rank (zero-copy from ``buffer``); ZMQ's I/O thread
        writes them. ``buffer`` must stay unchanged until every rank said it received them."""
        sock = self._sock
        for start, used in spans(buffer.nbytes, bucket):
            for at in range(start, start + used, FRAME_BYTES):
                data = memoryview(buffer[at : min(at + FRAME_BYTES, start + used)])  # type: ignore[arg-type]
                for ident in self._idents:
                    sock.send_multipart([ident, data], copy=False)

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class RawZmqReceiver:
    """A rank's DEALER, connected and said hello at construction."""

    def __init__(self, address: str, rank: int, server_key: bytes | None) -> None:
        self._ctx: Any = zmq.Context()
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity(rank))
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RCVTIMEO, RCV_TIMEOUT_MS)
        if server_key is not None:
            keys = CurveKeys.generate()
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.connect(address)
        sock.send(HELLO)

    def receive(self, buffer: np.ndarray, total: int, bucket: int) -> int:
        """Every bucket of ``total`` bytes into ``buffer[:bucket]``, frame by frame; the last
        bucket's size (its bytes stay in ``buffer``)."""
        sock, used = self._sock, 0
        for _, used in spans(total, bucket):
            for at in range(0, used, FRAME_BYTES):
                n = min(FRAME_BYTES, used - at)
                got = sock.recv_into(memoryview(buffer[at : at + n]))  # type: ignore[arg-type]
                if got != n or sock.getsockopt(zmq.RCVMORE):
                    raise RuntimeError(f"raw zmq: expected a frame of {n} bytes, got {got}")
        return used

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
