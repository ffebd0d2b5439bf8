"""``BucketSender``: the trainer's handle for pushing versions to inference ranks."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing.util
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from ..gc_pause import gc_paused
from ..metrics import metrics_for
from ..protocol import messages as m
from ..protocol.errors import (
    ConfigError,
    PeerTimeout,
    UnknownTransport,
    VersionAborted,
    WeightstreamError,
    from_wire,
)
from ..protocol.packed import pack_shapes
from ..protocol.transports import TRANSPORTS, ExportContext, PushLayout, StreamSpec, check_begin_fields, host_identity
from ..security import CurveKeys
from ..version_log import log_version
from ..versions import read_version
from .lanes import AUTO, FanOut, Lane, Lanes, data_host_port
from .manifest import Aliased, Manifest, describe, from_specs, take_aliases
from .packing import PieceCache, fill
from .planner import MAX_ENTRIES, RAMP, RING_MAX_ENTRIES, plan_buckets
from .publisher import Publisher, Round, describe_ranks
from .ring import SlotRing

log = logging.getLogger("weightstream.sender")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Layout:
    """What a push derives from its layout alone. An RL loop pushes the same layout every
    step, so the next push redoes only the checks, not this (~2 ms at 100k tensors)."""

    manifest: Manifest  # without its tensors
    plan: list[Any]
    ndims: bytes  # BEGIN's packed shapes
    dims: bytes
    dtypes: bytes  # BEGIN's dtype codes
    total: int  # payload bytes
    may_split: bool  # the manifest may not fit one frame: BEGIN is then split into MANIFEST parts
    max_entries: int  # the planner's cap on tensors per bucket
    max_bytes: int  # and on bytes (0: bucket_bytes)
    number: int  # names it in a BEGIN to ranks that took it already (this sender's count)
    aliases: list[tuple[str, int]] = field(default_factory=list)  # tied names sent once: (name, manifest index)
    writers: PushLayout | None = None  # what the transport's writers take of it (and derive once)


@dataclass(frozen=True)
class ReceiverResult:
    """One rank's part in a push.

    ``outcome``: "committed"; "aborted" (it was fine, another rank's failure ended the
    version); "rejected" (its manifest check refused the version before a byte was written);
    "failed" (its own error, in ``error``); "lost" (disconnected, silent or timed out).
    ``model_intact``: False when the rank's served model holds bytes of a version it did not
    commit (it applied in place and then aborted); None when the rank did not say.
    ``transport``: the transport that served the rank in this push.
    ``prepare_seconds``: the rank's BEGIN to PREPARED (receiving, verifying and applying the
    version); None if it did not prepare. ``change_seconds``: how long its served model was
    being changed, from the first write into it to the commit (``staged=True``: the swap at
    COMMIT alone); None if it did not commit.
    """

    rank: int
    tensors: int
    bytes: int
    seconds: float
    outcome: str = "committed"
    error: str | None = None
    model_intact: bool | None = True
    transport: str | None = None  # what carried its bytes (with transport="auto", chosen per rank)
    prepare_seconds: float | None = None
    change_seconds: float | None = None


@dataclass(frozen=True)
class PushReport:
    """What one ``push`` moved and how each rank ended it. ``push`` returns it when every rank
    committed (``committed``); a failed push raises with it as ``exc.report``.

    Pause vs prepare: ``prepare_seconds`` is the slowest rank's time to hold the whole version
    (receive, verify, apply); ``change_seconds`` the longest any rank's served model was being
    changed (with ``staged=True`` ranks, the swap at COMMIT alone, while ranks that apply in place
    change their model for about as long as they prepare). ``slot_wait_seconds``: the trainer's
    packer waiting for slots the ranks had not acked yet.
    """

    version: str
    bytes: int
    tensors: int
    buckets: int
    seconds: float
    receivers: dict[int, ReceiverResult] = field(default_factory=dict)
    committed: bool = True
    slot_wait_seconds: float = 0.0

    @property
    def prepare_seconds(self) -> float | None:
        """The slowest rank's BEGIN to PREPARED; None if no rank prepared."""
        times = [r.prepare_seconds for r in self.receivers.values() if r.prepare_seconds is not None]
        return max(times) if times else None

    @property
    def change_seconds(self) -> float | None:
        """The longest time any rank's served model was being changed; None if none committed."""
        times = [r.change_seconds for r in self.receivers.values() if r.change_seconds is not None]
        return max(times) if times else None

    @property
    def gbps(self) -> float:
        """Payload gigabytes (1e9) per second, end to end."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


# Senders not closed yet: a trainer that exits without close() (or `with`) still says BYE to its
# ranks, which would otherwise wait out their heartbeat timeout, and frees its slots and socket file.
_OPEN: weakref.WeakSet[BucketSender] = weakref.WeakSet()


def _close_open_senders() -> None:
    for sender in list(_OPEN):
        if sender._pid != os.getpid():  # a forked child's copy (a data-loader worker): the parent's to close
            continue
        try:
            sender.close()
        except Exception as exc:  # exiting anyway: say what was left, never raise from atexit
            log.warning("closing a BucketSender at exit: %s: %s", type(exc).__name__, exc)


atexit.register(_close_open_senders)
# a multiprocessing child leaves through os._exit, which skips atexit but runs these finalizers
multiprocessing.util.Finalize(None, _close_open_senders, exitpriority=10)


# an ABORT's reason is repeated in every rank's answer and log line: keep it short
_ABORT_REASON_CHARS = 500
# after a failure, how long a push waits for the other ranks to say how it ended for them
# (their answers to ABORT carry model_intact) before it raises
_OUTCOME_WAIT_S = 2.0


class BucketSender:
    """Packs named tensors into shared bucket slots and streams them to receivers.

    The sender binds ``endpoint``; receivers connect and may come and go.
    ``push`` blocks until every connected receiver (at least ``receivers``)
    applied and committed the version, and raises a typed error otherwise.
    """

    def __init__(
        self,
        endpoint: str,
        receivers: int = 1,
        transport: str = "shm",
        bucket_bytes: int = 256 << 20,
        num_buffers: int = 2,
        *,
        alignment: int = m.ALIGNMENT,
        timeout: float = 120.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        model_dir: str | Path | None = None,
        checksum: bool = False,
        curve_keys: CurveKeys | None = None,
        allowed_clients: Iterable[bytes] | Mapping[int, bytes] | None = None,
        insecure: bool = False,
        data_address: str | None = None,
        metrics: Any = None,
    ) -> None:
        if receivers < 1:
            raise ConfigError(f"receivers must be >= 1, got {receivers}; fix: the number of ranks a push waits for")
        if not 1 <= num_buffers <= m.MAX_SLOTS:
            raise ConfigError(f"num_buffers must be 1..{m.MAX_SLOTS}, got {num_buffers}; fix: 2 overlaps packing with applying")
        if timeout <= 0 or heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
            raise ConfigError(
                "expected timeout > 0 and heartbeat_timeout > heartbeat_interval > 0, got "
                f"timeout={timeout}, heartbeat_interval={heartbeat_interval}, heartbeat_timeout={heartbeat_timeout}"
            )
        if transport not in TRANSPORTS and transport != AUTO:  # a known one this host cannot run: TransportError, below
            raise UnknownTransport(
                f"transport={transport!r}: expected one of {sorted([*TRANSPORTS, AUTO])}; fix: e.g. transport='shm'"
            )
        data_host, data_port = data_host_port(data_address, endpoint)
        self._metrics = metrics_for(metrics, "BucketSender")
        plan_buckets([], bucket_bytes, alignment)  # validates bucket_bytes/alignment early
        self.endpoint = endpoint
        self.receivers = receivers
        self.bucket_bytes = bucket_bytes
        self.alignment = alignment
        self.timeout = timeout
        self.checksum = checksum
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.session = secrets.token_hex(8)
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        allowed = None
        if allowed_clients is not None:
            allowed = list(allowed_clients.values()) if isinstance(allowed_clients, Mapping) else list(allowed_clients)
        # the transport's slots, or for transport="auto" each rank's transport's, made as ranks need them
        self._lanes = Lanes(transport, num_buffers, bucket_bytes, ExportContext(
            session=self.session, data_host=data_host, data_port=data_port, curve_keys=curve_keys,
            allowed_clients=allowed, insecure=insecure, heartbeat_timeout=heartbeat_timeout, checksum=checksum,
        ))
        self._closed = False
        self._push_lock = threading.Lock()
        try:
            self._publisher = Publisher(
                endpoint,
                session=self.session,
                welcome=self._welcome,
                heartbeat_timeout=heartbeat_timeout,
                poll_interval=min(heartbeat_interval, 0.25),
                curve_keys=curve_keys,
                allowed_clients=allowed_clients,
                insecure=insecure,
            )
        except BaseException:
            self._lanes.close()
            raise
        self._ring = SlotRing(num_buffers, self._publisher.cond)
        # the last push's manifest, bucket plan and packed shapes: an RL loop pushes the same
        # layout every step, so only its checks are redone, not its planning
        self._last_layout: _Layout | None = None
        self._last_full: Manifest | None = None  # the last push's manifest with its aliases, without tensors
        self._aliased: Aliased | None = None  # its aliases, found once per layout
        self._layouts = 0  # layouts planned so far: the last one's number
        self._streamed_last: bool | None = None  # did every rank take the last push streamed?
        self._publisher.on_slot_free = self._ring.release
        if self._metrics is not None:
            self._publisher.on_silent = functools.partial(self._metrics.heartbeat_missed, "sender")
        self.committed_version: str | None = None
        self._pid = os.getpid()
        _OPEN.add(self)

    @property
    def _slots(self) -> list[Any]:
        """The slots of the sender's transport while it has one (what leak and fault tests inspect)."""
        lane = self._lanes.single()
        return list(lane.exported.slots) if lane is not None else []

    # --- context manager -------------------------------------------------------------

    def __enter__(self) -> BucketSender:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Say BYE to the receivers, stop the I/O thread and free every slot."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._publisher.close()
        self._lanes.close()

    # --- handshake -------------------------------------------------------------------

    def _welcome(self, hello: m.Hello) -> m.Welcome:
        lane = self._lanes.assign(hello.rank, hello.transports, hello.host, hello.host == host_identity())
        return m.Welcome(
            session=self.session,
            transport=lane.transport.name,
            bucket_bytes=self.bucket_bytes,
            alignment=self.alignment,
            slots=lane.exported.descriptors(),
            heartbeat_interval=self._heartbeat_interval,
            heartbeat_timeout=self._heartbeat_timeout,
            pid=os.getpid(),
        )

    def wait_for_receivers(self, count: int | None = None, timeout: float | None = None) -> list[int]:
        """Block until ``count`` (default ``receivers``) ranks said HELLO; return their ranks."""
        count = self.receivers if count is None else count
        timeout = self.timeout if timeout is None else timeout
        pub = self._publisher
        try:
            pub.wait(lambda: len(pub.peers) >= count, timeout, f"{count} receiver(s) to connect to {self.endpoint}")
        except PeerTimeout:
            lost, refused = pub.describe_lost(), pub.describe_refused()
            fix = (
                "fix the refusal above on the rank (or the sender), then its daemon is admitted at its next HELLO"
                if refused else "start (or restart) the ReceiverDaemons, or lower receivers="
            )
            raise PeerTimeout(
                f"timed out after {timeout:.1f}s waiting for {count} receiver(s) at {self.endpoint}; connected ranks: "
                f"{describe_ranks(pub.snapshot_peers())}" + (f"; lost: {lost}" if lost else "")
                + (f"; refused: {refused}" if refused else "") + f"; {fix}"
            ) from None
        return sorted(pub.snapshot_peers())

    # --- push ------------------------------------------------------------------------

    def push(
        self,
        named_tensors: Iterable[tuple[str, Any]],
        version: str | None = None,
        *,
        timeout: float | None = None,
        force: bool = False,
        specs: Mapping[str, tuple[str, Sequence[int]]] | None = None,
    ) -> PushReport:
        """Stream one version to every receiver; return when all committed it.

        Two-phase: each rank says PREPARED once it holds every byte (applied, or staged);
        only then does COMMIT go out. Any rejection, failure, lost rank or timeout before
        that aborts the version on every rank, and ``push`` raises with the PushReport
        (each rank's outcome) as ``exc.report``.

        Ranks refuse a version older than the one they committed (``step_9`` after
        ``step_10``) unless ``force=True``.

        Lazy mode: given ``specs`` (``{name: (dtype, shape)}`` in the order the
        tensors will come, the same form as a sink's ``param_specs()``),
        ``named_tensors`` may be a generator that makes each tensor on demand (a
        gathered shard, say). It is advanced only when packing reaches the next
        tensor and nothing keeps a tensor once its bytes are in a slot, so the
        trainer never holds the whole state dict. A tensor that differs from its
        spec aborts the version on every rank.
        """
        if self._closed:
            raise WeightstreamError("push on a closed BucketSender; create a new one")
        # one version at a time: a second thread's push would share the slots and the round
        if not self._push_lock.acquire(blocking=False):
            raise WeightstreamError(
                f"push of {version!r} while another thread's push is in progress on this BucketSender; a sender "
                "pushes one version at a time: wait for the other push to return (e.g. a lock around push), or "
                "give each stream of versions its own sender and endpoint"
            )
        try:
            return self._push(named_tensors, version, timeout, force, specs)
        finally:
            self._push_lock.release()

    def _push(
        self,
        named_tensors: Iterable[tuple[str, Any]],
        version: str | None,
        timeout: float | None,
        force: bool,
        specs: Mapping[str, tuple[str, Sequence[int]]] | None,
    ) -> PushReport:
        timeout = self.timeout if timeout is None else timeout
        if version is None:
            if self.model_dir is None:
                raise ConfigError(
                    "push needs a version: pass version='step_N' or give BucketSender(model_dir=...) "
                    "holding a version.yaml with 'step:'"
                )
            version = read_version(self.model_dir)
        if not isinstance(version, str) or not version or len(version) > m.MAX_NAME_LEN:
            raise ConfigError(f"version must be a non-empty str of at most {m.MAX_NAME_LEN} chars, got {version!r}")
        source: Iterator[tuple[str, Any]] | None = None
        if specs is not None:
            manifest = from_specs(specs)
            source = iter(named_tensors)
        else:
            full = describe(named_tensors, previous=self._last_full)
            self._last_full = replace(full, tensors=None)
            # tied weights (one tensor under several names) travel once, the other names as aliases
            manifest, self._aliased = take_aliases(full, self._aliased)
        aliases = self._aliased.aliases if specs is None and self._aliased is not None else []
        streamed = self._streams_expected()
        layout, cap = self._last_layout, RING_MAX_ENTRIES if streamed else MAX_ENTRIES
        hot = 0 if streamed else self._hot_bytes()
        if (
            layout is None or layout.max_entries != cap or layout.max_bytes != hot
            or not manifest.same_layout(layout.manifest) or layout.aliases != aliases
        ):
            with gc_paused():
                # a bucket streamed through a ring ships before it is packed: no ramp needed
                ramp = 0 if streamed else RAMP
                plan = plan_buckets(
                    manifest.nbytes, self.bucket_bytes, self.alignment, max_entries=cap, ramp=ramp, max_bytes=hot
                )
                ndims, dims = pack_shapes(manifest.shapes)
            # without the tensors: a trainer that makes fresh ones per push must get its memory back
            self._layouts += 1
            layout = self._last_layout = _Layout(
                replace(manifest, tensors=None), plan, ndims, dims, bytes(manifest.dtypes), sum(manifest.nbytes),
                m.may_need_split(manifest.names, len(dims)), cap, hot, self._layouts, aliases,
                PushLayout(plan, manifest.nbytes),
            )
        plan, total = layout.plan, layout.total
        # a rank whose process died since the last push still holds its place until a send to it
        # fails: find out now, so that its restarted process gets the push's timeout to connect
        self._publisher.prune_closed()
        self.wait_for_receivers(timeout=timeout)
        start = time.perf_counter()
        pub = self._publisher
        rnd = pub.open_round(version, layout.number)
        # ranks that said READY to this layout last are sent its number, the rest the manifest
        ranks, reusing = rnd.ranks, rnd.reusing
        idents = list(ranks.values())
        # each rank's transport (one, unless transport="auto" serves ranks of several kinds)
        lanes = self._lanes.of(ranks)
        if len(lanes) == 1:  # only then may buckets be streamed (see _stream), to as many ranks as it feeds
            pub.allow_streams(rnd, lanes[0][0].transport.capabilities.max_consumers)
        carriers = {rank: lane.transport.name for lane, share in lanes for rank in share}
        self._ring.reset()
        ok = False

        def check() -> None:  # a transport's wait ends once the push failed, or a rank refused it
            rnd.check()
            if rnd.rejected:
                raise _rejection(version, rnd)

        try:
            forced = True if force else None
            begins = []
            for lane, share in lanes:
                fields = lane.exported.begin_push(
                    {rank: rnd.tokens.get(rank, "") for rank in share}, check, timeout
                )
                if fields is not None:
                    check_begin_fields(lane.transport, fields)
                begins.append((list(share.values()), fields))
            for lane_idents, fields in begins:
                needs_manifest = [ident for ident in lane_idents if ident not in reusing]
                if needs_manifest:
                    alias_names, alias_of = m.pack_aliases(layout.aliases)
                    begin = m.Begin(
                        version=version,
                        names=manifest.names,
                        dtypes=layout.dtypes,
                        ndims=layout.ndims,
                        dims=layout.dims,
                        total_bytes=total,
                        buckets=len(plan),
                        force=forced,
                        layout=layout.number,
                        alias_names=alias_names,
                        alias_of=alias_of,
                        transport=fields,
                    )
                    # a manifest over one frame's limit travels as BEGIN + MANIFEST parts
                    for frame in m.split_begin(begin) if layout.may_split else [begin]:
                        pub.broadcast(needs_manifest, frame)
                again_to = [ident for ident in lane_idents if ident in reusing]
                if again_to:
                    again = m.Begin.reusing(version, layout.number, total, len(plan), forced)
                    pub.broadcast(again_to, replace(again, transport=fields) if fields is not None else again)
            log.debug(
                "BEGIN %s: layout %d named to ranks: %s; its manifest sent to ranks: %s", version, layout.number,
                describe_ranks(r for r, ident in ranks.items() if ident in reusing),
                describe_ranks(r for r, ident in ranks.items() if ident not in reusing),
            )

            def wait_ready() -> None:
                pub.wait(
                    rnd.all_checked,
                    timeout,
                    f"ranks {describe_ranks(set(ranks) - rnd.ready - set(rnd.rejected))} to check the manifest of {version!r}",
                )
                if rnd.rejected:
                    raise _rejection(version, rnd)

            # Packing the first slots overlaps the receivers' manifest check; nothing is
            # published (and so nothing touches a model) before every rank said READY.
            self._stream(manifest, layout, rnd, lanes, timeout, wait_ready, source)
            # Two-phase: COMMIT only once every rank holds every byte (PREPARED); until then any
            # failure aborts the version on every rank and none commits it.
            pub.wait(
                rnd.all_prepared,
                timeout,
                f"ranks {describe_ranks(set(ranks) - set(rnd.prepared))} to prepare {version!r}",
            )
            pub.commit_going_out(rnd)
            pub.broadcast(idents, m.Commit(version=version))
            pub.wait(
                rnd.all_committed,
                timeout,
                f"ranks {describe_ranks(set(ranks) - set(rnd.committed))} to commit {version!r}",
            )
            ok = True
        except BaseException as exc:
            # a timeout: the ranks that did not answer in time are lost
            commit_sent = pub.round_failed(rnd, timeout if isinstance(exc, PeerTimeout) else None)
            if not commit_sent:  # after COMMIT the decision stands: ranks commit what they hold
                reason = f"{type(exc).__name__}: {exc}"
                if len(reason) > _ABORT_REASON_CHARS:  # every rank repeats it in its own answer
                    reason = reason[: _ABORT_REASON_CHARS - 1] + "…"
                pub.broadcast(idents, m.Abort(version=version, reason=reason))
            try:  # bounded: ranks answer an ABORT (or COMMIT) with how it ended for them
                pub.wait_quiet(rnd.all_settled, min(timeout, _OUTCOME_WAIT_S))
            finally:
                seconds = time.perf_counter() - start
                report = pub.read_round(rnd, lambda r: _report(r, total, len(manifest), len(plan), seconds, carriers, self._ring.waited))
            self._ended(report, exc)
            if isinstance(exc, WeightstreamError):
                exc.report = report
                raise
            if isinstance(exc, Exception):  # e.g. the trainer's lazy generator raised: typed, with the report
                aborted = VersionAborted(
                    f"push of {version!r} aborted on every rank: the trainer side raised {type(exc).__name__}: {exc}"
                )
                aborted.report = report
                raise aborted from exc
            raise
        finally:
            pub.close_round(rnd)
            for lane, _ in lanes:  # a failed push's transport state (a c10d group) goes with it
                try:
                    lane.exported.end_push(ok)
                except Exception as exc:  # the push's outcome stands; the next push starts afresh
                    log.warning("transport %s: ending the push of %s: %s: %s", lane.transport.name, version,
                                type(exc).__name__, exc)
                    if ok:
                        lane.exported.end_push(False)
        seconds = time.perf_counter() - start
        self.committed_version = version
        report = pub.read_round(rnd, lambda r: _report(r, total, len(manifest), len(plan), seconds, carriers, self._ring.waited))
        self._ended(report, None)
        return report

    def _ended(self, report: PushReport, exc: BaseException | None) -> None:
        """A push ended: its log line and its metrics."""
        ranks = report.receivers.values()
        outcome = "committed"
        if exc is not None:  # refused by a manifest check before any byte was written, or failed
            ended = {r.outcome for r in ranks}
            outcome = "rejected" if "rejected" in ended and not ended & {"failed", "lost"} else "failed"
        reason = None if exc is None else type(exc).__name__
        log_version(
            log, side="sender", version=report.version, outcome=outcome, bytes=report.bytes, tensors=report.tensors,
            buckets=report.buckets, ranks=len(report.receivers), seconds=report.seconds,
            prepare_s=report.prepare_seconds, change_s=report.change_seconds, slot_wait_s=report.slot_wait_seconds,
            reason=reason,
            outcomes=None if exc is None else ",".join(f"{r.rank}:{r.outcome}" for r in ranks),
            error=None if exc is None else str(exc)[:300],
        )
        metrics = self._metrics
        if metrics is not None:
            metrics.push(outcome, report.seconds, 0 if outcome == "rejected" else report.bytes)
            metrics.version_ended("sender", outcome, reason)
            metrics.slot_waited(report.slot_wait_seconds)
            for r in ranks:
                metrics.rank_timings("sender", r.rank, r.prepare_seconds, r.change_seconds)

    def _stream(
        self,
        manifest: Manifest,
        layout: _Layout,
        rnd: Round,
        lanes: list[tuple[Lane, dict[int, bytes]]],
        timeout: float,
        before_first_publish: Any,
        source: Iterator[tuple[str, Any]] | None = None,
    ) -> None:
        """Every bucket through its slot's writer (a slot of each lane's transport). A plain
        bucket is written, then published; a streamed one (every rank said at READY it copies
        each tensor out itself) is published first and written while the ranks copy it out right
        behind."""
        plan = layout.plan
        if not plan:
            if source is not None and next(source, None) is not None:
                raise WeightstreamError("specs= is empty but tensors came; yield exactly the specs' tensors")
            before_first_publish()
            return
        stream = None
        if len(lanes) == 1 and self._streams_offered(lanes[0][0]):
            before_first_publish()  # READY says whether every rank takes this push streamed
            self._streamed_last = all(rank in rnd.streamed for rank in rnd.ranks)
            if self._streamed_last:
                stream = StreamSpec(sorted(rnd.ranks), rnd.check, timeout)
        cache = PieceCache(manifest, source)
        for bucket in plan:
            slot_index = self._ring.acquire(timeout, rnd.check)
            slots = [lane.exported.slots[slot_index] for lane, _ in lanes]
            writers = [slot.writer(bucket, layout.writers, stream) for slot in slots]  # type: ignore[arg-type]
            writer = writers[0] if len(writers) == 1 else FanOut(writers)
            if writer.streamed:
                self._publish(bucket, slot_index, rnd, lanes, None, True, [[]] * len(lanes))
            try:
                with gc_paused():
                    fill(bucket, writer, cache)
                sent = writer.finish(bucket.used)
                frames = writer.frames if isinstance(writer, FanOut) else [sent]
                cache.check_end(bucket.seq == len(plan) - 1)
            except BaseException:
                writer.abort()
                raise
            if not writer.streamed:
                digest = slots[0].digest(bucket.used) if self.checksum else None
                if bucket.seq == 0:
                    before_first_publish()
                self._publish(bucket, slot_index, rnd, lanes, digest, None, frames)

    def _streams_offered(self, lane: Lane | None = None) -> bool:
        """Can this push's buckets be streamed? Never with checksums (a digest needs the whole
        bucket), and only through one lane whose slots can."""
        lane = lane or self._lanes.single()
        return not self.checksum and lane is not None and all(slot.can_stream for slot in lane.exported.slots)

    def _hot_bytes(self) -> int:
        """The cap on a plain bucket's bytes that lets ranks read it from the cache (the slots'
        ``hot_bytes``; 0 with several lanes, whose slots differ). Only while the sender and every
        rank can run at once: with more processes than cores, a rank is off its core when its bucket
        is written, and the small buckets' lock-step costs more than the cache saves (2 ranks on 2
        cores, 1 GiB to views: 245 ms capped against 222 ms uncapped)."""
        lane = self._lanes.single()
        if lane is None or self.receivers + 1 > usable_cores():
            return 0
        return min((slot.hot_bytes for slot in lane.exported.slots), default=0)

    def _streams_expected(self) -> bool:
        """Will this push's buckets likely be streamed? The plan is fixed before the ranks say
        (BEGIN carries the bucket count), so the last push's answer stands in for theirs."""
        return self._streams_offered() and self._streamed_last is not False

    def _publish(
        self, bucket: Any, slot_index: int, rnd: Round, lanes: list[tuple[Lane, dict[int, bytes]]],
        digest: int | None, ring: bool | None, frames: list[list[Any]],
    ) -> None:
        """BUCKET to every rank; ``frames[i]``: the data frames lane ``i``'s ranks get after it."""
        pub = self._publisher
        pub.expect_acks(rnd, bucket.seq, slot_index)
        # whole tensors packed from 0: the ranks derive the arrays from the manifest (protocol v5)
        offsets, nbytes, chunks = (b"", b"", b"") if bucket.whole else bucket.packed()
        for (_, share), data in zip(lanes, frames, strict=True):
            pub.broadcast(list(share.values()), m.Bucket(
                version=rnd.version,
                seq=bucket.seq,
                slot=slot_index,
                first=bucket.tensors[0],
                offsets=offsets,
                nbytes=nbytes,
                chunks=chunks,
                checksum=digest,
                ring=ring,
                count=len(bucket.tensors) if bucket.whole else None,
                frames=len(data) or None,
            ), data)


