"""``tcp``: bucket bytes as ZeroMQ frames on a data socket beside the control socket, for ranks
on other hosts. Needs NumPy and pyzmq only (no torch), so Paddle-only and NumPy-only ranks use it.

::

    sender                                         rank (each)
    ROUTER bound at data_address                   DEALER, routing id "wsd-" + its HELLO token
      <- [hello]                                     connects at WELCOME and says hello
    BEGIN transport={"push": P} on control ->        join: remembers P
    per bucket, per rank, per frame:
      [header(P, seq, at, n), slot[at:at+n]] ->      receive thread: recv_into(header), then
      (zero-copy from the sender's slot)             recv_into(its own slot[at:at+n])
    BUCKET on control ->                             (the bucket's bytes are in its slot: apply, ACK)

A bucket travels in frames of at most ``frame`` bytes (announced in WELCOME, under the ranks'
frame limit). A rank takes a bucket's frames in order and only for the push it joined: frames
left over from an aborted push are skipped by their push number. The data socket is CURVE
encrypted and authenticated with the control socket's keys unless ``insecure=True``.

Memory: the sender's frames reference its slot (no copy); a slot is written again only after
every rank acked the bucket in it, which a rank does only once it received every frame. A rank
receives into its preallocated slots: no Python allocation per bucket.
"""

from __future__ import annotations

import logging
import secrets
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from ...deadline import Deadline
from ...security import apply_client_curve, apply_server_curve, start_authenticator
from .. import messages as m
from ..errors import ConfigError, PeerTimeout, ProtocolError, TransportError
from .base import Capabilities, ExportContext, ImportContext, Landing, address_toward, create_all, transfer_spans
from .host import DirectPieces, ReceivingSlot, private_buffer
from .shm.streaming import slot_streams

log = logging.getLogger("weightstream.transport.tcp")

NAME = "tcp"
# Per data frame; a bucket of more travels in several. Below glibc's largest mmap threshold
# (32 MiB): libzmq allocates each received message whole, and a 32 MiB one would get fresh
# mmap'd pages (a page fault per 4 KiB) every time, halving throughput (bench/zmq_frame_cliff.py).
FRAME_BYTES = 16 << 20
# what a message may exceed its frame by on the wire: CURVE adds 33 bytes per message, and the
# handshake's commands must fit too
FRAME_SLACK = 4096
# a piece of at least this many bytes is sent from the tensor's own memory, not packed first
# (fewer memcpys; below it, a message per piece would cost more than the copy saves)
DIRECT_MIN = 1 << 20
HEADER = struct.Struct("<QQQQ")  # push, seq, offset in the slot, bytes
HELLO = b"weightstream-data-hello"
POLL_S = 0.1  # how often a waiting receive looks at whether its version failed
IDENT_PREFIX = b"wsd-"


def data_identity(token: str) -> bytes:
    """A rank's routing id on the data socket: from its HELLO token, so the sender knows it and a
    reconnect of the same daemon keeps it."""
    return IDENT_PREFIX + token.encode("ascii", "replace")[:64]


def announced_host(bind_host: str) -> str:
    """What ranks connect to when the sender binds ``bind_host``: a wildcard bind is announced as
    this host's address on its default route (set ``data_address`` to a routable name if that is
    not it)."""
    return address_toward(None) if bind_host in ("*", "0.0.0.0", "") else bind_host


def check_security(context: ExportContext | ImportContext, side: str) -> None:
    has_curve = (context.curve_keys if isinstance(context, ExportContext) else context.curve) is not None
    if not has_curve and not context.insecure:
        fix = (
            "pass curve_keys=CurveKeys.generate() to the BucketSender (and its public key as server_key= with "
            "curve_keys= to each ReceiverDaemon)" if side == "sender" else
            "pass curve_keys= and server_key= to the ReceiverDaemon (the sender's public key)"
        )
        raise ConfigError(
            f"transport 'tcp' sends bucket bytes over the network; expected CURVE keys on the {side} or insecure=True, "
            f"got neither; fix: {fix}, or insecure=True on a trusted network"
        )


