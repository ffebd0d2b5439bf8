"""The sender's I/O thread: one ZMQ ROUTER socket, the peer table and round state.

Only this thread touches the ROUTER socket. The trainer thread hands it frames
through a queue plus an inproc wake-up socket (no polling loop), and waits on
one condition variable for round events (READY, ACK, PREPARED, COMMITTED, failures).
The thread answers HELLO and PING at all times, so receivers see a live sender
while the trainer is busy between pushes.

Identity: libzmq names each connection (no ROUTER_HANDOVER, no chosen identities), and a
rank is claimed in HELLO together with the daemon's session token. ``peers`` maps each rank
to the one live connection holding it; a competing claim is refused (RankInUse) unless the
holder's connection is closed or silent past the heartbeat timeout, or the claim shows the
holder's own token (the same daemon on a new connection). Frames from a connection that
holds no rank are decoded only up to PRE_HELLO_MAX_BYTES.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import zmq

from ..deadline import Deadline, wait_until
from ..protocol import messages as m
from ..protocol.errors import (
    IdentityRefused,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    RankInUse,
    WeightstreamError,
    from_wire,
)
from ..security import (
    CurveKeys,
    SocketFile,
    apply_server_curve,
    check_network_endpoint,
    prepare_ipc_endpoint,
    refuse_live_ipc_endpoint,
    start_authenticator,
)

log = logging.getLogger("weightstream.sender")

_BYE_FLUSH_S = 0.05  # closing waits this long after the BYEs were handed to libzmq
_BYE_LINGER_MS = 500  # and then at most this long for them to leave

_T = TypeVar("_T")


@dataclass
class Peer:
    rank: int
    identity: bytes  # this connection's routing identity (libzmq's, random per connection)
    session: str  # the daemon's random token: a reconnect of the same daemon shows it again
    pid: int
    host: str
    last_seen: float
    # the layout this rank said READY to last (BucketSender's number): the next BEGIN of that
    # layout names it instead of resending the manifest. None from each BEGIN until its READY.
    layout: int | None = None
    last_error: str | None = None  # the last ERROR it sent, so a repeated one is logged once


@dataclass
class Round:
    """Everything the trainer thread waits on during one version."""

    version: str
    ranks: dict[int, bytes]  # rank -> routing identity
    tokens: dict[int, str] = field(default_factory=dict)  # rank -> its daemon's session token
    layout: int | None = None  # the BEGIN's layout number
    ready: set[int] = field(default_factory=set)
    streamed: set[int] = field(default_factory=set)  # ranks that take buckets streamed
    streams: bool = False  # buckets may be streamed this round (one transport serves every rank)
    max_consumers: int | None = None  # ranks a streamed bucket can feed (the transport's capability)
    rejected: dict[int, tuple[str, str, bool | None]] = field(default_factory=dict)  # error, reason, model_intact
    prepared: dict[int, m.Prepared] = field(default_factory=dict)
    commit_sent: bool = False
    committed: dict[int, m.Committed] = field(default_factory=dict)
    # a rank's failure: (error name, message, model_intact); after an ABORT, its answer to it
    failed: dict[int, tuple[str, str, bool]] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)  # ranks that sent FAILED (it carries model_intact)
    lost: dict[int, str] = field(default_factory=dict)  # rank -> why
    causes: set[int] = field(default_factory=set)  # ranks whose failure or loss ended the round
    aborted: bool = False  # ABORT went out: FAILED answers now report each rank's state
    failure: WeightstreamError | None = None
    # seq -> (slot, ranks still to ack)
    pending: dict[int, tuple[int, set[int]]] = field(default_factory=dict)
    # the ranks (routing identities) that said READY to this layout last: BEGIN names the layout
    # to them instead of resending its manifest
    reusing: list[bytes] = field(default_factory=list)

    def fail(self, error: WeightstreamError, rank: int | None = None) -> None:
        if self.failure is None:
            self.failure = error
            if rank is not None:
                self.causes.add(rank)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def settled(self, rank: int) -> bool:
        """Has this rank said how the round ended for it (or can it no longer)?"""
        return rank in self.answered or rank in self.lost or rank in self.rejected or rank in self.committed

    def all_checked(self) -> bool:
        """Has every rank answered the manifest (READY or REJECT)?"""
        return len(self.ready) + len(self.rejected) == len(self.ranks)

    def all_prepared(self) -> bool:
        return len(self.prepared) == len(self.ranks)

    def all_committed(self) -> bool:
        return len(self.committed) == len(self.ranks)

    def all_settled(self) -> bool:
        return all(self.settled(rank) for rank in self.ranks)


class Publisher:
    def __init__(
        self,
        endpoint: str,
        *,
        session: str,
        welcome: Callable[[m.Hello], m.Message],
        heartbeat_timeout: float,
        poll_interval: float,
        curve_keys: CurveKeys | None = None,
        allowed_clients: Iterable[bytes] | Mapping[int, bytes] | None = None,
        insecure: bool = False,
    ) -> None:
        self.endpoint = endpoint
        # {rank: public key}: a CURVE key may claim only its rank (the connection's ZAP user id)
        self._rank_keys: dict[int, bytes] | None = None
        if isinstance(allowed_clients, Mapping):
            self._rank_keys = {int(rank): _z85(key) for rank, key in allowed_clients.items()}
            allowed_clients = list(self._rank_keys.values())
        self.session = session
        self._welcome = welcome
        self._heartbeat_timeout = heartbeat_timeout
        self._poll_ms = max(1, int(poll_interval * 1000))
        self.cond = threading.Condition()
        self.peers: dict[int, Peer] = {}  # by rank: the one live connection holding it
        self._by_ident: dict[bytes, Peer] = {}
        self._refusals_logged: dict[str, float] = {}  # refusal text -> when it was last logged
        self.lost: dict[int, tuple[float, str]] = {}  # rank -> (when, why), for error messages
        self.refused: dict[int, tuple[float, str]] = {}  # rank -> (when, why) its last claim was refused
        self.round: Round | None = None
        self.on_slot_free: Callable[[int], None] = lambda slot: None
        self.on_silent: Callable[[int], None] = lambda rank: None  # a rank dropped for silence (heartbeat miss)
        self._error_limiter = m.ErrorReplyLimiter()
        self._codec = m.Codec()  # this sender's: it remembers the names of the manifest it sent last
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | threading.Event | None] = queue.SimpleQueue()
        self._bad_logged = (0.0, 0)  # (when a bad message was last logged, how many since went unlogged)

        check_network_endpoint(endpoint, curve_keys is not None, insecure)
        self._ctx = zmq.Context()
        self._auth: object | None = None
        self._auth = start_authenticator(self._ctx, allowed_clients) if curve_keys is not None else None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # a send to a gone peer raises, never drops. No ROUTER_HANDOVER: identities are libzmq's
        # own, one per connection, and a rank is claimed in HELLO, so no peer can take another's
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        # ranks send only small control messages: libzmq drops a connection that sends more, unread
        self._router.setsockopt(zmq.MAXMSGSIZE, m.MAX_PEER_MESSAGE_BYTES)
        if curve_keys is not None:
            apply_server_curve(self._router, curve_keys)
        try:
            prepare_ipc_endpoint(endpoint, insecure)
        except BaseException:
            self._close_sockets()
            raise
        wake_addr = f"inproc://ws-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._socket_file: SocketFile | None = None  # the ipc socket file this sender bound
        try:
            refuse_live_ipc_endpoint(endpoint, "sender", "one BucketSender per endpoint")
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise WeightstreamError(
                f"could not bind {endpoint} ({exc}); is another BucketSender bound there? "
                "Close it first or pick another endpoint"
            ) from exc
        except BaseException:
            self._close_sockets()
            raise
        self._socket_file = SocketFile.bound_at(endpoint)
        self._thread = threading.Thread(target=self._run, name="weightstream-publisher", daemon=True)
        self._thread.start()

    # --- rounds: the trainer thread opens, records and closes them through these ------

    def open_round(self, version: str, layout: int) -> Round:
        """Start the round of ``version`` over every connected rank. The ranks that said READY to
        ``layout`` last are the round's ``reusing``; every rank's layout is forgotten until it says
        READY to this BEGIN (a rank that fails in between gets the manifest again next time)."""
        with self.cond:
            rnd = Round(
                version=version,
                ranks={rank: peer.identity for rank, peer in self.peers.items()},
                tokens={rank: peer.session for rank, peer in self.peers.items()},
                layout=layout,
                reusing=[peer.identity for peer in self.peers.values() if peer.layout == layout],
            )
            for peer in self.peers.values():
                peer.layout = None
            self.round = rnd
        return rnd

    def allow_streams(self, rnd: Round, max_consumers: int | None) -> None:
        """This round's ranks may take buckets streamed (READY ``streamed``), up to ``max_consumers``."""
        with self.cond:
            rnd.streams, rnd.max_consumers = True, max_consumers

    def expect_acks(self, rnd: Round, seq: int, slot: int) -> None:
        """Bucket ``seq`` is going out in ``slot``: the slot is free again once every rank acked it."""
        with self.cond:
            rnd.pending[seq] = (slot, set(rnd.ranks))

    def commit_going_out(self, rnd: Round) -> None:
        """Every rank prepared: from here on the version is decided and is never aborted."""
        with self.cond:
            rnd.commit_sent = True

    def round_failed(self, rnd: Round, timed_out: float | None) -> bool:
        """The push failed: mark the round aborted unless COMMIT went out (return whether it did).
        ``timed_out``: the push timed out after this many seconds; the ranks that had not answered
        are recorded as lost."""
        with self.cond:
            commit_sent, rnd.aborted = rnd.commit_sent, not rnd.commit_sent
            if timed_out is not None:
                for rank in rnd.ranks:
                    if not rnd.settled(rank) and (commit_sent or rank not in rnd.prepared):
                        rnd.lost[rank] = f"no answer within {timed_out:.1f}s"
        return commit_sent

    def read_round(self, rnd: Round, read: Callable[[Round], _T]) -> _T:
        """``read(rnd)`` under the lock: the I/O thread may still be recording answers."""
        with self.cond:
            return read(rnd)

    def close_round(self, rnd: Round) -> None:
        with self.cond:
            if self.round is rnd:
                self.round = None

    # --- called from the trainer thread ----------------------------------------------

    def send(self, rank_identity: bytes, msg: m.Message) -> None:
        self._outbox.put((rank_identity, self._codec.encode(msg)))
        self._wake()

    def broadcast(self, identities: list[bytes], msg: m.Message, data: Sequence[Any] = ()) -> None:
        """``msg`` to each rank; ``data``: frames sent after it in the same multipart message (a
        data-frame transport's bucket bytes), shared, not copied, across ranks."""
        frame = self._codec.encode(msg)
        for ident in identities:
            self._outbox.put((ident, frame, *data) if data else (ident, frame))
        self._wake()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait on round/peer events; raise the round's failure or PeerTimeout."""
        deadline = Deadline(timeout)

        def done() -> bool:
            if self.round is not None:
                self.round.check()
            return predicate()

        with self.cond:
            if not wait_until(self.cond, done, deadline):
                raise PeerTimeout(f"timed out after {timeout:.1f}s waiting for {what}")

    def prune_closed(self, timeout: float = 1.0) -> None:
        """Drop the ranks whose connection closed (a send to it fails under ROUTER_MANDATORY): a
        probe to each, answered by nothing; bounded by ``timeout``."""
        with self.cond:
            idents = [p.identity for p in self.peers.values()]
        if not idents:
            return
        done = threading.Event()
        probe = self._codec.encode(m.Pong(session=self.session, known=True))
        for ident in idents:
            self._outbox.put((ident, probe))
        self._outbox.put(done)
        self._wake()
        done.wait(timeout)

    def wait_quiet(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait on round/peer events until ``predicate`` holds or ``timeout``; never raises."""
        deadline = Deadline(timeout)
        with self.cond:
            return wait_until(self.cond, predicate, deadline)

    def close(self, bye: bool = True) -> None:
        idents: list[bytes] = []
        if bye:
            with self.cond:
                idents = [p.identity for p in self.peers.values()]
            self.broadcast(idents, m.Bye(reason="sender closed"))
        self._outbox.put(None)
        self._wake()
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # pragma: no cover - the loop always wakes within poll_interval
            log.warning("publisher thread did not stop within 10s")
        if idents:
            # Measured: closing the ROUTER right after the BYEs went into it lost one in ~5 on ipc,
            # LINGER notwithstanding, and those ranks then waited out a heartbeat timeout (counted
            # as a miss). A moment for libzmq's I/O thread to write them out, then a short linger.
            time.sleep(_BYE_FLUSH_S)
        self._close_sockets(linger_ms=_BYE_LINGER_MS if idents else 0)
        if self._socket_file is not None:  # only the socket file this sender bound, never a successor's
            self._socket_file.remove()

    def _close_sockets(self, linger_ms: int = 0) -> None:
        for sock in (self._router, getattr(self, "_wake_rx", None), getattr(self, "_wake_tx", None)):
            if sock is not None:
                sock.close(linger=linger_ms if sock is self._router else 0)
        if self._auth is not None:
            self._auth.stop()  # type: ignore[attr-defined]
        self._ctx.term()

    def _wake(self) -> None:
        with self._wake_lock:  # the PUSH socket is shared by caller threads
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already queued

    # --- the I/O thread ----------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while True:
            events = dict(poller.poll(self._poll_ms))
            if self._wake_rx in events:
                while True:
                    try:
                        self._wake_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if not self._flush_outbox():
                return
            if self._router in events:
                self._drain_router()
            self._check_heartbeats()

    def _flush_outbox(self) -> bool:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                self._flush_outbox()
                return False
            if isinstance(item, threading.Event):  # everything queued before it was sent
                item.set()
                continue
            try:
                self._router.send_multipart(item, copy=False)
            except zmq.ZMQError as exc:
                self._peer_gone(item[0], f"send failed ({exc.strerror})")

    def _drain_router(self) -> None:
        want_key = self._rank_keys is not None
        while True:
            try:
                received = self._router.recv_multipart(zmq.NOBLOCK, copy=not want_key)
            except zmq.Again:
                return
            if len(received) != 2:
                log.warning("dropped a message of %d frames; expected [identity, body]", len(received))
                continue
            user_id: str | None = None
            frames: list[bytes]
            if want_key:
                copies = cast("list[zmq.Frame]", received)  # copy=False: Frames, for their metadata
                # the ZAP handler's name for the CURVE key; pyzmq types Frame.get(str) as int | str
                user_id = cast(str, copies[1].get("User-Id"))
                frames = [f.bytes for f in copies]
            else:
                frames = cast("list[bytes]", received)
            ident, body = frames
            known = ident in self._by_ident  # read by this thread only (the lock guards writes)
            try:
                # before its HELLO is accepted a peer gets only small frames decoded
                msg = self._codec.decode(body, m.MAX_PEER_MESSAGE_BYTES if known else m.PRE_HELLO_MAX_BYTES)
            except ProtocolError as exc:
                self._log_bad(exc, known)
                if known and self._error_limiter.allow(exc, time.monotonic()):  # unknown peers get nothing
                    self._try_send(ident, m.Error(error="ProtocolError", message=str(exc)[: m.MAX_TEXT_LEN]))
                continue
            self._handle(ident, msg, user_id)

    def _log_bad(self, exc: ProtocolError, known: bool) -> None:
        """At most one line a second: a peer flooding garbage must not flood the log too."""
        now = time.monotonic()
        last, quiet = self._bad_logged
        if now - last < 1.0:
            self._bad_logged = (last, quiet + 1)
            return
        more = f" ({quiet} more bad messages in the last second not logged)" if quiet else ""
        log.warning("bad message from %s: %s%s", "a rank" if known else "an unknown peer", exc, more)
        self._bad_logged = (now, 0)

    def _try_send(self, ident: bytes, msg: m.Message) -> bool:
        try:
            self._router.send_multipart([ident, self._codec.encode(msg)])
        except zmq.ZMQError:
            return False
        return True

    def _handle(self, ident: bytes, msg: m.Message, user_id: str | None) -> None:
        now = time.monotonic()
        if isinstance(msg, m.Hello):
            self._on_hello(ident, msg, now, user_id)
            return
        with self.cond:
            peer = self._by_ident.get(ident)
            if isinstance(msg, m.Ping):
                if peer is not None:
                    peer.last_seen = now
                # An unknown peer (dropped, or never welcomed) learns that it must say HELLO again.
                self._try_send(ident, m.Pong(session=self.session, known=peer is not None))
                return
            if peer is None:
                log.debug("ignored %s from a connection that holds no rank", msg.TYPE)
                return
            peer.last_seen = now
            if isinstance(msg, m.Bye):
                self._drop_peer(peer, f"rank {peer.rank} said BYE ({msg.reason})", clean=True)
                return
            if isinstance(msg, m.Pong):
                return
            self._on_round_message(peer, msg)

    def _refuse(self, ident: bytes, rank: int, error: WeightstreamError) -> None:
        # a refused daemon retries its HELLO every second: log each distinct refusal once a minute
        text, now = str(error), time.monotonic()
        with self.cond:  # a push waiting for this rank says why it never came
            self.refused[rank] = (now, f"{type(error).__name__}: {text}")
        if now - self._refusals_logged.get(text, -1e9) > 60.0:
            self._refusals_logged = {k: t for k, t in self._refusals_logged.items() if now - t <= 60.0}
            self._refusals_logged[text] = now
            log.warning("refused a claim: %s", error)
        self._try_send(ident, m.Error(error=type(error).__name__, message=str(error)[: m.MAX_TEXT_LEN]))

    def _on_hello(self, ident: bytes, msg: m.Hello, now: float, user_id: str | None) -> None:
        if self._rank_keys is not None:
            allowed = self._rank_keys.get(msg.rank)
            if user_id is None or allowed is None or user_id.encode() != allowed:
                mine = [r for r, k in self._rank_keys.items() if user_id is not None and k == user_id.encode()]
                self._refuse(ident, msg.rank, IdentityRefused(
                    f"rank {msg.rank} was claimed with CURVE key {(user_id or '?')[:8]}..., which allowed_clients "
                    f"lets claim only rank {describe_ranks(mine)}; start the daemon with rank= matching its key, or "
                    "map the key to this rank in the sender's allowed_clients"
                ))
                return
        try:
            reply = self._welcome(msg)
        except WeightstreamError as exc:
            self._refuse(ident, msg.rank, exc)
            return
        with self.cond:
            holder = self.peers.get(msg.rank)
            if holder is not None and holder.identity != ident:
                if holder.session == msg.session:  # the same daemon on a new connection
                    self._drop_peer(holder, f"rank {msg.rank} reconnected")
                elif self._try_send(holder.identity, m.Pong(session=self.session, known=True)):
                    # the holder's connection is alive (a send to a closed one raises): refuse
                    self._refuse(ident, msg.rank, RankInUse(
                        f"rank {msg.rank} is held by a live connection (pid {holder.pid} on {holder.host}); the "
                        f"claim of pid {msg.pid} on {msg.host} is refused. "
                        "Give each daemon its own rank; a restarted rank is adopted once the old one has been "
                        f"silent for {self._heartbeat_timeout:.0f}s (the sender's heartbeat_timeout)"
                    ))
                    return
                else:
                    self._drop_peer(holder, f"rank {msg.rank}: its connection closed")
            peer = self._by_ident.get(ident)
            if peer is not None and peer.rank != msg.rank:
                self._refuse(ident, msg.rank, IdentityRefused(
                    f"this connection holds rank {peer.rank} and now claims rank {msg.rank}; a daemon has one rank"
                ))
                return
            if peer is None:
                peer = Peer(msg.rank, ident, msg.session, msg.pid, msg.host, now)
                self.peers[msg.rank] = self._by_ident[ident] = peer
            peer.last_seen = now
            self.lost.pop(msg.rank, None)
            self.refused.pop(msg.rank, None)
            self.cond.notify_all()
        log.info("rank %d connected (pid %d)", msg.rank, msg.pid)
        self._try_send(ident, reply)

    def _on_round_message(self, peer: Peer, msg: m.Message) -> None:
        rnd = self.round
        if isinstance(msg, m.Error):
            text = f"{msg.error}: {msg.message}"
            # a rank refusing the handshake repeats itself at every HELLO: say it once
            (log.debug if peer.last_error == text else log.warning)("rank %d reported %s", peer.rank, text)
            peer.last_error = text
            # An error about another (earlier, already failed) version must not fail this one.
            if rnd is not None and peer.rank in rnd.ranks and msg.version == rnd.version:
                rnd.failed.setdefault(peer.rank, (msg.error, msg.message, True))
                rnd.fail(from_wire(msg.error, msg.message, rank=peer.rank), peer.rank)
                self.cond.notify_all()
            return
        version = getattr(msg, "version", None)
        if rnd is None or version != rnd.version or peer.rank not in rnd.ranks:
            log.debug("ignored %s for version %r from rank %d", msg.TYPE, version, peer.rank)
            return
        if isinstance(msg, m.Ready):
            rnd.ready.add(peer.rank)
            peer.layout = rnd.layout
            if msg.streamed and rnd.streams and (rnd.max_consumers is None or peer.rank < rnd.max_consumers):
                rnd.streamed.add(peer.rank)
        elif isinstance(msg, m.Reject):
            rnd.rejected[peer.rank] = (msg.error, msg.reason, msg.model_intact)
        elif isinstance(msg, m.Ack):
            entry = rnd.pending.get(msg.seq)
            if entry is None:
                return
            slot, waiting = entry
            waiting.discard(peer.rank)
            if not waiting:
                del rnd.pending[msg.seq]
                self.on_slot_free(slot)
        elif isinstance(msg, m.Prepared):
            rnd.prepared[peer.rank] = msg
        elif isinstance(msg, m.Committed):
            rnd.committed[peer.rank] = msg
        elif isinstance(msg, m.Failed):
            if peer.rank not in rnd.ready:
                # A rank says READY before it can fail a version, and its messages arrive in order:
                # this is the FAILED that an ABORT of an earlier attempt at this version drew.
                log.debug("ignored FAILED of an earlier attempt at %r from rank %d", rnd.version, peer.rank)
                return
            first = rnd.failed.get(peer.rank)  # an ERROR may have named the cause already
            rnd.failed[peer.rank] = (msg.error, msg.message, msg.model_intact) if first is None else (
                first[0], first[1], msg.model_intact)
            rnd.answered.add(peer.rank)
            if not rnd.aborted:  # after an ABORT, a FAILED is a rank's answer to it
                after = " after COMMIT (the served model may be torn)" if rnd.commit_sent else ""
                rnd.fail(from_wire(msg.error, msg.message + after, rank=peer.rank), peer.rank)
        else:
            log.debug("ignored unexpected %s from rank %d", msg.TYPE, peer.rank)
            return
        self.cond.notify_all()

    def _peer_gone(self, ident: bytes, reason: str) -> None:
        with self.cond:
            peer = self._by_ident.get(ident)
            if peer is not None:
                self._drop_peer(peer, f"rank {peer.rank}: {reason}")

    def _drop_peer(self, peer: Peer, reason: str, clean: bool = False) -> None:
        """Caller holds the lock."""
        if self._by_ident.get(peer.identity) is peer:
            del self._by_ident[peer.identity]
        if self.peers.get(peer.rank) is peer:
            del self.peers[peer.rank]
            self.lost[peer.rank] = (time.monotonic(), reason)
        (log.info if clean else log.warning)("peer gone: %s", reason)
        rnd = self.round
        if rnd is not None and peer.rank in rnd.ranks and not rnd.settled(peer.rank):
            rnd.lost[peer.rank] = reason
            when = "after COMMIT went out (it may or may not have committed)" if rnd.commit_sent else "before COMMIT"
            rnd.fail(PeerLost(
                f"{reason} during version {rnd.version!r}, {when}; restart the rank (it reconnects on its own) "
                "and push again",
                rank=peer.rank,
            ), peer.rank)
        self.cond.notify_all()

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        with self.cond:
            stale = [p for p in self.peers.values() if now - p.last_seen > self._heartbeat_timeout]
            for peer in stale:
                self._drop_peer(peer, f"rank {peer.rank} sent nothing for {now - peer.last_seen:.1f}s (heartbeat timeout)")
                self.on_silent(peer.rank)

    def describe_refused(self) -> str:
        """Ranks whose last claim was refused, and why (the last refusal of each)."""
        now = time.monotonic()
        with self.cond:
            return "; ".join(
                f"rank {rank} ({now - when:.1f}s ago): {why}" for rank, (when, why) in sorted(self.refused.items())
            )

    def describe_lost(self) -> str:
        now = time.monotonic()
        with self.cond:
            return "; ".join(f"{why} ({now - when:.1f}s ago)" for _, (when, why) in sorted(self.lost.items()))

    def snapshot_peers(self) -> dict[int, Peer]:
        with self.cond:
            return dict(self.peers)


def describe_ranks(ranks: Any) -> str:
    return ", ".join(str(r) for r in sorted(ranks)) or "none"


def _z85(key: bytes | str) -> bytes:
    """A CURVE public key as the ZAP handler names it: 40 Z85 characters."""
    raw = key.encode() if isinstance(key, str) else bytes(key)
    return zmq.utils.z85.encode(raw) if len(raw) == 32 else raw