def _report(
    rnd: Round, total: int, tensors: int, buckets: int, seconds: float, carriers: dict[int, str], slot_wait: float,
) -> PushReport:
    """Every rank's outcome of a round; the caller holds the publisher's lock."""
    results: dict[int, ReceiverResult] = {}
    for rank in sorted(rnd.ranks):
        done = rnd.committed.get(rank)
        prep = rnd.prepared.get(rank)
        if done is not None:
            results[rank] = ReceiverResult(rank, done.tensors, done.bytes, done.seconds, change_seconds=done.changing)
            continue
        applied = (prep.tensors, prep.bytes, prep.seconds) if prep is not None else (0, 0, 0.0)
        # a rank that prepared in place holds the uncommitted version in its served model
        intact: bool | None = None if prep is None else not prep.in_place
        if rank in rnd.rejected:
            error, reason, model_intact = rnd.rejected[rank]
            results[rank] = ReceiverResult(rank, 0, 0, 0.0, "rejected", f"{error}: {reason}", model_intact)
        elif rank in rnd.failed:
            error, message, model_intact = rnd.failed[rank]
            outcome = "failed" if rank in rnd.causes else "aborted"
            text = message if message.startswith(f"{error}:") else f"{error}: {message}"
            results[rank] = ReceiverResult(rank, *applied, outcome, text, model_intact)
        elif rank in rnd.lost:
            results[rank] = ReceiverResult(rank, *applied, "lost", rnd.lost[rank], intact)
        else:
            results[rank] = ReceiverResult(rank, *applied, "aborted", None, intact)
    results = {
        rank: replace(
            r, transport=carriers.get(rank), prepare_seconds=rnd.prepared[rank].seconds if rank in rnd.prepared else None,
        )
        for rank, r in results.items()
    }
    ok = bool(results) and all(r.outcome == "committed" for r in results.values())
    return PushReport(rnd.version, total, tensors, buckets, seconds, results, ok, slot_wait)


def _rejection(version: str, rnd: Round) -> WeightstreamError:
    parts = [f"rank {rank}: {reason}" for rank, (_, reason, _intact) in sorted(rnd.rejected.items())]
    text = f"version {version!r} rejected before any byte was written; " + " | ".join(parts)
    first = min(rnd.rejected)  # typed by the lowest rank's error (ManifestMismatch, VersionAborted, ...)
    err = from_wire(rnd.rejected[first][0], text, rank=None)
    err.rank = first
    return err
