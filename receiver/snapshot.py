"""Snapshots for elastic recovery and bootstrap: write committed versions, restore them.

- :class:`SnapshotWriter` / :class:`Tee` (``snapshot_writer``): save each committed version
  as chunked safetensors parts beside the live model.
- :func:`load_snapshot` (``snapshot_loader``): find and stream a rank's snapshot.
- :func:`restore_into`: ``ReceiverDaemon.restore`` — apply a snapshot through the same
  PrefetchQueue + VersionRun iterator + load_weights as a live update, no sender needed.
- :func:`version_key` / :func:`compare_versions`: the version ordering used to refuse
  going back in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from ..frameworks import is_model, unmaterialised, view_as
from ..protocol import messages as m
from ..protocol.dtypes import from_numpy
from ..protocol.errors import VersionAborted, WeightstreamError
from ..versions import check_version_order, compare_versions, version_key
from .appliers import PreparedBucket
from .consumer import Consumer
from .manifest import check_manifest
from .prefetch import PrefetchQueue
from .snapshot_loader import MappedPart, SnapshotSource, load_snapshot
from .snapshot_writer import SnapshotWriter, Tee
from .state import RankState
from .version_run import VersionRun

__all__ = [
    "Progress",
    "SnapshotSource",
    "SnapshotWriter",
    "Tee",
    "check_version_order",
    "compare_versions",
    "load_snapshot",
    "restore_into",
    "restore_rank",
    "verify_materialised",
    "version_key",
]

log = logging.getLogger("weightstream.snapshot")

#: ``progress(bytes_done, bytes_total)``: tensor bytes of the snapshot applied so far
Progress = Callable[[int, int], None]


# --- bootstrap verification ---------------------------------------------------------------


def _models_of(target: Any) -> list[Any]:
    """The torch modules / paddle layers behind a sink (routers and tees included)."""
    found: list[Any] = []
    if is_model(target):
        return [target]
    for attr in ("module", "layer"):  # TorchModuleSink / PaddleLayerSink
        inner = getattr(target, attr, None)
        if inner is not None:
            found.extend(_models_of(inner))
    for child in [*getattr(target, "sinks", []), *getattr(target, "routes", {}).values(), getattr(target, "default", None)]:
        if child is not None and child is not target:
            found.extend(_models_of(child))
    return found


def verify_materialised(model: Any) -> None:
    """Raise WeightstreamError naming every parameter/buffer that still has no data.

    ``model``: a torch module (meta tensors), a paddle layer (``_is_initialized()`` False,
    e.g. built under ``paddle.LazyGuard()``), or a sink/router/tee around them.
    """
    missing: list[str] = []
    for mod in _models_of(model):
        missing += unmaterialised(mod)
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise WeightstreamError(
            f"model: expected every parameter and buffer to hold data, got {len(missing)} still unmaterialised: {shown}; "
            "fix: load a snapshot/version that contains them, or initialise them before serving"
        )


# --- restore ------------------------------------------------------------------------------


class _PartSlot:
    """The ImportedSlot face of a mapped part: all VersionRun.iterate needs of it."""

    domain = "host"
    streams = False  # its buckets carry views only, never a direct copy

    def __init__(self, part: MappedPart) -> None:
        self.part = part

    def sync(self) -> None:
        pass  # host memory: the sink's copies are complete when load_one returns

    def close(self) -> None:
        self.part.release()


def _bucket(seq: int, part: MappedPart, framework: str) -> PreparedBucket:
    if framework == "numpy":
        entries = [(name, arr, -1) for name, arr in part.tensors]
    else:
        entries = [
            (name, view_as(framework, raw, from_numpy(arr.dtype), tuple(arr.shape)), -1)  # type: ignore[arg-type]
            for (name, arr), raw in zip(part.tensors, part.raw)
        ]
    return PreparedBucket(seq, 0, _PartSlot(part), None, 0, entries)  # type: ignore[arg-type]


def _begin(source: SnapshotSource) -> m.Begin:
    specs = source.specs
    names = [n for n, _, _ in specs]
    seen: set[str] = set()
    for dup in names:
        if dup not in seen:
            seen.add(dup)
            continue
        raise WeightstreamError(
            f"snapshot {source.paths[0].parent}: tensor {dup!r} appears in more than one part of version "
            f"{source.version!r}; expected each name once; fix: re-write the snapshot"
        )
    return m.Begin.build(
        version=source.version,
        names=names,
        dtypes=[d.code for _, d, _ in specs],
        shapes=[tuple(s) for _, _, s in specs],
        total_bytes=source.total_bytes,
        buckets=len(source),
    )


def _stream(
    consumer: Consumer,
    source: SnapshotSource,
    run: VersionRun,
    queue: PrefetchQueue,
    loop: asyncio.AbstractEventLoop,
    live: dict[int, MappedPart],
) -> None:
    """Run load_weights over the snapshot; parts are mapped by a reader thread at most
    ``prefetch`` ahead through a real PrefetchQueue on the reader's private event loop."""
    async def feed() -> None:
        try:
            for seq in range(len(source)):
                part = source.open_part(seq, check_digests=True)  # before any of its bytes reach the model
                part.prefetch()
                live[seq] = part
                await queue.put(_bucket(seq, part, consumer.framework))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a corrupt/unreadable part: the consumer raises it
            queue.abort(exc if isinstance(exc, WeightstreamError) else WeightstreamError(f"snapshot: {exc}"))
        await asyncio.Event().wait()  # keep the loop for the consumer's releases until cancelled

    task = loop.create_task(feed())

    def reader() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    thread = threading.Thread(target=reader, name=f"weightstream-snapshot-read{consumer.rank}", daemon=True)
    thread.start()

    run.started = time.perf_counter()
    try:
        consumer.load(run.iterate())
        if not run.complete:
            raise VersionAborted(
                f"load_weights returned after applying {run.applied} of {run.total_tensors} tensors of snapshot "
                f"{run.version!r}; it must consume the whole iterator"
            )
    finally:
        loop.call_soon_threadsafe(task.cancel)
        timeout = consumer.apply_timeout
        thread.join(timeout)  # the reader stops at its next await; only a hung disk read keeps it
        if thread.is_alive():
            log.error("rank %d: snapshot reader still blocked %.0fs after cancel (hung disk read?)", consumer.rank, timeout)
        for part in live.values():
            part.release()


