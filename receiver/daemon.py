"""``ReceiverDaemon``: the inference rank's asyncio daemon (uvloop, zmq.asyncio).

One DEALER socket to the sender, three concurrent stages per daemon:
a reader that decodes and validates every frame and maps buckets into typed
views (at most ``prefetch`` ahead), a heartbeat task, and an apply thread that
runs the user's ``load_weights`` once per version over a synchronous iterator.
``serve()`` is the whole daemon for hosts that own a loop; ``start()`` runs it
on uvloop in a background thread.

Per version: BEGIN (and MANIFEST parts) -> manifest check -> READY | REJECT; buckets are
applied (staged: copied aside); then PREPARED, and the version is committed only on COMMIT
(staged: load_weights runs then). ABORT, or losing the sender, before COMMIT drops it: the
committed version stays, and model_intact turns False if bytes reached the served model.
The daemon reconnects on a new socket (a new routing identity, the same session token) when
the sender goes silent or no longer knows its connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from ..deadline import Deadline, wait_until
from ..frameworks import FRAMEWORKS, Framework
from ..protocol import messages as m
from ..protocol.errors import (
    ConfigError,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    VersionAborted,
    WeightstreamError,
    from_wire,
    wire_name,
)
from ..protocol.transports import (
    ImportedSlot,
    Transport,
    available_transports,
    device_identity,
    get_transport,
    host_identity,
)
from ..security import CurveKeys, apply_client_curve, check_curve_key, check_network_endpoint, prepare_ipc_endpoint
from ..versions import check_version_order
from .manifest import check_manifest
from .prefetch import PrefetchQueue
from .run_manifest import RunManifest
from .sinks.base import NO_GROUPS, name_groups_of
from .targets import detached_copy, resolve_target
from .version_run import VersionRun
from .waiting import cancel_and_wait, wait_bounded

log = logging.getLogger("weightstream.receiver")

ParamSpecs = Mapping[str, tuple[str, Sequence[int]]]

# a WELCOME's heartbeat interval is clamped to this: a sender asking for 1 ms would make the
# daemon spin on PINGs
MIN_HEARTBEAT_INTERVAL = 0.05
# the sender's answers to a claim it refused (another connection holds the rank, or the key may not claim it)
_CLAIM_ERRORS = ("RankInUse:", "IdentityRefused:")


@dataclass(frozen=True)
class DaemonStatus:
    """A snapshot of a daemon: what it serves and whether the model is whole."""

    state: str  # "idle" | "receiving" | "prepared" | "aborted" | "stopped"
    committed_version: str | None
    receiving_version: str | None  # the version in flight (receiving or prepared)
    model_intact: bool
    last_error: str | None
    connected: bool
    reconnects: int = 0  # times the daemon dropped its connection and opened a new one
    last_reconnect: str | None = None  # why it last did


class ReceiverDaemon:
    """Receives versions from a ``BucketSender`` and applies them through ``load_weights``.

    ``load_weights`` is either a plain callable taking an iterator of
    ``(name, tensor)`` pairs, or a sink (``TorchModuleSink``, ``PaddleLayerSink``,
    ``NumpySink``, ``PrefixRouter``) or a bound ``load_weights`` of one; a sink
    supplies ``param_specs`` for the manifest check and the views' framework.
    """

    def __init__(
        self,
        endpoint: str,
        load_weights: Any,
        *,
        rank: int = 0,
        prefetch: int = 2,
        framework: Framework | None = None,
        expected: ParamSpecs | None = None,
        allow_missing: bool = False,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
        apply_timeout: float = 300.0,
        curve_keys: CurveKeys | None = None,
        server_key: bytes | None = None,
        insecure: bool = False,
        staged: bool = False,
    ) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be an int >= 0, got {rank!r}; fix: this rank's index among the sender's ranks")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {prefetch}; fix: e.g. prefetch=2 (buckets mapped ahead)")
        self.endpoint = endpoint
        self.rank = rank
        self.prefetch = prefetch
        self._load, self._sink = resolve_target(load_weights)
        if framework is not None and framework not in FRAMEWORKS:
            raise ConfigError(
                f"framework={framework!r}: expected one of {', '.join(FRAMEWORKS)} (the kind of tensor views "
                "load_weights gets); fix: e.g. framework=\"torch\""
            )
        self.framework: Framework = framework or getattr(self._sink, "framework", None) or "numpy"
        self._expected = expected
        self._allow_missing = allow_missing
        self._hb_interval = heartbeat_interval
        if heartbeat_timeout is not None:  # a rank waits as long as its sender's WELCOME says
            warnings.warn(
                f"ReceiverDaemon(heartbeat_timeout={heartbeat_timeout}) has no effect and will be removed: a rank "
                "reconnects after the silence its sender's WELCOME allows; set BucketSender(heartbeat_timeout=) instead",
                DeprecationWarning,
                stacklevel=2,
            )
        self._apply_timeout = apply_timeout
        self._staged = staged
        # (specs, names, dtypes, shapes) of the last manifest that passed the check; a sink returns
        # the same specs object only while its params are unchanged (NumpySink does)
        # the last BEGIN's manifest (reused while the next is identical) and what it was checked against
        self._manifest: RunManifest | None = None
        self._manifest_layout: tuple[str, int] | None = None  # (sender session, layout) that named it
        self._last_checked: tuple[Any, RunManifest] | None = None
        self._session = secrets.token_hex(8)
        # Read on the caller's thread: that is where the rank selected its GPU (the loop thread sees device 0).
        self._device = device_identity()
        if (curve_keys is None) != (server_key is None):
            raise ConfigError(
                "CURVE needs both curve_keys= (this rank's key pair) and server_key= (the sender's public key), got "
                f"only {'curve_keys' if curve_keys is not None else 'server_key'}; fix: pass both, or neither"
            )
        if server_key is not None:
            check_curve_key("server_key", server_key)
        check_network_endpoint(endpoint, curve_keys is not None, insecure)
        # an ipc endpoint in a directory another user controls would let that user feed this rank
        prepare_ipc_endpoint(endpoint, insecure)
        self._insecure = insecure
        self._curve = (curve_keys, server_key) if curve_keys is not None and server_key is not None else None

        self._cond = threading.Condition()
        self._committed: str | None = None
        self._failed: dict[str, WeightstreamError] = {}
        self._state = "idle"
        self._model_intact = True
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._serving = False

        # session state, owned by the loop
        self._sock: Any = None
        self._welcome: m.Welcome | None = None
        self._slots: list[ImportedSlot] = []
        self._transport: Transport | None = None  # the session's, from WELCOME
        self._last_heard = 0.0
        self._run: VersionRun | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[m.Bucket] | None = None
        self._busy_slots: set[int] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._error_limiter = m.ErrorReplyLimiter()
        self._codec = m.Codec()  # this daemon's: it remembers the manifest it took last
        self._ctx: Any = None
        self._reconnect_reason: str | None = None
        self._dispatching = False  # the reader is handling a message (an abort may wait on load_weights)
        self._reconnect_event: asyncio.Event | None = None
        self._reconnects = 0
        self._last_reconnect: str | None = None
        self._pending_manifest: tuple[m.Begin, list[m.ManifestPart]] | None = None  # a split BEGIN so far

    # --- public, thread-safe ---------------------------------------------------------

    @property
    def committed_version(self) -> str | None:
        with self._cond:
            return self._committed

    @property
    def status(self) -> DaemonStatus:
        with self._cond:
            run = self._run
            return DaemonStatus(
                state=self._state,
                committed_version=self._committed,
                receiving_version=run.version if run is not None and self._state in ("receiving", "prepared") else None,
                model_intact=self._model_intact,
                last_error=self._last_error,
                connected=self._welcome is not None,
                reconnects=self._reconnects,
                last_reconnect=self._last_reconnect,
            )

    def start(self, timeout: float = 10.0) -> ReceiverDaemon:
        """Run the daemon on a uvloop event loop in a background thread."""
        if self._thread is not None:
            raise WeightstreamError("daemon already started; call stop() first")
        started = threading.Event()

        def main() -> None:
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover - uvloop is a dependency, but keep running without it
                loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve(_started=started))
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=f"weightstream-rank{self.rank}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise PeerTimeout(f"daemon thread did not start within {timeout}s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort any version in flight, say BYE, unmap every slot and stop the thread."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # loop already closed
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise PeerTimeout(f"daemon of rank {self.rank} did not stop within {timeout}s")
            self._thread = None

    def wait_for_version(self, version: str, timeout: float) -> None:
        """Block until ``version`` is committed; raise its error if it failed, PeerTimeout on timeout."""
        deadline = Deadline(timeout)
        if self._thread is None and not self._serving and self._state != "stopped":
            raise WeightstreamError(
                f"wait_for_version({version!r}) on a daemon that is not running; call daemon.start() first "
                "(or run `await daemon.serve()` in your event loop)"
            )

        def committed() -> bool:
            if self._committed == version:
                return True
            if version in self._failed:
                raise self._failed[version]
            if self._state == "stopped":
                raise WeightstreamError(f"daemon stopped before version {version!r} was committed")
            return False

        with self._cond:
            if not wait_until(self._cond, committed, deadline):
                raise PeerTimeout(
                    f"version {version!r} was not committed within {timeout}s (committed: {self._committed!r}); "
                    "is the trainer pushing it?"
                )

    def __enter__(self) -> ReceiverDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restore(
        self, directory: str | os.PathLike[str], version: str | None = None, *, fallback_dir: str | os.PathLike[str] | None = None, force: bool = False
    ) -> str:
        """Apply this rank's snapshot of ``version`` (default: ``directory/version.yaml``) without a sender.

        Streams part by part through the same iterator as a live update; refuses a version
        older than the committed one unless ``force``. Returns the version now committed.
        """
        from .snapshot import restore_into

        return restore_into(self, directory, version, fallback_dir=fallback_dir, force=force)

    # --- the daemon ------------------------------------------------------------------

    async def serve(self, _started: threading.Event | None = None) -> None:
        """Run until ``stop()``; for hosts that own an event loop, ``await daemon.serve()``."""
        if self._serving:
            raise WeightstreamError("daemon is already serving")
        self._serving = True
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"weightstream-apply{self.rank}")
        self._reconnect_event = asyncio.Event()
        ctx = self._ctx = zmq.asyncio.Context()
        self._open_socket()
        with self._cond:
            self._state = "idle"
        tasks = [
            asyncio.create_task(self._connection_loop(), name="weightstream-read"),
            asyncio.create_task(self._heartbeat_loop(), name="weightstream-heartbeat"),
        ]
        if _started is not None:
            _started.set()
        try:
            stop_wait = asyncio.create_task(self._stop_event.wait())
            done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    log.error("rank %d: daemon task failed: %r", self.rank, task.exception())
            stop_wait.cancel()
        finally:
            grace, attempts = 1.0, 10
            stuck = await cancel_and_wait(tasks, grace=grace, attempts=attempts)
            if stuck:
                names = ", ".join(t.get_name() for t in stuck)
                log.error("rank %d: %s ignored cancellation for %.0fs", self.rank, names, grace * attempts)
            await self._abort_run(WeightstreamError("daemon stopped"))
            if self._welcome is not None:
                self._send(m.Bye(reason="daemon stopped"))
            self._drop_session()
            self._sock.close(linger=0)
            ctx.term()
            # Let queued work (a snapshot commit, say) finish; load_weights was already aborted above.
            shutdown = asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            if not await wait_bounded(shutdown, self._apply_timeout):
                log.error("rank %d: the apply thread did not finish within %.0fs of stop()", self.rank, self._apply_timeout)
            with self._cond:
                self._state = "stopped"
                self._cond.notify_all()
            self._serving = False

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

    def _request_reconnect(self, reason: str) -> None:
        """Drop this connection and open a new one (done by the connection loop)."""
        if self._reconnect_event is not None and not self._reconnect_event.is_set():
            log.warning("rank %d: reconnecting: %s", self.rank, reason)
            self._reconnect_reason = reason
            self._reconnect_event.set()

    async def _connection_loop(self) -> None:
        """Read from the current socket; on a reconnect request abort the version in flight, close
        the socket, open a new one and say HELLO again."""
        event = self._reconnect_event
        if event is None:  # pragma: no cover - serve() sets it first
            raise WeightstreamError("internal: connection loop before serve()")
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
            await self._abort_run(PeerLost(f"{reason}; the version in flight was aborted"))
            self._drop_session()
            self._sock.close(linger=0)
            self._open_socket()
            with self._cond:
                self._reconnects += 1
                self._last_reconnect = reason
            event.clear()
            self._send(self._hello())

    def _send(self, msg: m.Message) -> None:
        """Send without waiting; with IMMEDIATE set, a frame for a gone sender is dropped."""
        try:
            self._sock.send(self._codec.encode(msg), flags=zmq.NOBLOCK).add_done_callback(_ignore_send_error)
        except zmq.ZMQError as exc:
            log.debug("rank %d: could not send %s: %s", self.rank, msg.TYPE, exc)

    def _hello(self) -> m.Hello:
        return m.Hello(
            rank=self.rank,
            session=self._session,
            transports=available_transports(),
            host=host_identity(),
            device=self._device,
            pid=os.getpid(),
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            welcome = self._welcome
            if welcome is None:
                self._send(self._hello())
                # refused (the claim, or the slots): retry, but not in a hurry
                refused = (self._last_error or "").startswith((*_CLAIM_ERRORS, "TransportError:"))
                await asyncio.sleep(max(self._hb_interval, MIN_HEARTBEAT_INTERVAL, 1.0 if refused else 0.0))
                continue
            interval = max(welcome.heartbeat_interval, MIN_HEARTBEAT_INTERVAL)
            silent = time.monotonic() - self._last_heard
            if silent > max(welcome.heartbeat_timeout, 2 * interval) and not self._dispatching:
                self._request_reconnect(f"the sender sent nothing for {silent:.1f}s (heartbeat timeout)")
            else:
                self._send(m.Ping(session=welcome.session))
            await asyncio.sleep(interval)

    async def _sender_lost(self, reason: str) -> None:
        await self._abort_run(PeerLost(f"{reason}; the version in flight was aborted"))
        self._drop_session()
        self._send(self._hello())

    async def _read_loop(self, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            msg = None
            try:
                # before a WELCOME is accepted, only small frames are decoded
                msg = self._codec.decode(frames[0].buffer, m.MAX_MESSAGE_BYTES if self._welcome is not None else m.PRE_HELLO_MAX_BYTES)
                self._check_data_frames(msg, len(frames) - 1)
                if self._welcome is not None:  # a stranger's frames do not keep a session alive
                    self._last_heard = time.monotonic()
                self._dispatching = True  # the sender is not silent while this reader is busy
                try:
                    await self._dispatch(msg, frames[1:])
                finally:
                    self._dispatching = False
                    if self._welcome is not None:  # silence counts from when this reader reads again
                        self._last_heard = time.monotonic()
            except ProtocolError as exc:
                # Name the version the bad frame was about (else the one in flight) so the
                # sender fails that round only.
                version = getattr(msg, "version", None) or (self._run.version if self._run is not None else None)
                self._protocol_error(exc, version)
            except Exception as exc:  # a sink's own code, say: the version fails, the daemon keeps serving
                log.error("rank %d: handling %s raised %s: %s", self.rank, msg.TYPE if msg else "a frame", type(exc).__name__, exc)
                version = getattr(msg, "version", None) or (self._run.version if self._run is not None else None)
                self._remember_error(f"{type(exc).__name__}: {exc}")
                self._send(m.Error(error=wire_name(exc), message=f"{type(exc).__name__}: {exc}"[: m.MAX_TEXT_LEN], version=version))

    def _protocol_error(self, exc: ProtocolError, version: str | None = None) -> None:
        log.warning("rank %d: %s", self.rank, exc)
        with self._cond:
            self._last_error = f"ProtocolError: {exc}"
        if self._error_limiter.allow(exc, time.monotonic()):
            self._send(m.Error(error="ProtocolError", message=str(exc)[: m.MAX_TEXT_LEN], version=version))

    def _check_data_frames(self, msg: m.Message, count: int) -> None:
        """Frames after a message are bucket bytes: only after a BUCKET that announces them, and
        only on a session whose transport moves bytes that way."""
        announced = msg.frames or 0 if isinstance(msg, m.Bucket) else 0
        if count != announced:
            raise ProtocolError(
                f"{msg.TYPE}: expected {1 + announced} frame(s) in the message (the message"
                + (f" and its {announced} data frames" if announced else "") + f"), got {1 + count}"
            )
        if announced and (self._transport is None or not self._transport.capabilities.data_frames):
            raise ProtocolError(
                f"BUCKET: field 'frames': expected none, since this session's transport "
                f"{self._welcome.transport if self._welcome else None!r} moves no bytes in frames, got {announced}"
            )

    async def _dispatch(self, msg: m.Message, data: list[Any] | None = None) -> None:
        if isinstance(msg, m.Welcome):
            await self._on_welcome(msg)
        elif isinstance(msg, m.Pong):
            if self._welcome is not None and msg.session != self._welcome.session:
                await self._sender_lost("a new sender answered at the endpoint")
            elif self._welcome is not None and msg.known is False:
                self._request_reconnect("the sender no longer knows this connection (it was dropped)")
        elif isinstance(msg, m.Bye):
            if self._welcome is not None:
                log.info("rank %d: sender said BYE (%s)", self.rank, msg.reason)
                await self._abort_run(PeerLost(f"the sender left ({msg.reason})"))
                self._drop_session()
        elif isinstance(msg, m.Error):
            text = f"{msg.error}: {msg.message}"
            (log.warning if self._remember_error(text) else log.debug)("rank %d: sender reported %s", self.rank, text)
        elif self._welcome is None:
            raise ProtocolError(f"{msg.TYPE} before WELCOME; expected HELLO/WELCOME first")
        elif isinstance(msg, m.Begin):
            await self._on_begin(msg)
        elif isinstance(msg, m.ManifestPart):
            await self._on_manifest_part(msg)
        elif isinstance(msg, m.Bucket):
            self._on_bucket(msg, data or [])
        elif isinstance(msg, m.Commit):
            self._on_commit(msg)
        elif isinstance(msg, m.Abort):
            if self._run is not None and self._run.version == msg.version:
                await self._abort_run(VersionAborted(f"sender aborted version {msg.version!r}: {msg.reason}"))
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} from the sender")

    async def _on_welcome(self, msg: m.Welcome) -> None:
        if self._welcome is not None and self._welcome.session == msg.session:
            return  # a repeated WELCOME for a repeated HELLO
        if self._welcome is not None:
            await self._sender_lost("the sender restarted")
        try:
            transport = get_transport(msg.transport)
            slots: list[ImportedSlot] = []
            try:
                for desc in msg.slots:
                    slots.append(transport.open_slot(desc, (msg.pid, msg.session), self._insecure))
            except BaseException:
                for slot in slots:
                    slot.close()
                raise
        except WeightstreamError as exc:
            new = self._remember_error(f"{type(exc).__name__}: {exc}")
            (log.warning if new else log.debug)("rank %d: cannot map the sender's slots: %s", self.rank, exc)
            self._send(m.Error(error=wire_name(exc), message=str(exc)))
            return
        self._slots = slots
        self._transport = transport
        self._welcome = msg
        self._last_heard = time.monotonic()  # silence counts from the WELCOME, not from the socket's opening
        with self._cond:
            if self._last_error is not None and self._last_error.startswith(_CLAIM_ERRORS):
                self._last_error = None  # the claim went through after all
        log.info("rank %d: connected to sender (pid %d, %d %s slots)", self.rank, msg.pid, len(slots), msg.transport)

    def _remember_error(self, text: str) -> bool:
        """Record ``text`` as the last error; False if it was already: a refusal comes back at every
        HELLO, and is logged once."""
        with self._cond:
            new, self._last_error = self._last_error != text, text
        return new

    def _drop_session(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots = []
        self._transport = None
        self._welcome = None
        self._busy_slots.clear()
        self._pending_manifest = None

    # --- versions --------------------------------------------------------------------

    async def _on_begin(self, msg: m.Begin) -> None:
        if self._run is not None:
            await self._abort_run(VersionAborted(f"superseded by version {msg.version!r}"))
        with self._cond:
            self._failed.pop(msg.version, None)  # a retry: waiters see this attempt, not the last one
        self._pending_manifest = None
        if msg.parts is not None:  # the rest of the manifest follows in MANIFEST frames
            self._pending_manifest = (msg, [])
            return
        expected = self._expected
        from_sink = expected is None and self._sink is not None
        if from_sink:
            expected = self._sink.param_specs()  # type: ignore[union-attr]
        try:
            committed = self.committed_version
            check_version_order(msg.version, committed, force=bool(msg.force), unordered=True, fix="push with force=True")
            manifest = self._manifest_of(msg)
            if self._transport is not None:  # a collective joins the push's group here
                self._transport.join(self._slots, msg.transport, self.rank)
            if expected and not (from_sink and self._checked_before(manifest, expected)):
                # a sink names its tied tensors and the ones a push need not fill (buffers it has)
                tied, optional, meta = name_groups_of(self._sink) if from_sink else NO_GROUPS
                names, codes, shapes = manifest.checked_lists()
                check_manifest(
                    names, codes, shapes, expected, allow_missing=self._allow_missing, tied=tied, optional=optional,
                    unmaterialised=meta,
                )
                self._last_checked = (expected, manifest)
        except WeightstreamError as exc:
            log.warning("rank %d: rejected version %r: %s", self.rank, msg.version, exc)
            self._record_failure(msg.version, exc, touched=False)
            if self._unmaterialised():  # never filled yet: the model cannot run
                with self._cond:
                    self._model_intact = False
            self._send(m.Reject(
                version=msg.version, error=wire_name(exc), reason=str(exc)[: m.MAX_TEXT_LEN],
                model_intact=self.status.model_intact,
            ))
            return
        loop = asyncio.get_running_loop()
        run = VersionRun(
            msg,
            framework=self.framework,
            queue=PrefetchQueue(self.prefetch, loop),
            timeout=self._apply_timeout,
            on_ack=lambda seq, slot: loop.call_soon_threadsafe(self._ack, run, seq, slot),
            destination=getattr(self._sink, "destination", None),
            # whole tensors go straight into the sink's memory only when the manifest was checked
            # against that same sink, so every destination has the tensor's dtype and shape
            direct=from_sink and bool(expected) and not self._staged and getattr(self._sink, "direct_copy", False) is True,
            manifest=manifest,
            # a direct-copy sink returns the same specs object only while its arrays are unchanged
            targets_owner=expected,
            alignment=self._welcome.alignment if self._welcome is not None else m.ALIGNMENT,
        )
        run.staged = self._staged
        run.streamed = self._streamable(run, manifest, expected)
        run.stream_index = self.rank
        run.check = run.queue.check
        self._run = run
        self._inbox = asyncio.Queue()
        self._busy_slots.clear()
        with self._cond:
            self._state = "receiving"
        self._run_task = asyncio.create_task(self._apply(run, self._inbox))
        self._send(m.Ready(version=msg.version, streamed=True if run.streamed else None))

    async def _on_manifest_part(self, msg: m.ManifestPart) -> None:
        pending = self._pending_manifest
        if pending is None or pending[0].version != msg.version or msg.part != len(pending[1]) + 1:
            self._pending_manifest = None
            want = "none" if pending is None else f"part {len(pending[1]) + 1} of {pending[0].version!r}"
            raise ProtocolError(f"MANIFEST {msg.version!r}: field 'part': expected {want}, got part {msg.part}")
        first, rest = pending
        rest.append(msg)
        if len(rest) + 1 < (first.parts or 0):
            return
        self._pending_manifest = None
        try:
            whole = self._codec.join_manifest(first, rest)
        except ProtocolError as exc:
            self._record_failure(first.version, exc, touched=False)
            self._send(m.Reject(version=first.version, error="ProtocolError", reason=str(exc)[: m.MAX_TEXT_LEN]))
            return
        await self._on_begin(whole)

    def _unmaterialised(self) -> list[str]:
        check = getattr(self._sink, "unmaterialised", None)
        return list(check()) if callable(check) else []

    def _manifest_of(self, msg: m.Begin) -> RunManifest:
        """The BEGIN's manifest: the one it carries (reusing the last one's derived forms if it is
        the same), or with ``reuse`` the one this rank took last under the BEGIN's ``layout``."""
        session = self._welcome.session if self._welcome is not None else ""
        manifest = self._manifest
        if not msg.reuse:
            if manifest is None or not manifest.same_as(msg):
                manifest = self._manifest = RunManifest(msg, self._codec.manifest_arrays(msg))
            self._manifest_layout = None if msg.layout is None else (session, msg.layout)
            return manifest
        if manifest is None or self._manifest_layout != (session, msg.layout):
            held = "none" if self._manifest_layout is None or self._manifest_layout[0] != session else self._manifest_layout[1]
            raise ProtocolError(
                f"BEGIN {msg.version!r}: field 'layout': expected the layout this rank holds from this sender ({held}), "
                f"got {msg.layout} with reuse=True; a sender resends the manifest to a rank that has not said READY "
                "to it since it connected, so push again (it will), and report it if it repeats"
            )
        if msg.total_bytes != manifest.total or (len(manifest) == 0) != (msg.buckets == 0):
            raise ProtocolError(
                f"BEGIN {msg.version!r}: expected {manifest.total} bytes in {'no' if not len(manifest) else 'some'} buckets "
                f"for the {len(manifest)} tensors of layout {msg.layout}, got total_bytes={msg.total_bytes} in "
                f"{msg.buckets} buckets; send the manifest when the layout changed"
            )
        return manifest

    def _streamable(self, run: VersionRun, manifest: RunManifest, expected: Any) -> bool:
        """Can this rank take the version's buckets streamed (read as the sender writes them)? Only
        if it copies every whole tensor to an address itself, so no view of a slot that is being
        rewritten reaches load_weights (chunked tensors are written piece by piece, in place or
        into scratch)."""
        welcome, transport, destination = self._welcome, self._transport, getattr(self._sink, "destination", None)
        if not run.direct or welcome is None or transport is None or destination is None:
            return False
        most = transport.capabilities.max_consumers
        if not transport.capabilities.streamed or (most is not None and self.rank >= most):
            return False
        if not self._slots or not all(slot.can_stream for slot in self._slots):
            return False
        if manifest.aliases_of:  # an alias is delivered after its tensor: not streamed
            return False
        try:
            _, addresses = manifest.targets(destination, expected)
        except Exception as exc:  # the sink's own code: the apply thread meets it again and fails the version
            log.debug("rank %d: not streamed for %r, the sink's destinations raised %s", self.rank, run.version, type(exc).__name__)
            return False
        if addresses is None or manifest.tie_of:
            return False
        sizes = manifest.sizes  # an empty tensor needs no address, a chunked one is written piece by piece
        return bool(np.all((addresses != 0) | (sizes == 0) | (sizes > welcome.bucket_bytes)))

    def _checked_before(self, manifest: RunManifest, expected: Any) -> bool:
        """The same manifest against the same specs object passed last time (an RL loop's every step)."""
        last = self._last_checked
        return last is not None and last[0] is expected and last[1] is manifest

    def _failed_already(self, version: str) -> bool:
        """Frames the sender queued before it saw this rank fail the version: drop them quietly."""
        with self._cond:
            return version in self._failed and (self._run is None or self._run.version != version)

    def _on_bucket(self, msg: m.Bucket, data: list[Any]) -> None:
        if self._failed_already(msg.version):
            return
        run, welcome = self._run, self._welcome
        if run is None or run.version != msg.version or self._inbox is None or welcome is None:
            raise ProtocolError(f"BUCKET for version {msg.version!r} with no such version in progress")
        m.check_bucket_fits(msg, [s.size for s in self._slots], welcome.alignment)
        if msg.slot in self._busy_slots:
            raise ProtocolError(f"BUCKET {msg.seq}: slot {msg.slot} reused before this receiver acked it")
        if data:  # the bytes came with the message: into the rank's copy of the slot
            self._slots[msg.slot].accept(data)
        self._busy_slots.add(msg.slot)
        self._inbox.put_nowait(msg)

    def _ack(self, run: VersionRun, seq: int, slot: int) -> None:
        if run is not self._run:
            return
        self._busy_slots.discard(slot)
        self._send(m.Ack(version=run.version, seq=seq))

    def _on_commit(self, msg: m.Commit) -> None:
        run = self._run
        if self._failed_already(msg.version):
            return
        if run is None or run.version != msg.version or not run.applied_ok or run.commit_started:
            self._send(m.Failed(
                version=msg.version, error="VersionAborted",
                message="COMMIT for a version this rank has not said PREPARED to; a sender commits only once every "
                "rank prepared",
                model_intact=self._model_intact,
            ))
            if run is not None and run.version == msg.version and not run.commit_started:
                run.queue.abort(ProtocolError(f"COMMIT of {msg.version!r} before this rank said PREPARED"))
            return
        run.commit_started = True
        if run.held is None:  # applied in place already: committing is bookkeeping
            self._commit(run)
            return
        # staged: the served model changes only now, with the bytes held since PREPARED
        run.swap_task = asyncio.create_task(self._swap(run))

    async def _swap(self, run: VersionRun) -> None:
        held, run.held = run.held or [], None
        loop = asyncio.get_running_loop()

        def given() -> Iterator[tuple[str, Any]]:  # a failure names the tensor load_weights was given last
            for name, tensor in held:
                run.last_given = name
                yield name, tensor

        try:
            run.touched = True
            await asyncio.shield(loop.run_in_executor(self._executor, self._load, given()))
        except Exception as exc:  # after COMMIT: this rank reports the failure, the model may be torn
            self._fail_run(run, exc)
            return
        self._commit(run)

    def _prepared(self, run: VersionRun) -> None:
        """Every byte is applied (staged: held and verified): say PREPARED and wait for COMMIT."""
        if run is not self._run:
            return
        run.applied_ok = True
        run.prepared_seconds = time.perf_counter() - run.started
        with self._cond:
            self._state = "prepared"
        self._send(m.Prepared(
            version=run.version, tensors=run.applied, bytes=run.total_bytes, seconds=run.prepared_seconds,
            in_place=run.held is None,
        ))

    def _commit(self, run: VersionRun) -> None:
        if run is not self._run:
            return
        seconds = time.perf_counter() - run.started
        hook = getattr(self._sink, "on_commit", None)
        if callable(hook):
            # e.g. a SnapshotWriter: disk I/O on the (FIFO, single) apply thread. Queued before the
            # commit is visible, so a restore() or version that follows it runs after the snapshot.
            asyncio.get_running_loop().run_in_executor(self._executor, self._run_hook, hook, run.version)
        unfilled = self._unmaterialised()
        with self._cond:
            self._committed = run.version
            self._state = "idle" if not unfilled else "aborted"
            # a model with tensors still on the meta device cannot run, whatever this version filled
            self._model_intact = not unfilled
            if unfilled:
                self._last_error = (
                    f"WeightstreamError: {len(unfilled)} tensors of the model were not filled by any push and are "
                    f"still on the meta device: {', '.join(unfilled[:5])}; push them too (e.g. named_buffers()), or "
                    "build the model with only its parameters on the meta device"
                )
            self._cond.notify_all()
        self._run = None
        self._inbox = None
        self._send(m.Committed(version=run.version, tensors=run.applied, bytes=run.total_bytes, seconds=seconds))
        log.info("rank %d: committed %s (%d tensors, %.3fs)", self.rank, run.version, run.applied, seconds)

    async def _apply(self, run: VersionRun, inbox: asyncio.Queue[m.Bucket]) -> None:
        run.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        feeder = asyncio.create_task(self._feed(run, inbox))
        future = loop.run_in_executor(self._executor, self._apply_sync, run)
        try:
            await asyncio.shield(future)
        except WeightstreamError as exc:
            self._fail_run(run, exc)
            return
        except Exception as exc:  # the user's load_weights raised: report it by name
            self._fail_run(run, exc)
            return
        finally:
            feeder.cancel()
        self._prepared(run)

    def _apply_sync(self, run: VersionRun) -> None:
        if self._staged:
            # Copy the whole version out of the slots (one model's worth of spare memory); the
            # served model changes only at COMMIT (_swap), so an abort before it leaves it as it was.
            held = [(name, detached_copy(tensor)) for name, tensor in run.iterate()]
            if not run.complete:
                raise VersionAborted(f"version {run.version!r} ended before every tensor arrived")
            run.held = held
            return
        iterator = run.iterate()
        self._load(iterator)
        if not run.complete:
            raise VersionAborted(
                f"load_weights returned after applying {run.applied} of {run.total_tensors} tensors of "
                f"{run.version!r}; it must consume the whole iterator"
            )

    async def _feed(self, run: VersionRun, inbox: asyncio.Queue[m.Bucket]) -> None:
        """Prepare buckets (validate, slice into views) at most ``prefetch`` ahead."""
        while True:
            msg = await inbox.get()
            try:
                prepared = run.prepare(msg, self._slots[msg.slot])
            except WeightstreamError as exc:
                self._protocol_error(exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc)), run.version)
                run.queue.abort(exc)
                return
            await run.queue.put(prepared)

    def _run_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        """Sink hooks never fail a version: the model is already fine; record and go on."""
        try:
            hook(*args)
        except Exception as exc:
            log.warning("rank %d: sink hook %s failed: %s", self.rank, getattr(hook, "__name__", hook), exc)
            with self._cond:
                self._last_error = f"{type(exc).__name__}: {exc}"

    def _sink_aborted(self) -> None:
        hook = getattr(self._sink, "on_abort", None)
        if callable(hook):
            self._run_hook(hook)

    def _fail_run(self, run: VersionRun, exc: BaseException) -> None:
        if run is not self._run:
            return
        self._sink_aborted()
        text = str(exc)
        if not isinstance(exc, WeightstreamError) and run.last_given is not None:  # the engine's own error
            text += f" (while loading tensor {run.last_given!r}, the last one load_weights was given)"
        log.warning("rank %d: version %r failed: %s: %s", self.rank, run.version, type(exc).__name__, text)
        error = exc if isinstance(exc, WeightstreamError) else from_wire(type(exc).__name__, text, rank=self.rank)
        self._record_failure(run.version, error, touched=run.touched, shown=f"{type(exc).__name__}: {text}")
        self._run = None
        self._inbox = None
        self._send(
            m.Failed(
                version=run.version,
                error=type(exc).__name__,
                message=f"{type(exc).__name__}: {text}"[: m.MAX_TEXT_LEN],
                model_intact=self.status.model_intact,  # this version's damage and any earlier one's
            )
        )

    def _record_failure(
        self, version: str, error: WeightstreamError, *, touched: bool, shown: str | None = None
    ) -> None:
        with self._cond:
            self._failed[version] = error
            if len(self._failed) > 64:
                self._failed.pop(next(iter(self._failed)))
            self._last_error = shown or f"{type(error).__name__}: {error}"
            if touched:
                self._model_intact = False
                self._state = "aborted"
            elif self._state in ("receiving", "prepared"):
                self._state = "idle" if self._model_intact else "aborted"
            self._cond.notify_all()

    async def _abort_run(self, error: WeightstreamError) -> None:
        """Stop the version in flight and wait (bounded) for load_weights to return. A version
        whose COMMIT arrived is not aborted: its staged swap runs to its end."""
        run, task = self._run, self._run_task
        if run is None:
            return
        if run.commit_started:
            swap = run.swap_task
            if swap is not None and not swap.done() and not await wait_bounded(swap, self._apply_timeout):
                log.error("rank %d: load_weights did not return within %.0fs of COMMIT", self.rank, self._apply_timeout)
                if self._run is run:  # no longer tracked: whatever it leaves in the model is not a committed version
                    self._record_failure(run.version, PeerTimeout(
                        f"the staged load_weights of {run.version!r} did not return within apply_timeout="
                        f"{self._apply_timeout:.0f}s of its COMMIT; the model may hold part of it"
                    ), touched=True)
                    self._run = None
                    self._inbox = None
            return
        run.queue.abort(error)
        if task is not None and not task.done():
            if not await wait_bounded(task, self._apply_timeout):
                log.error("rank %d: load_weights did not return within %.0fs of an abort", self.rank, self._apply_timeout)
        if self._run is run:  # _apply did not already record it: the rank had PREPARED
            self._sink_aborted()
            run.held = None
            self._record_failure(run.version, error, touched=run.touched)
            self._run = None
            self._inbox = None
            self._send(m.Failed(  # the answer to an ABORT; dropped if the sender is gone
                version=run.version, error=type(error).__name__, message=f"{type(error).__name__}: {error}"[: m.MAX_TEXT_LEN],
                model_intact=self.status.model_intact,  # this version's damage and any earlier one's
            ))


def _ignore_send_error(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("send failed: %s", future.exception())