# --- sender ----------------------------------------------------------------------------------


class TcpExportedSlot(DirectPieces):
    def __init__(self, size: int, exported: TcpExported) -> None:
        self.size = size
        self.streams = slot_streams(size)
        self._view = private_buffer(size)
        self._mv = memoryview(self._view)  # type: ignore[arg-type]  # NumPy types __buffer__ on 3.12+ only
        self._exported = exported
        self.direct_min = exported.direct_min

    def host_view(self) -> np.ndarray:
        return self._view

    def descriptor(self) -> dict[str, Any]:
        exported = self._exported
        return {"size": self.size, "address": exported.address, "frame": exported.frame_bytes, "direct": self.direct_min}

    def finish(self, used: int) -> list[Any]:
        self._exported.send(self.transfers(used), self._bucket.seq)
        return []

    def close(self) -> None:
        pass


class TcpExported:
    def __init__(self, count: int, size: int, context: ExportContext) -> None:
        check_security(context, "sender")
        self.frame_bytes = min(FRAME_BYTES, m.MAX_MESSAGE_BYTES)
        self.direct_min = 0 if context.checksum else DIRECT_MIN
        self._ctx: Any = zmq.Context()
        self._auth: Any = None
        self._sock: Any = None
        try:
            if context.curve_keys is not None:
                self._auth = start_authenticator(self._ctx, context.allowed_clients)
            sock = self._sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a rank that is gone raises, never drops
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a rank's reconnect (same routing id) takes its place
            sock.setsockopt(zmq.SNDHWM, 0)  # at most num_buffers buckets are in flight: the ring bounds it
            sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # ranks only say hello here
            if context.curve_keys is not None:
                apply_server_curve(sock, context.curve_keys)
            bind_host = context.data_host
            where = f"tcp://{'*' if bind_host in ('', '0.0.0.0') else bind_host}"
            try:
                port = sock.bind_to_random_port(where) if not context.data_port else context.data_port
                if context.data_port:
                    sock.bind(f"{where}:{port}")
            except zmq.ZMQError as exc:
                raise TransportError(
                    f"transport 'tcp': could not bind its data socket at {where}:{context.data_port or '<any port>'} "
                    f"({exc}); fix: data_address= an address of this host (host or host:port) that is free"
                ) from exc
            self.address = f"tcp://{announced_host(bind_host)}:{port}"
            self.slots = create_all(lambda n: TcpExportedSlot(n, self), count, size)
        except BaseException:
            self.close()
            raise
        self._connected: set[bytes] = set()
        self._idents: dict[int, bytes] = {}  # this push's ranks
        self._push = 0

    def descriptors(self) -> list[dict[str, Any]]:
        return [slot.descriptor() for slot in self.slots]

    def _drain(self, wait_ms: int) -> None:
        """Read the ranks' hellos: each names a data connection that is up."""
        sock = self._sock
        while sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            frames = sock.recv_multipart()
            if len(frames) == 2 and frames[1] == HELLO:
                self._connected.add(frames[0])

    def begin_push(self, ranks: dict[int, str], check: Callable[[], None], timeout: float) -> dict[str, Any] | None:
        self._idents = {rank: data_identity(token) for rank, token in ranks.items()}
        deadline = Deadline(timeout)
        self._drain(0)
        while True:
            missing = sorted(rank for rank, ident in self._idents.items() if ident not in self._connected)
            if not missing:
                break
            check()
            if deadline.expired():
                raise PeerTimeout(
                    f"transport 'tcp': ranks {missing} did not connect to the data socket {self.address} within "
                    f"{timeout:.1f}s; fix: make {self.address} reachable from those ranks (firewall, or data_address= "
                    "an address they can reach), and check their logs for a CURVE refusal"
                )
            self._drain(50)
        self._push = secrets.randbits(63)
        return {"push": self._push}

    def send(self, transfers: list[tuple[int, np.ndarray]], seq: int) -> None:
        """One bucket's ranges to every rank of the push, as frames of the slot or of the tensors
        themselves (zero-copy either way)."""
        sock, frame = self._sock, self.frame_bytes
        for start, data, at, n in _frames(transfers, frame):
            header = HEADER.pack(self._push, seq, at, n)
            part = memoryview(data[at - start : at - start + n])
            for rank, ident in self._idents.items():
                try:
                    sock.send_multipart([ident, header, part], copy=False)
                except zmq.ZMQError as exc:
                    self._connected.discard(ident)
                    raise TransportError(
                        f"transport 'tcp': could not send bucket {seq} to rank {rank} ({exc}); its data connection "
                        "is gone (the rank died or was cut off)"
                    ) from exc

    def end_push(self, ok: bool) -> None:
        self._idents = {}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def _frames(transfers: list[tuple[int, Any]], frame: int) -> Any:
    """(range start, its bytes, frame offset, frame size) of every frame of a bucket's ranges."""
    for start, data in transfers:
        for k in range(0, data.nbytes, frame):
            yield start, data, start + k, min(frame, data.nbytes - k)


