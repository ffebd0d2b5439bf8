"""A rank's connection to the sender: one ZMQ DEALER socket and what it knows of the sender.

It opens (and on a reconnect reopens) the socket, says HELLO and maps the slots a WELCOME
names, keeps the session alive with PINGs, notices a silent, restarted or departed sender,
decodes every frame and checks its data frames. The messages of a version (BEGIN, MANIFEST,
BUCKET, COMMIT, ABORT) go to its ``Versions`` handler; it knows nothing of versions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from ..metrics import Metrics
from ..protocol import messages as m
from ..protocol.errors import PeerLost, ProtocolError, WeightstreamError, wire_name
from ..protocol.transports import (
    ImportContext,
    Imported,
    ImportedSlot,
    Transport,
    available_transports,
    get_transport,
    host_identity,
)
from ..security import CurveKeys, apply_client_curve
from .state import CLAIM_ERRORS, RankState
from .waiting import cancel_and_wait

log = logging.getLogger("weightstream.receiver")

# a WELCOME's heartbeat interval is clamped to this: a sender asking for 1 ms would make the
# daemon spin on PINGs
MIN_HEARTBEAT_INTERVAL = 0.05


class Versions(Protocol):
    """What the session hands a version's messages to (``receiver.versions.VersionMachine``)."""

    @property
    def in_flight(self) -> str | None: ...

    async def handle(self, msg: m.Message, data: list[Any]) -> None: ...

    async def end(self, error: WeightstreamError) -> None: ...


