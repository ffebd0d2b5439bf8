"""``ReceiverDaemon``: the inference rank's asyncio daemon (uvloop, zmq.asyncio).

The public face of three parts, each a module of its own:

- ``session.Session``: one DEALER socket to the sender: handshake (HELLO/WELCOME, the slots
  it names), heartbeats, reconnects, decoding every frame;
- ``versions.VersionMachine``: per version, BEGIN (and MANIFEST parts) -> manifest check ->
  READY | REJECT; buckets are applied (staged: copied aside) by a ``VersionRun`` whose
  iterator the user's ``load_weights`` consumes on the apply thread; then PREPARED, and the
  version is committed only on COMMIT (staged: load_weights runs then);
- ``state.RankState``: what the rank serves (committed version, failures, model_intact),
  read by ``status`` and ``wait_for_version`` and changed by live versions and ``restore``.

ABORT, or losing the sender, before COMMIT drops a version: the committed version stays, and
model_intact turns False if bytes reached the served model. The daemon reconnects on a new
socket (a new routing identity, the same session token) when the sender goes silent or no
longer knows its connection. ``serve()`` is the whole daemon for hosts that own a loop;
``start()`` runs it on uvloop in a background thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..frameworks import FRAMEWORKS, Framework
from ..metrics import metrics_for
from ..protocol.errors import ConfigError, PeerTimeout, WeightstreamError
from ..protocol.transports import device_identity
from ..security import CurveKeys, check_curve_key, check_network_endpoint, prepare_ipc_endpoint
from .consumer import Consumer, ParamSpecs
from .manifest import check_specs
from .session import MIN_HEARTBEAT_INTERVAL, Session
from .state import DaemonStatus, RankState, VersionRecord
from .status_endpoint import StatusServer, check_status_endpoint, status_dict
from .targets import resolve_target
from .versions import VersionMachine
from .waiting import cancel_and_wait, wait_bounded

__all__ = ["MIN_HEARTBEAT_INTERVAL", "DaemonStatus", "ParamSpecs", "ReceiverDaemon", "VersionRecord"]

log = logging.getLogger("weightstream.receiver")


class ReceiverDaemon:
    """Receives versions from a ``BucketSender`` and applies them through ``load_weights``.

    ``load_weights`` is either a plain callable taking an iterator of
    ``(name, tensor)`` pairs, or a sink (``TorchModuleSink``, ``PaddleLayerSink``,
    ``NumpySink``, ``PrefixRouter``) or a bound ``load_weights`` of one; a sink
    supplies ``param_specs`` for the manifest check and the views' framework.

    ``metrics=True`` (or a ``prometheus_client.CollectorRegistry``) records the rank's versions,
    apply and model-change seconds and heartbeat misses (``weightstream.metrics``).
    ``status_endpoint="ipc:///..."`` answers ``weightstream status`` there: state, committed
    version, last error and the last versions' timings (``receiver.status_endpoint``).
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
        host_id: str | None = None,
        metrics: Any = None,
        status_endpoint: str | None = None,
    ) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be an int >= 0, got {rank!r}; fix: this rank's index among the sender's ranks")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {prefetch}; fix: e.g. prefetch=2 (buckets mapped ahead)")
        if heartbeat_timeout is not None and not heartbeat_timeout > 0:
            raise ConfigError(
                f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}; fix: a few heartbeat intervals, or "
                "None to wait as long as the sender's WELCOME says (a rank waits at least two of its intervals)"
            )
        self.endpoint = endpoint
        self.rank = rank
        self.prefetch = prefetch
        load, sink = resolve_target(load_weights)
        if framework is not None and framework not in FRAMEWORKS:
            raise ConfigError(
                f"framework={framework!r}: expected one of {', '.join(FRAMEWORKS)} (the kind of tensor views "
                "load_weights gets); fix: e.g. framework=\"torch\""
            )
        if expected is not None:
            check_specs(expected, "expected=")
        # the host this rank says it runs on: a sender gives same-host transports (shm, cuda_ipc)
        # only to ranks on its own; containers on one node that share no /dev/shm set their own
        if host_id is not None and (not isinstance(host_id, str) or not 0 < len(host_id) <= 256):
            raise ConfigError(
                f"host_id: expected a non-empty str of at most 256 chars, got {host_id!r}; fix: a name per machine "
                "(or container without a shared /dev/shm), or None for this machine's own identity"
            )
        self.framework: Framework = framework or getattr(sink, "framework", None) or "numpy"
        self._consumer = Consumer(
            rank=rank, load=load, sink=sink, framework=self.framework, expected=expected, allow_missing=allow_missing,
            prefetch=prefetch, apply_timeout=apply_timeout, staged=staged,
        )
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
        self._metrics = metrics_for(metrics, "ReceiverDaemon")
        self._status_server = (
            StatusServer(check_status_endpoint(status_endpoint, endpoint, insecure), self._describe)
            if status_endpoint is not None else None
        )
        self._state = RankState()
        self._session = Session(
            endpoint, rank, self._state,
            token=secrets.token_hex(8),
            # read on the caller's thread: that is where the rank selected its GPU (the loop thread sees device 0)
            device=device_identity(),
            host=host_id,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            curve=(curve_keys, server_key) if curve_keys is not None and server_key is not None else None,
            insecure=insecure,
        )
        self._session.metrics = self._metrics
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None  # why serve() ended before it started serving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None  # the apply thread, while serving
        self._serving = False

    # --- public, thread-safe ---------------------------------------------------------

    @property
    def committed_version(self) -> str | None:
        return self._state.committed

    @property
    def status(self) -> DaemonStatus:
        return self._state.status(connected=self._session.connected)

    def start(self, timeout: float = 10.0) -> ReceiverDaemon:
        """Run the daemon on a uvloop event loop in a background thread."""
        if self._thread is not None:
            raise WeightstreamError("daemon already started; call stop() first")
        started = threading.Event()

        def main() -> None:
            loop: asyncio.AbstractEventLoop
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover - uvloop is a dependency, but keep running without it
                loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve(_started=started))
            except BaseException as exc:
                if not started.is_set():  # start() raises it
                    self._start_error = exc
                    started.set()
                    return
                raise
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=f"weightstream-rank{self.rank}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise PeerTimeout(f"daemon thread did not start within {timeout}s")
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            self._thread.join(timeout)
            self._thread = None
            raise error
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
        """Block until ``version`` is committed, or a newer one of its family (``step_3`` when
        waiting for ``step_2``: a rank that starts late may never see a version the trainer pushed
        before it came); raise its error if it failed, PeerTimeout on timeout."""
        if self._thread is None and not self._serving and self._state.name != "stopped":
            raise WeightstreamError(
                f"wait_for_version({version!r}) on a daemon that is not running; call daemon.start() first "
                "(or run `await daemon.serve()` in your event loop)"
            )
        self._state.wait_for(version, timeout)

    def __enter__(self) -> ReceiverDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restore(
        self, directory: str | os.PathLike[str], version: str | None = None, *,
        fallback_dir: str | os.PathLike[str] | None = None, force: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Apply this rank's snapshot of ``version`` (default: ``directory/version.yaml``) without a sender.

        Streams part by part through the same iterator as a live update; refuses a version
        older than the committed one unless ``force``. ``progress(bytes_done, bytes_total)`` is
        called before the first part and after each. Returns the version now committed.
        """
        from .snapshot import restore_rank

        # while serving, on the apply thread: never beside a live version, after every snapshot
        # a committed version queued there
        executor = self._executor if self._serving else None
        return restore_rank(
            self._consumer, self._state, directory, version, fallback_dir=fallback_dir, force=force, executor=executor,
            progress=progress,
        )

    def _describe(self) -> dict[str, Any]:
        """What the status endpoint answers (on the daemon's loop)."""
        from .. import __version__

        return status_dict(
            self.status, rank=self.rank, endpoint=self.endpoint, pid=os.getpid(), weightstream=__version__,
            framework=self.framework, staged=self._consumer.staged,
        )

    # --- the daemon ------------------------------------------------------------------

    async def serve(self, _started: threading.Event | None = None) -> None:
        """Run until ``stop()``; for hosts that own an event loop, ``await daemon.serve()``."""
        if self._serving:
            raise WeightstreamError("daemon is already serving")
        self._serving = True
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"weightstream-apply{self.rank}")
        session = self._session
        status_server = self._status_server
        if status_server is not None:
            try:
                await status_server.start()
            except BaseException:
                self._executor.shutdown(wait=False)
                self._serving = False
                raise
        session.versions = VersionMachine(self._consumer, self._state, session, self._executor, self._metrics)
        session.open()
        self._state.serving()
        tasks = [
            asyncio.create_task(session.connection_loop(), name="weightstream-read"),
            asyncio.create_task(session.heartbeat_loop(), name="weightstream-heartbeat"),
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
            await session.close()  # load_weights is aborted first
            session.versions.close()
            # Let queued work (a snapshot commit, say) finish.
            apply_timeout = self._consumer.apply_timeout
            shutdown = asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            if not await wait_bounded(shutdown, apply_timeout):
                log.error("rank %d: the apply thread did not finish within %.0fs of stop()", self.rank, apply_timeout)
            if status_server is not None:
                await status_server.close()
            self._state.stopped()
            self._serving = False