def restore_into(
    daemon: Any,
    directory: str | os.PathLike[str],
    version: str | None = None,
    *,
    fallback_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> str:
    """``daemon.restore(...)``: apply a snapshot to a ReceiverDaemon without a sender; return its version.

    ``progress`` is passed on only when given (a daemon's ``restore`` that takes it).
    """
    extra: dict[str, Any] = {} if progress is None else {"progress": progress}
    return str(daemon.restore(directory, version, fallback_dir=fallback_dir, force=force, **extra))


def restore_rank(
    consumer: Consumer,
    state: RankState,
    directory: str | os.PathLike[str],
    version: str | None = None,
    *,
    fallback_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> str:
    """What ``ReceiverDaemon.restore`` does, through the rank's public parts: its consumer
    (load_weights, sink) and its state. Returns the version now committed.

    Blocks the calling thread (never call it on the daemon's event loop). Given the serving
    daemon's apply thread (``executor``), the whole restore (finding the snapshot included)
    runs there, so it never overlaps a live version and sees every snapshot a committed
    version wrote. Every part of the chosen version is opened before the first is read, so a
    concurrent prune cannot break it. Each part's data is checked against its xxh3 digests
    (where it has them) before its tensors reach the model: a mismatch raises
    :class:`~.snapshot_format.CorruptSnapshot` naming the file, byte range and tensors; the
    model is intact when the first part was the bad one (``status.model_intact`` says).
    ``progress(done, total)`` is called with tensor bytes applied: ``(0, total)`` first, then
    after each part, on the thread applying; an error it raises is logged once and the
    callback is dropped (a progress bar never fails a restore).
    """
    if executor is not None:
        return executor.submit(_restore, consumer, state, directory, version, fallback_dir, force, progress).result()
    return _restore(consumer, state, directory, version, fallback_dir, force, progress)


class _Reporter:
    """Calls ``progress`` with cumulative bytes; drops it after its first error."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is None:
            return
        try:
            self.progress(self.done, self.total)
        except Exception as exc:
            log.warning("snapshot: restore progress callback raised %r; no more progress is reported", exc)
            self.progress = None


def _restore(
    consumer: Consumer, state: RankState, directory: str | os.PathLike[str], version: str | None,
    fallback_dir: str | os.PathLike[str] | None, force: bool, progress: Progress | None = None,
) -> str:
    source = load_snapshot(directory, consumer.rank, version, fallback_dir=fallback_dir)
    try:
        return _restore_source(consumer, state, source, force, progress)
    finally:
        source.close()  # parts never mapped (a refused manifest, a failed load)


def _restore_source(
    consumer: Consumer, state: RankState, source: SnapshotSource, force: bool, progress: Progress | None
) -> str:
    begin = _begin(source)
    sink = consumer.sink
    expected, _ = consumer.specs()
    if expected:
        check_manifest(begin.names, begin.dtypes, begin.shapes(), expected, allow_missing=consumer.allow_missing)
    models = _models_of(sink) if sink is not None else []
    local = state.begin_local(source.version, rank=consumer.rank, force=force)

    def work() -> int:
        loop = asyncio.new_event_loop()
        queue = PrefetchQueue(consumer.prefetch, loop)
        live: dict[int, MappedPart] = {}  # parts mapped and not yet consumed
        reporter = _Reporter(progress, source.total_bytes)
        reporter.add(0)

        def on_ack(seq: int, slot: int) -> None:  # the consumer moved past part seq: drop its pages
            part = live.pop(seq, None)
            if part is not None:
                part.release()
            reporter.add(source.part_bytes(seq))

        run = VersionRun(
            begin,
            framework=consumer.framework,
            queue=queue,
            timeout=consumer.apply_timeout,
            on_ack=on_ack,
            destination=None,  # whole tensors only: no chunk is ever written in place
        )
        restoring = getattr(sink, "restoring", None)  # a Tee skips its snapshot writers
        try:
            with restoring() if callable(restoring) else contextlib.nullcontext():
                _stream(consumer, source, run, queue, loop, live)
            if models:
                verify_materialised(sink)
        except BaseException as exc:
            state.fail_local(local, exc, touched=run.touched)
            raise
        state.commit_local(local)
        return run.applied

    started = time.perf_counter()
    applied = work()
    log.info(
        "rank %d: restored version %s from %s (%d tensors, %d part(s), %.3fs)",
        consumer.rank, source.version, source.paths[0].parent, applied, len(source), time.perf_counter() - started,
    )
    return source.version