# --- rank ------------------------------------------------------------------------------------


def _descriptor_fields(descriptors: list[dict[str, Any]]) -> tuple[str, int, int, list[int]]:
    sizes, addresses, frames, directs = [], set(), set(), set()
    for i, desc in enumerate(descriptors):
        size, address, frame, direct = desc.get("size"), desc.get("address"), desc.get("frame"), desc.get("direct", 0)
        if type(size) is not int or not 0 < size <= 1 << 40:
            raise TransportError(f"tcp slot {i} descriptor: field 'size': expected a positive int, got {size!r}")
        if not isinstance(address, str) or not address.startswith("tcp://") or len(address) > 300:
            raise TransportError(f"tcp slot {i} descriptor: field 'address': expected 'tcp://host:port', got {address!r}")
        if type(frame) is not int or not 0 < frame <= m.MAX_MESSAGE_BYTES:
            raise TransportError(
                f"tcp slot {i} descriptor: field 'frame': expected 1..{m.MAX_MESSAGE_BYTES} (this rank's frame limit), "
                f"got {frame!r}"
            )
        if type(direct) is not int or not 0 <= direct <= 1 << 40:
            raise TransportError(f"tcp slot {i} descriptor: field 'direct': expected an int >= 0, got {direct!r}")
        sizes.append(size)
        addresses.add(address)
        frames.add(frame)
        directs.add(direct)
    if len(addresses) != 1 or len(frames) != 1 or len(directs) != 1:
        raise TransportError(
            f"tcp slot descriptors: expected one data address, frame size and direct size for every slot, got "
            f"{sorted(addresses)}, {sorted(frames)} and {sorted(directs)}"
        )
    return addresses.pop(), frames.pop(), directs.pop(), sizes


