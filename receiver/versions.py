"""The rank's version state machine: BEGIN -> READY | REJECT, BUCKET -> inbox, PREPARED,
COMMIT -> COMMITTED, ABORT / failure -> FAILED.

It runs on the daemon's loop and answers the sender through its ``Link`` (the session),
and records every outcome in the rank's ``RankState``. One ``VersionRun`` per version
validates and slices its buckets; the user's ``load_weights`` runs on the apply thread
(one worker, FIFO) over the run's iterator, at most ``prefetch`` buckets behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ..metrics import Metrics
from ..protocol import messages as m
from ..protocol.errors import PeerTimeout, ProtocolError, VersionAborted, WeightstreamError, from_wire, wire_name
from ..protocol.transports import Imported, ImportedSlot, Transport
from ..version_log import log_version
from ..versions import check_version_order
from .consumer import Consumer
from .manifest import check_manifest
from .prefetch import PrefetchQueue
from .run_manifest import RunManifest
from .scratch import ScratchPool
from .sinks.base import NO_GROUPS, name_groups_of
from .state import RankState, VersionRecord
from .targets import detached_copy
from .version_run import VersionRun
from .view_keeper import ViewKeeper
from .waiting import wait_bounded

log = logging.getLogger("weightstream.receiver")

_ERROR_CHARS = 300  # of an error's text in a version's record and log line


class Link(Protocol):
    """The connection a version travels on (``receiver.session.Session``)."""

    welcome: m.Welcome | None
    imported: Imported | None
    transport: Transport | None

    @property
    def slots(self) -> list[ImportedSlot]: ...
    codec: m.Codec

    def send(self, msg: m.Message) -> None: ...

    def protocol_error(self, exc: ProtocolError, version: str | None = None) -> None: ...


class VersionMachine:
    def __init__(
        self, consumer: Consumer, state: RankState, link: Link, executor: ThreadPoolExecutor,
        metrics: Metrics | None = None,
    ) -> None:
        self.consumer = consumer
        self.state = state
        self.link = link
        self.metrics = metrics
        self.executor = executor  # the apply thread: load_weights, sink hooks, restore
        self.rank = consumer.rank
        self._run: VersionRun | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[m.Bucket] | None = None
        self._busy_slots: set[int] = set()
        # the last BEGIN's manifest (reused while the next is identical) and what it was checked against
        self._manifest: RunManifest | None = None
        self._manifest_layout: tuple[str, int] | None = None  # (sender session, layout) that named it
        self._last_checked: tuple[Any, RunManifest] | None = None
        self._pending_manifest: tuple[m.Begin, list[m.ManifestPart]] | None = None  # a split BEGIN so far
        # a network transport's receives (one thread, FIFO): the next bucket arrives while the apply
        # thread applies the last
        self._receiver: ThreadPoolExecutor | None = None
        self._scratch = ScratchPool()  # host scratch for tensors larger than a bucket, reused across versions
        self._kept_views = ViewKeeper()  # NumPy views of the slots' batches, handed out again when untouched

    @property
    def in_flight(self) -> str | None:
        """The version being received or prepared, if any."""
        run = self._run
        return run.version if run is not None else None

    async def handle(self, msg: m.Message, data: list[Any]) -> None:
        """A version's message from the sender (the session accepted its WELCOME)."""
        if isinstance(msg, m.Begin):
            await self._on_begin(msg)
        elif isinstance(msg, m.ManifestPart):
            await self._on_manifest_part(msg)
        elif isinstance(msg, m.Bucket):
            self._on_bucket(msg, data)
        elif isinstance(msg, m.Commit):
            self._on_commit(msg)
        elif isinstance(msg, m.Abort):
            if self._run is not None and self._run.version == msg.version:
                await self._abort_run(VersionAborted(f"sender aborted version {msg.version!r}: {msg.reason}"))
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} from the sender")

    async def end(self, error: WeightstreamError) -> None:
        """The connection is going (or the daemon stops): end the version in flight with ``error``
        and forget what was tied to this connection."""
        await self._abort_run(error)
        self._busy_slots.clear()
        self._pending_manifest = None

    def close(self) -> None:
        """The daemon stops: no more receives (one in progress ends at its version's abort)."""
        if self._receiver is not None:
            self._receiver.shutdown(wait=False)
            self._receiver = None

    # --- BEGIN ---------------------------------------------------------------------------

    async def _on_begin(self, msg: m.Begin) -> None:
        if self._run is not None:
            await self._abort_run(VersionAborted(f"superseded by version {msg.version!r}"))
        self.state.retrying(msg.version)
        self._pending_manifest = None
        if msg.parts is not None:  # the rest of the manifest follows in MANIFEST frames
            self._pending_manifest = (msg, [])
            return
        consumer, link = self.consumer, self.link
        expected, from_sink = consumer.specs()
        try:
            committed = self.state.committed
            check_version_order(msg.version, committed, force=bool(msg.force), unordered=True, fix="push with force=True")
            if consumer.has_hook("check_version"):  # e.g. a SnapshotWriter: the version must make a file name
                consumer.sink.check_version(msg.version)
            manifest = self._manifest_of(msg)
            if link.imported is not None and link.welcome is not None:  # a collective starts joining the push's group
                link.imported.join(msg.transport, link.welcome.heartbeat_timeout)
            if expected and not (from_sink and self._checked_before(manifest, expected)):
                # a sink names its tied tensors and the ones a push need not fill (buffers it has)
                tied, optional, meta = name_groups_of(consumer.sink) if from_sink else NO_GROUPS
                names, codes, shapes = manifest.checked_lists()
                check_manifest(
                    names, codes, shapes, expected, allow_missing=consumer.allow_missing, tied=tied,
                    optional=optional, unmaterialised=meta,
                )
                self._last_checked = (expected, manifest)
        except WeightstreamError as exc:
            # never filled yet (a meta-device model): it cannot run
            self.state.fail(msg.version, exc, touched=False, unfilled=bool(consumer.unmaterialised()))
            self._ended(msg.version, "rejected", None, exc, f"{type(exc).__name__}: {exc}")
            link.send(m.Reject(
                version=msg.version, error=wire_name(exc), reason=str(exc)[: m.MAX_TEXT_LEN],
                model_intact=self.state.model_intact,
            ))
            return
        loop = asyncio.get_running_loop()
        # whole tensors go straight into the sink's memory only when the manifest was checked
        # against that same sink, so every destination has the tensor's dtype and shape
        direct = from_sink and bool(expected) and not consumer.staged and consumer.direct_copy

        def on_ack(seq: int, slot: int) -> None:  # called on the apply thread
            loop.call_soon_threadsafe(self._ack, run, seq, slot)

        run = VersionRun(
            msg,
            framework=consumer.framework,
            queue=PrefetchQueue(consumer.prefetch, loop),
            timeout=consumer.apply_timeout,
            on_ack=on_ack,
            destination=consumer.destination,
            direct=direct,
            manifest=manifest,
            # a direct-copy sink returns the same specs object only while its arrays are unchanged
            targets_owner=expected,
            alignment=link.welcome.alignment if link.welcome is not None else m.ALIGNMENT,
            staged=consumer.staged,
            streamed=direct and self._streamable(manifest, expected),
            stream_index=self.rank,
            domain=link.transport.capabilities.device if link.transport is not None else "host",
            scratch=self._scratch,
            kept_views=self._kept_views,
        )
        self._run = run
        self._inbox = asyncio.Queue()
        self._busy_slots.clear()
        self.state.receiving(run.version)
        self._run_task = asyncio.create_task(self._apply(run, self._inbox))
        link.send(m.Ready(version=msg.version, streamed=True if run.streamed else None))

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
            whole = self.link.codec.join_manifest(first, rest)
        except ProtocolError as exc:
            self.state.fail(first.version, exc, touched=False)
            self.link.send(m.Reject(version=first.version, error="ProtocolError", reason=str(exc)[: m.MAX_TEXT_LEN]))
            return
        await self._on_begin(whole)

    def _manifest_of(self, msg: m.Begin) -> RunManifest:
        """The BEGIN's manifest: the one it carries (reusing the last one's derived forms if it is
        the same), or with ``reuse`` the one this rank took last under the BEGIN's ``layout``."""
        session = self.link.welcome.session if self.link.welcome is not None else ""
        manifest = self._manifest
        if not msg.reuse:
            if manifest is None or not manifest.same_as(msg):
                manifest = self._manifest = RunManifest(msg, self.link.codec.manifest_arrays(msg))
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

    def _streamable(self, manifest: RunManifest, expected: Any) -> bool:
        """Can this rank take the version's buckets streamed (read as the sender writes them)? Only
        if it copies every whole tensor to an address itself, so no view of a slot that is being
        rewritten reaches load_weights (chunked tensors are written piece by piece, in place or
        into scratch)."""
        link, destination = self.link, self.consumer.destination
        welcome, transport = link.welcome, link.transport
        if welcome is None or transport is None or destination is None:
            return False
        most = transport.capabilities.max_consumers
        if not transport.capabilities.streamed or (most is not None and self.rank >= most):
            return False
        if not link.slots or not all(slot.can_stream for slot in link.slots):
            return False
        if manifest.aliases_of:  # an alias is delivered after its tensor: not streamed
            return False
        try:
            _, addresses = manifest.targets(destination, expected)
        except Exception as exc:  # the sink's own code: the apply thread meets it again and fails the version
            log.debug("rank %d: not streamed, the sink's destinations raised %s", self.rank, type(exc).__name__)
            return False
        if addresses is None or manifest.tie_of:
            return False
        sizes = manifest.sizes  # an empty tensor needs no address, a chunked one is written piece by piece
        return bool(np.all((addresses != 0) | (sizes == 0) | (sizes > welcome.bucket_bytes)))

    def _checked_before(self, manifest: RunManifest, expected: Any) -> bool:
        """The same manifest against the same specs object passed last time (an RL loop's every step)."""
        last = self._last_checked
        return last is not None and last[0] is expected and last[1] is manifest

    # --- buckets -------------------------------------------------------------------------

    def _failed_already(self, version: str) -> bool:
        """Frames the sender queued before it saw this rank fail the version: drop them quietly."""
        return self.state.failed_already(version, self.in_flight)

    def _on_bucket(self, msg: m.Bucket, data: list[Any]) -> None:
        if self._failed_already(msg.version):
            return
        run, welcome, slots = self._run, self.link.welcome, self.link.slots
        if run is None or run.version != msg.version or self._inbox is None or welcome is None:
            raise ProtocolError(f"BUCKET for version {msg.version!r} with no such version in progress")
        m.check_bucket_fits(msg, [s.size for s in slots], welcome.alignment)
        if msg.slot in self._busy_slots:
            raise ProtocolError(f"BUCKET {msg.seq}: slot {msg.slot} reused before this receiver acked it")
        transport = self.link.transport
        if transport is not None and transport.capabilities.data_frames:
            if not data:
                raise ProtocolError(
                    f"BUCKET {msg.seq}: field 'frames': expected the bucket's bytes as data frames (transport "
                    f"{welcome.transport!r} moves them so), got none"
                )
            slots[msg.slot].accept(data)  # the bytes came with the message: into the rank's copy of the slot
        self._busy_slots.add(msg.slot)
        self._inbox.put_nowait(msg)

    def _ack(self, run: VersionRun, seq: int, slot: int) -> None:
        if run is not self._run:
            return
        self._busy_slots.discard(slot)
        self.link.send(m.Ack(version=run.version, seq=seq))

    async def _apply(self, run: VersionRun, inbox: asyncio.Queue[m.Bucket]) -> None:
        run.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        feeder = asyncio.create_task(self._feed(run, inbox))
        future = loop.run_in_executor(self.executor, self._apply_sync, run)
        try:
            await asyncio.shield(future)
        except Exception as exc:  # typed, or the user's load_weights raised: reported by name
            # an engine that kept this version's iterator and asks it again later (in the next
            # load_weights, say) gets this at once, not a wait of apply_timeout on the apply thread
            run.queue.abort(VersionAborted(
                f"version {run.version!r} ended ({type(exc).__name__}); its iterator gives nothing more: "
                "iterate the one load_weights was called with this time"
            ))
            self._fail_run(run, exc)
            return
        finally:
            feeder.cancel()
        self._prepared(run)

    def _apply_sync(self, run: VersionRun) -> None:
        if self.consumer.staged:
            # Copy the whole version out of the slots (one model's worth of spare memory); the
            # served model changes only at COMMIT (_swap), so an abort before it leaves it as it was.
            held = [(name, detached_copy(tensor)) for name, tensor in run.iterate()]
            if not run.complete:
                raise VersionAborted(f"version {run.version!r} ended before every tensor arrived")
            run.held = held
            return
        iterator = run.iterate()
        self.consumer.load(iterator)
        if not run.complete:
            raise VersionAborted(
                f"load_weights returned after applying {run.applied} of {run.total_tensors} tensors of "
                f"{run.version!r}; it must consume the whole iterator"
            )

    async def _feed(self, run: VersionRun, inbox: asyncio.Queue[m.Bucket]) -> None:
        """Prepare buckets (validate, slice into views) at most ``prefetch`` ahead."""
        transport = self.link.transport
        receives = transport is not None and transport.capabilities.receives
        loop = asyncio.get_running_loop()
        while True:
            msg = await inbox.get()
            slot = self.link.slots[msg.slot]
            try:
                prepared = run.prepare(msg, slot)
            except WeightstreamError as exc:
                self.link.protocol_error(exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc)), run.version)
                run.queue.abort(exc)
                return
            except Exception as exc:  # a defect here or in the transport: fail the version, say what it was
                log.exception("rank %d: preparing bucket %d of %r failed", self.rank, msg.seq, run.version)
                run.queue.abort(self._defect(run, msg, "preparing", exc))
                return
            if receives:  # the bucket's bytes into this rank's slot, beside the apply of the last one
                if self._receiver is None:
                    self._receiver = ThreadPoolExecutor(1, thread_name_prefix=f"weightstream-receive{self.rank}")
                try:
                    pieces = prepared.pieces if msg.checksum is None else None  # a digested bucket comes whole
                    await loop.run_in_executor(
                        self._receiver, slot.receive, msg.seq, pieces, prepared.used, run.check,
                        self.consumer.apply_timeout, run.landing(prepared),
                    )
                except WeightstreamError as exc:
                    if isinstance(exc, ProtocolError):
                        self.link.protocol_error(exc, run.version)
                    run.queue.abort(exc)
                    return
                except Exception as exc:
                    log.exception("rank %d: receiving bucket %d of %r failed", self.rank, msg.seq, run.version)
                    run.queue.abort(self._defect(run, msg, "receiving", exc))
                    return
            await run.queue.put(prepared)

    @staticmethod
    def _defect(run: VersionRun, msg: m.Bucket, doing: str, exc: Exception) -> VersionAborted:
        """An unexpected exception while a bucket was being prepared or received: the version fails
        at once with it (the sender would otherwise wait for the rank until its timeout)."""
        return VersionAborted(
            f"bucket {msg.seq} of {run.version!r}: {doing} it failed with {type(exc).__name__}: {exc}; the version was "
            "not committed. This is a defect in weightstream or in the session's transport: please report it"
        )

    # --- PREPARED, COMMIT ----------------------------------------------------------------

    def _prepared(self, run: VersionRun) -> None:
        """Every byte is applied (staged: held and verified): say PREPARED and wait for COMMIT."""
        if run is not self._run:
            return
        run.applied_ok = True
        run.prepared_seconds = time.perf_counter() - run.started
        self.state.prepared()
        self.link.send(m.Prepared(
            version=run.version, tensors=run.applied, bytes=run.total_bytes, seconds=run.prepared_seconds,
            in_place=run.held is None,
        ))

    def _on_commit(self, msg: m.Commit) -> None:
        run = self._run
        if self._failed_already(msg.version):
            return
        if run is None or run.version != msg.version or not run.applied_ok or run.commit_started:
            self.link.send(m.Failed(
                version=msg.version, error="VersionAborted",
                message="COMMIT for a version this rank has not said PREPARED to; a sender commits only once every "
                "rank prepared",
                model_intact=self.state.model_intact,
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
            run.changing_since = time.perf_counter()  # staged: the served model changes only now
            await asyncio.shield(loop.run_in_executor(self.executor, self.consumer.load, given()))
        except Exception as exc:  # after COMMIT: this rank reports the failure, the model may be torn
            self._fail_run(run, exc)
            return
        self._commit(run)

    def _commit(self, run: VersionRun) -> None:
        if run is not self._run:
            return
        now = time.perf_counter()
        seconds = now - run.started
        changing = None if run.changing_since is None else now - run.changing_since
        consumer = self.consumer
        if consumer.has_hook("on_commit"):
            # e.g. a SnapshotWriter: disk I/O on the (FIFO, single) apply thread. Queued before the
            # commit is visible, so a restore() or version that follows it runs after the snapshot.
            asyncio.get_running_loop().run_in_executor(self.executor, consumer.run_hook, "on_commit", self.state, run.version)
        self.state.commit(run.version, consumer.unmaterialised())
        self._end_run(ok=True)
        self.link.send(m.Committed(
            version=run.version, tensors=run.applied, bytes=run.total_bytes, seconds=seconds, changing=changing,
        ))
        self._ended(run.version, "committed", run, now=now)  # the record says what COMMITTED said

    def _ended(
        self, version: str, outcome: str, run: VersionRun | None, exc: BaseException | None = None,
        text: str | None = None, now: float | None = None,
    ) -> None:
        """A version ended on this rank (at ``now``, perf_counter): its record (for ``status``), its
        log line, its metrics."""
        if now is None:
            now = time.perf_counter()
        prepare = change = None
        tensors = nbytes = 0
        seconds = 0.0
        if run is not None:
            seconds = now - run.started if run.started else 0.0
            prepare = run.prepared_seconds if run.applied_ok else None
            change = None if run.changing_since is None else now - run.changing_since
            tensors, nbytes = run.applied, (run.total_bytes if outcome == "committed" else 0)
        reason = type(exc).__name__ if exc is not None else None
        self.state.record(VersionRecord(
            version, outcome, tensors, nbytes, seconds, prepare, change, time.time(),
            None if text is None else text[:_ERROR_CHARS],
        ))
        log_version(
            log, side="rank", rank=self.rank, version=version, outcome=outcome, tensors=tensors, bytes=nbytes,
            seconds=seconds, prepare_s=prepare, change_s=change, reason=reason,
            error=None if text is None else text[:_ERROR_CHARS],
        )
        if self.metrics is not None:
            self.metrics.version_ended("rank", outcome, reason)
            # a version that failed after touching the model is in the record and the log line, not in the histogram
            self.metrics.rank_timings("rank", self.rank, prepare, change if outcome == "committed" else None)

    def _end_run(self, ok: bool) -> None:
        """The version in flight ended on this rank; a failed one takes what the transport set up for
        it (a c10d group) with it."""
        self._run = None
        self._inbox = None
        if self.link.imported is not None:
            self.link.imported.leave(ok)

    # --- failure and ABORT ---------------------------------------------------------------

    def _fail_run(self, run: VersionRun, exc: BaseException) -> None:
        if run is not self._run:
            return
        self.consumer.run_hook("on_abort", self.state)
        text = str(exc)
        if not isinstance(exc, WeightstreamError) and run.last_given is not None:  # the engine's own error
            text += f" (while loading tensor {run.last_given!r}, the last one load_weights was given)"
        error = exc if isinstance(exc, WeightstreamError) else from_wire(type(exc).__name__, text, rank=self.rank)
        self.state.fail(run.version, error, touched=run.touched, shown=f"{type(exc).__name__}: {text}")
        self._ended(run.version, "aborted" if run.aborted else "failed", run, exc, f"{type(exc).__name__}: {text}")
        self._end_run(ok=False)
        self.link.send(
            m.Failed(
                version=run.version,
                error=type(exc).__name__,
                message=f"{type(exc).__name__}: {text}"[: m.MAX_TEXT_LEN],
                model_intact=self.state.model_intact,  # this version's damage and any earlier one's
            )
        )

    async def _abort_run(self, error: WeightstreamError) -> None:
        """Stop the version in flight and wait (bounded) for load_weights to return. A version
        whose COMMIT arrived is not aborted: its staged swap runs to its end."""
        run, task, timeout = self._run, self._run_task, self.consumer.apply_timeout
        if run is None:
            return
        if run.commit_started:
            swap = run.swap_task
            if swap is not None and not swap.done() and not await wait_bounded(swap, timeout):
                log.error("rank %d: load_weights did not return within %.0fs of COMMIT", self.rank, timeout)
                if self._run is run:  # no longer tracked: whatever it leaves in the model is not a committed version
                    self.state.fail(run.version, PeerTimeout(
                        f"the staged load_weights of {run.version!r} did not return within apply_timeout="
                        f"{timeout:.0f}s of its COMMIT; the model may hold part of it"
                    ), touched=True)
                    self._end_run(ok=False)
            return
        run.aborted = True
        run.queue.abort(error)
        if task is not None and not task.done() and not await wait_bounded(task, timeout):
            log.error("rank %d: load_weights did not return within %.0fs of an abort", self.rank, timeout)
        if self._run is run:  # _apply did not already record it: the rank had PREPARED
            self.consumer.run_hook("on_abort", self.state)
            run.held = None
            self.state.fail(run.version, error, touched=run.touched)
            self._ended(run.version, "aborted", run, error, f"{type(error).__name__}: {error}")
            self._end_run(ok=False)
            self.link.send(m.Failed(  # the answer to an ABORT; dropped if the sender is gone
                version=run.version, error=type(error).__name__, message=f"{type(error).__name__}: {error}"[: m.MAX_TEXT_LEN],
                model_intact=self.state.model_intact,  # this version's damage and any earlier one's
            ))
