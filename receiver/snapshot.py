"""Snapshots for elastic recovery and bootstrap: write committed versions, restore them.

- :class:`SnapshotWriter` / :class:`Tee` (``snapshot_writer``): save each committed version
  as chunked safetensors parts beside the live model.
- :func:`load_snapshot` (``snapshot_loader``): find and stream a rank's snapshot.
- :func:`restore_into`: ``ReceiverDaemon.restore`` — apply a snapshot through the same
  PrefetchQueue + VersionRun iterator + load_weights as a live update, no sender needed.
- :func:`check_version_order` (from ``weightstream.versions``): the one rule that refuses
  going back in time, with :func:`version_key` / :func:`compare_versions`, the order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..frameworks import is_model, unmaterialised, view_as
from ..protocol import messages as m
from ..protocol.dtypes import from_numpy
from ..protocol.errors import VersionAborted, WeightstreamError
from ..versions import check_version_order, compare_versions, version_key
from .manifest import check_manifest
from .prefetch import PrefetchQueue
from .snapshot_loader import MappedPart, SnapshotSource, load_snapshot
from .snapshot_writer import SnapshotWriter, Tee
from .version_run import PreparedBucket, VersionRun

__all__ = [
    "SnapshotSource",
    "SnapshotWriter",
    "Tee",
    "check_version_order",
    "compare_versions",
    "load_snapshot",
    "restore_into",
    "verify_materialised",
    "version_key",
]

log = logging.getLogger("weightstream.snapshot")


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
    daemon: Any,
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
                part = source.open_part(seq)
                part.prefetch()
                live[seq] = part
                await queue.put(_bucket(seq, part, daemon.framework))
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

    thread = threading.Thread(target=reader, name=f"weightstream-snapshot-read{daemon.rank}", daemon=True)
    thread.start()

    run.started = time.perf_counter()
    try:
        daemon._load(run.iterate())
        if not run.complete:
            raise VersionAborted(
                f"load_weights returned after applying {run.applied} of {run.total_tensors} tensors of snapshot "
                f"{run.version!r}; it must consume the whole iterator"
            )
    finally:
        loop.call_soon_threadsafe(task.cancel)
        timeout = float(getattr(daemon, "_apply_timeout", 300.0))
        thread.join(timeout)  # the reader stops at its next await; only a hung disk read keeps it
        if thread.is_alive():
            log.error("rank %d: snapshot reader still blocked %.0fs after cancel (hung disk read?)", daemon.rank, timeout)
        for part in live.values():
            part.release()


def restore_into(
    daemon: Any, directory: str | Path, version: str | None = None, *, fallback_dir: str | Path | None = None, force: bool = False
) -> str:
    """``ReceiverDaemon.restore``: apply a snapshot without a sender; return its version.

    Blocks the calling thread (never call it on the daemon's event loop). While the daemon
    serves, the whole restore (finding the snapshot included) runs on its apply thread, so
    it never overlaps a live version and sees every snapshot a committed version wrote.
    """
    executor = getattr(daemon, "_executor", None)
    if getattr(daemon, "_serving", False) and executor is not None:
        return executor.submit(_restore, daemon, directory, version, fallback_dir, force).result()  # type: ignore[no-any-return]
    return _restore(daemon, directory, version, fallback_dir, force)


def _restore(
    daemon: Any, directory: str | Path, version: str | None, fallback_dir: str | Path | None, force: bool
) -> str:
    source = load_snapshot(directory, daemon.rank, version, fallback_dir=fallback_dir)
    version = source.version
    begin = _begin(source)
    sink = daemon._sink
    expected = getattr(daemon, "_expected", None)
    if expected is None and sink is not None:
        expected = sink.param_specs()
    if expected:
        check_manifest(begin.names, begin.dtypes, begin.shapes(), expected, allow_missing=bool(getattr(daemon, "_allow_missing", False)))
    models = _models_of(sink) if sink is not None else []
    with daemon._cond:
        if daemon._state == "receiving":
            raise WeightstreamError(
                f"restore: expected an idle daemon, got one receiving a version (rank {daemon.rank}); "
                "fix: wait_for_version() first, or restore before start()"
            )
        check_version_order(version, daemon._committed, force=force, fix="restore with force=True")
        before = daemon._state
        if before != "stopped":
            daemon._state = "receiving"

    def work() -> int:
        loop = asyncio.new_event_loop()
        queue = PrefetchQueue(daemon.prefetch, loop)
        live: dict[int, MappedPart] = {}  # parts mapped and not yet consumed

        def on_ack(seq: int, slot: int) -> None:  # the consumer moved past part seq: drop its pages
            part = live.pop(seq, None)
            if part is not None:
                part.release()

        run = VersionRun(
            begin,
            framework=daemon.framework,
            queue=queue,
            timeout=float(getattr(daemon, "_apply_timeout", 300.0)),
            on_ack=on_ack,
            destination=None,  # whole tensors only: no chunk is ever written in place
        )
        try:
            _stream(daemon, source, run, queue, loop, live)
            if models:
                verify_materialised(sink)
        except BaseException as exc:
            with daemon._cond:
                if hasattr(daemon, "_last_error"):
                    daemon._last_error = f"{type(exc).__name__}: {exc}"
                if run.touched:
                    daemon._model_intact = False
                if before != "stopped":
                    daemon._state = "idle" if daemon._model_intact else "aborted"
                daemon._cond.notify_all()
            raise
        with daemon._cond:
            daemon._committed = version
            daemon._model_intact = True
            if before != "stopped" and getattr(daemon, "_run", None) is None:
                daemon._state = "idle"
            daemon._cond.notify_all()
        return run.applied

    started = time.perf_counter()
    applied = work()
    log.info(
        "rank %d: restored version %s from %s (%d tensors, %d part(s), %.3fs)",
        daemon.rank, version, source.paths[0].parent, applied, len(source), time.perf_counter() - started,
    )
    return version