class TcpImported:
    def __init__(self, descriptors: list[dict[str, Any]], context: ImportContext) -> None:
        try:
            check_security(context, "rank")
        except ConfigError as exc:
            raise TransportError(str(exc)) from None
        self.address, self.frame_bytes, self.direct_min, sizes = _descriptor_fields(descriptors)
        self._lock = threading.Lock()  # the receive thread uses the socket; close waits for it
        self._ctx: Any = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        self._sock: Any = sock
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, data_identity(context.token))
        sock.setsockopt(zmq.RCVHWM, 0)  # the sender sends at most num_buffers buckets ahead
        sock.setsockopt(zmq.MAXMSGSIZE, self.frame_bytes + FRAME_SLACK)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if context.curve is not None:
            apply_client_curve(sock, *context.curve)
        sock.connect(self.address)
        sock.send(HELLO)  # queued until connected; tells the sender this rank's data path is up
        self._header = bytearray(HEADER.size)
        self._push: int | None = None
        self.slots = [ReceivingSlot(size, self, slot_streams(size)) for size in sizes]

    def join(self, fields: dict[str, Any] | None, timeout: float) -> None:
        push = fields.get("push") if fields is not None else None
        if type(push) is not int or push < 0 or len(fields or {}) != 1:
            raise ProtocolError(f"BEGIN: field 'transport': expected {{'push': <int>}} for transport 'tcp', got {fields!r}")
        self._push = push

    def leave(self, ok: bool) -> None:
        self._push = None

    def receive(
        self, slot: ReceivingSlot, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None],
        timeout: float, into: Landing | None = None,
    ) -> None:
        """Bucket ``seq``'s ranges (as the sender derives them from the same pieces) into ``slot``,
        frame by frame, in order; a direct range straight into ``into``'s memory when it gives one."""
        view = slot.host_view()
        with self._lock:
            for start, stop, direct in transfer_spans(pieces, used, self.direct_min):
                land = into(start, stop - start) if direct and into is not None else None
                if land is None:
                    self._receive_range(view, 0, seq, start, stop, check, timeout)
                else:  # the range is one whole tensor: its bytes go straight to the model
                    self._receive_range(land, start, seq, start, stop, check, timeout)

    def _receive_range(
        self, view: np.ndarray, shift: int, seq: int, at: int, used: int, check: Callable[[], None], timeout: float
    ) -> None:
        """Bytes [at, used) of bucket ``seq`` into ``view``, whose byte 0 is the bucket's byte
        ``shift``; the caller holds the lock."""
        sock = self._sock
        if sock is None:
            raise TransportError("tcp: the data connection is closed")
        header = self._header
        deadline = Deadline(timeout)
        while at < used:
            while not sock.poll(int(POLL_S * 1000), zmq.POLLIN):
                check()
                if deadline.expired():
                    raise PeerTimeout(
                        f"tcp: bucket {seq}: no data frame arrived for {timeout:.1f}s ({at} of {used} bytes in); "
                        f"is the sender's data socket {self.address} reachable?"
                    )
            deadline = Deadline(timeout)  # bytes are moving: the limit is on silence
            got = sock.recv_into(header, flags=zmq.NOBLOCK)
            if got != HEADER.size or not sock.getsockopt(zmq.RCVMORE):
                self._skip(sock)
                raise ProtocolError(f"tcp: bucket {seq}: expected a {HEADER.size}-byte frame header, got {got} bytes")
            push, fseq, fat, n = HEADER.unpack(header)
            if push != self._push:  # left over from an aborted push
                self._skip(sock)
                continue
            if fseq != seq or fat != at or not 0 < n <= self.frame_bytes or at + n > used:
                self._skip(sock)
                raise ProtocolError(
                    f"tcp: bucket {seq}: expected a frame of bucket {seq} at offset {at} of at most "
                    f"{min(self.frame_bytes, used - at)} bytes, got bucket {fseq} at {fat} of {n} bytes"
                )
            got = sock.recv_into(memoryview(view[at - shift : at - shift + n]), flags=zmq.NOBLOCK)  # type: ignore[arg-type]
            if got != n or sock.getsockopt(zmq.RCVMORE):
                self._skip(sock)
                raise ProtocolError(f"tcp: bucket {seq}: frame at {at}: expected {n} bytes, got {got}")
            at += n

    @staticmethod
    def _skip(sock: Any) -> None:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(copy=False)

    def close(self) -> None:
        # the receive thread polls in POLL_S steps and stops once its version ended: wait that long
        if not self._lock.acquire(timeout=10 * POLL_S + 1.0):
            log.warning("tcp: the receive thread still holds the data socket; leaving it open")
            return
        try:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
        finally:
            self._lock.release()


class TcpTransport:
    name = NAME
    capabilities = Capabilities(same_host=False, device="host", receives=True, network=True)

    def export(self, count: int, size: int, context: ExportContext) -> TcpExported:
        return TcpExported(count, size, context)

    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> TcpImported:
        return TcpImported(descriptors, context)


TRANSPORT = TcpTransport()