class Session:
    def __init__(
        self,
        endpoint: str,
        rank: int,
        state: RankState,
        *,
        token: str,
        device: Any,
        host: str | None = None,
        heartbeat_interval: float,
        heartbeat_timeout: float | None = None,
        curve: tuple[CurveKeys, bytes] | None,
        insecure: bool,
    ) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self.state = state
        self.token = token  # this daemon's: a reconnect shows it again, so the sender adopts it
        self._device = device  # read on the rank's thread, where it selected its GPU
        self._host = host  # None: this machine's identity (see ReceiverDaemon's host_id)
        self._hb_interval = heartbeat_interval
        self._hb_timeout = heartbeat_timeout  # None: the silence the sender's WELCOME allows
        self.codec = m.Codec()  # this daemon's: it remembers the manifest it took last (keyed by content)
        self._curve = curve
        self._insecure = insecure
        self.versions: Versions | None = None  # set by the daemon before run()
        self.metrics: Metrics | None = None  # the daemon's, if it records any
        # what the sender's WELCOME gave this connection (None until then, and after it is lost)
        self.welcome: m.Welcome | None = None
        self.imported: Imported | None = None  # the transport's side of this connection: the slots, say
        self.transport: Transport | None = None
        self._ctx: Any = None
        self._sock: Any = None
        self._last_heard = 0.0
        self._dispatching = False  # the reader is handling a message (an abort may wait on load_weights)
        self._reconnect_event: asyncio.Event | None = None
        self._reconnect_reason: str | None = None
        self._error_limiter = m.ErrorReplyLimiter()

    @property
    def connected(self) -> bool:
        return self.welcome is not None

    @property
    def slots(self) -> list[ImportedSlot]:
        return self.imported.slots if self.imported is not None else []

    # --- lifetime ------------------------------------------------------------------------

    def open(self) -> None:
        """The context and the first socket, on the loop that runs the session."""
        self._reconnect_event = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._open_socket()

    async def close(self) -> None:
        """End the version in flight, say BYE, unmap every slot, close the socket."""
        await self._versions.end(WeightstreamError("daemon stopped"))
        if self.welcome is not None:
            self.send(m.Bye(reason="daemon stopped"))
        self._drop()
        self._sock.close(linger=0)
        self._ctx.term()

    @property
    def _versions(self) -> Versions:
        if self.versions is None:  # pragma: no cover - the daemon wires it before run()
            raise WeightstreamError("internal: the session has no version handler")
        return self.versions

    def _open_socket(self) -> None:
        """A fresh DEALER: libzmq gives each connection its own routing identity, and the rank is
        claimed in HELLO with this daemon's session token (a reconnect shows the same token)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue stale HELLO/PING for a sender that is not there
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE_BYTES)
        if self._curve is not None:
            apply_client_curve(sock, *self._curve)
        sock.connect(self.endpoint)
        self._sock = sock
        self._last_heard = time.monotonic()

    def request_reconnect(self, reason: str) -> None:
        """Drop this connection and open a new one (done by the connection loop)."""
        if self._reconnect_event is not None and not self._reconnect_event.is_set():
            log.warning("rank %d: reconnecting: %s", self.rank, reason)
            self._reconnect_reason = reason
            self._reconnect_event.set()

    async def connection_loop(self) -> None:
        """Read from the current socket; on a reconnect request end the version in flight, close
        the socket, open a new one and say HELLO again."""
        event = self._reconnect_event
        if event is None:  # pragma: no cover - open() sets it first
            raise WeightstreamError("internal: connection loop before open()")
        while True:
            reader = asyncio.create_task(self._read_loop(self._sock))
            wake = asyncio.create_task(event.wait())
            try:
                done, _ = await asyncio.wait([reader, wake], return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
                if not reader.done():
                    await cancel_and_wait([reader], grace=1.0, attempts=10)
            if reader in done:
                reader.result()  # _read_loop returns only by raising
                return
            reason = self._reconnect_reason or "reconnect requested"
            await self._versions.end(PeerLost(f"{reason}; the version in flight was aborted"))
            self._drop()
            self._sock.close(linger=0)
            self._open_socket()
            self.state.reconnected(reason)
            event.clear()
            self.send(self._hello())

    async def heartbeat_loop(self) -> None:
        while True:
            welcome = self.welcome
            if welcome is None:
                self.send(self._hello())
                # refused (the claim, or the slots): retry, but not in a hurry
                refused = (self.state.last_error or "").startswith((*CLAIM_ERRORS, "TransportError:"))
                await asyncio.sleep(max(self._hb_interval, MIN_HEARTBEAT_INTERVAL, 1.0 if refused else 0.0))
                continue
            interval = max(welcome.heartbeat_interval, MIN_HEARTBEAT_INTERVAL)
            silent = time.monotonic() - self._last_heard
            limit = welcome.heartbeat_timeout if self._hb_timeout is None else self._hb_timeout
            if silent > max(limit, 2 * interval) and not self._dispatching:
                self.state.heartbeat_missed()
                if self.metrics is not None:
                    self.metrics.heartbeat_missed("rank", self.rank)
                self.request_reconnect(f"the sender sent nothing for {silent:.1f}s (heartbeat timeout)")
            else:
                self.send(m.Ping(session=welcome.session))
            await asyncio.sleep(interval)

    # --- sending -------------------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        """Send without waiting; with IMMEDIATE set, a frame for a gone sender is dropped."""
        try:
            self._sock.send(self.codec.encode(msg), flags=zmq.NOBLOCK).add_done_callback(_ignore_send_error)
        except zmq.ZMQError as exc:
            log.debug("rank %d: could not send %s: %s", self.rank, msg.TYPE, exc)

    def protocol_error(self, exc: ProtocolError, version: str | None = None) -> None:
        """Log and record a bad frame, and tell the sender (rate-limited) which version it was about."""
        log.warning("rank %d: %s", self.rank, exc)
        self.state.remember_error(f"ProtocolError: {exc}")
        if self._error_limiter.allow(exc, time.monotonic()):
            self.send(m.Error(error="ProtocolError", message=str(exc)[: m.MAX_TEXT_LEN], version=version))

    def _hello(self) -> m.Hello:
        return m.Hello(
            rank=self.rank,
            session=self.token,
            # a transport this rank's security setup does not allow is not offered (see security_refusal)
            transports=available_transports(self._curve is not None, self._insecure),
            host=self._host if self._host is not None else host_identity(),
            device=self._device,
            pid=os.getpid(),
        )

    # --- receiving -----------------------------------------------------------------------

    async def _read_loop(self, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            msg = None
            try:
                # before a WELCOME is accepted, only small frames are decoded
                msg = self.codec.decode(frames[0].buffer, m.MAX_MESSAGE_BYTES if self.welcome is not None else m.PRE_HELLO_MAX_BYTES)
                self._check_data_frames(msg, len(frames) - 1)
                if self.welcome is not None:  # a stranger's frames do not keep a session alive
                    self._last_heard = time.monotonic()
                self._dispatching = True  # the sender is not silent while this reader is busy
                try:
                    await self._dispatch(msg, frames[1:])
                finally:
                    self._dispatching = False
                    if self.welcome is not None:  # silence counts from when this reader reads again
                        self._last_heard = time.monotonic()
            except ProtocolError as exc:
                # Name the version the bad frame was about (else the one in flight) so the
                # sender fails that round only; frames after a message that takes none belong
                # to no version, and the one in flight goes on.
                stray = msg is not None and not isinstance(msg, m.Bucket) and len(frames) > 1
                version = None if stray else getattr(msg, "version", None) or self._versions.in_flight
                self.protocol_error(exc, version)
            except Exception as exc:  # a sink's own code, say: the version fails, the daemon keeps serving
                log.error("rank %d: handling %s raised %s: %s", self.rank, msg.TYPE if msg else "a frame", type(exc).__name__, exc)
                version = getattr(msg, "version", None) or self._versions.in_flight
                self.state.remember_error(f"{type(exc).__name__}: {exc}")
                self.send(m.Error(error=wire_name(exc), message=f"{type(exc).__name__}: {exc}"[: m.MAX_TEXT_LEN], version=version))

    def _check_data_frames(self, msg: m.Message, count: int) -> None:
        """Frames after a message are bucket bytes: only after a BUCKET that announces them, and
        only on a session whose transport moves bytes that way."""
        announced = msg.frames or 0 if isinstance(msg, m.Bucket) else 0
        if count != announced:
            raise ProtocolError(
                f"{msg.TYPE}: expected {1 + announced} frame(s) in the message (the message"
                + (f" and its {announced} data frames" if announced else "") + f"), got {1 + count}"
            )
        if announced and (self.transport is None or not self.transport.capabilities.data_frames):
            raise ProtocolError(
                f"BUCKET: field 'frames': expected none, since this session's transport "
                f"{self.welcome.transport if self.welcome else None!r} moves no bytes in frames, got {announced}"
            )

    async def _dispatch(self, msg: m.Message, data: list[Any]) -> None:
        if isinstance(msg, m.Welcome):
            await self._on_welcome(msg)
        elif isinstance(msg, m.Pong):
            if self.welcome is not None and msg.session != self.welcome.session:
                await self._sender_lost("a new sender answered at the endpoint")
            elif self.welcome is not None and msg.known is False:
                self.request_reconnect("the sender no longer knows this connection (it was dropped)")
        elif isinstance(msg, m.Bye):
            if self.welcome is not None:
                log.info("rank %d: sender said BYE (%s)", self.rank, msg.reason)
                await self._versions.end(PeerLost(f"the sender left ({msg.reason})"))
                self._drop()
        elif isinstance(msg, m.Error):
            text = f"{msg.error}: {msg.message}"
            (log.warning if self.state.remember_error(text) else log.debug)("rank %d: sender reported %s", self.rank, text)
        elif self.welcome is None:
            raise ProtocolError(f"{msg.TYPE} before WELCOME; expected HELLO/WELCOME first")
        else:
            await self._versions.handle(msg, data)

    async def _sender_lost(self, reason: str) -> None:
        await self._versions.end(PeerLost(f"{reason}; the version in flight was aborted"))
        self._drop()
        self.send(self._hello())

    async def _on_welcome(self, msg: m.Welcome) -> None:
        if self.welcome is not None and self.welcome.session == msg.session:
            return  # a repeated WELCOME for a repeated HELLO
        if self.welcome is not None:
            await self._sender_lost("the sender restarted")
        try:
            transport = get_transport(msg.transport)
            imported = transport.attach(msg.slots, ImportContext(
                rank=self.rank, token=self.token, owner=(msg.pid, msg.session), sender_host=_host_of(self.endpoint),
                curve=self._curve, insecure=self._insecure,
            ))
        except WeightstreamError as exc:
            new = self.state.remember_error(f"{type(exc).__name__}: {exc}")
            (log.warning if new else log.debug)("rank %d: cannot map the sender's slots: %s", self.rank, exc)
            self.send(m.Error(error=wire_name(exc), message=str(exc)))
            return
        self.imported = imported
        self.transport = transport
        self.welcome = msg
        self._last_heard = time.monotonic()  # silence counts from the WELCOME, not from the socket's opening
        self.state.claim_accepted()
        log.info("rank %d: connected to sender (pid %d, %d %s slots)", self.rank, msg.pid, len(msg.slots), msg.transport)

    def _drop(self) -> None:
        """Forget the sender: unmap its slots (the version in flight was ended first)."""
        if self.imported is not None:
            self.imported.close()
        self.imported = None
        self.transport = None
        self.welcome = None


def _host_of(endpoint: str) -> str:
    """The host of a tcp endpoint ("" for ipc): the side a collective's socket faces."""
    if not endpoint.startswith("tcp://"):
        return ""
    return urlsplit(endpoint).hostname or ""


def _ignore_send_error(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("send failed: %s", future.exception())
