"""``SnapshotWriter``: a sink that saves each committed version as chunked safetensors parts.

Used beside the model's own sink through :class:`Tee`. Tensors are copied into the
current part as they arrive (views die when the iterator advances); a full part is
written by a background thread to a private temp directory while the next one fills,
so memory stays at about two parts and the apply thread never waits on the disk unless
the disk is slower than the stream. Nothing becomes visible until :meth:`commit`:
parts are renamed into place, last part last (it carries the part count), then
``version.yaml`` is replaced. A crash leaves either a temp directory (ignored by the
loader, removed by the next writer) or parts without the last one (refused by the
loader as incomplete), never a half snapshot that looks whole.

After each commit the writer prunes its own rank's older versions beyond the newest
``keep`` (rules and atomicity: :mod:`.snapshot_store`); a prune failure is logged, never
raised. Each part records xxh3 digests of its data for ``weightstream snapshot verify`` and
``daemon.restore``.

Weights are as private as the rank's endpoints: a directory the writer creates is 0700, and
every part (temp or final) is 0600, like ``version.yaml``. An existing directory is left as
it is, with a warning (once per process) when other users can enter it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..frameworks import Framework, dtype_of, host_bytes, to_host
from ..protocol.dtypes import DType
from ..protocol.errors import ConfigError, VersionAborted, WeightstreamError
from ..versions import write_version
from .sinks.base import name_groups_of
from .snapshot_format import (
    DIGEST_BLOCK,
    FORMAT_TAG,
    META_DIGEST,
    META_DIGEST_BLOCK,
    META_FORMAT,
    META_PART,
    META_PARTS,
    BlockHasher,
    build_header,
    digest_meta_bytes,
    entry_header_bytes,
    part_name,
    part_regex,
    version_text_problem,
)
from .snapshot_store import check_keep, execute_prune, list_snapshots, plan_prune

log = logging.getLogger("weightstream.snapshot")

TEMP_PREFIX = ".snapshot-tmp-"
_HEADER_SLACK = 256  # __metadata__, braces and padding
DEFAULT_KEEP = 3  # the version being served, the one before, and one more to roll back to


class _Part:
    def __init__(self) -> None:
        # (name, dtype, shape, private copy of the bytes)
        self.items: list[tuple[str, DType, tuple[int, ...], np.ndarray]] = []
        self.data_bytes = 0
        self.header_bytes = _HEADER_SLACK

    def size_with(self, extra_data: int, extra_header: int) -> int:
        data = self.data_bytes + extra_data
        return 8 + self.header_bytes + extra_header + digest_meta_bytes(data) + data


class SnapshotWriter:
    """Sink that writes a version as ``model_state.tp{rank}.{version}.part{N}.safetensors``.

    Each part file is at most ``max_part_bytes`` (header included), except that a single
    tensor bigger than that gets a part of its own (a tensor is never split across files).
    Call :meth:`begin` (``Tee.load_weights`` does) before a version, :meth:`commit` once the
    version is committed and :meth:`abort` when it failed; ``load_one`` without ``begin``
    opens a version implicitly. Accepts NumPy, torch and paddle tensors (GPU ones are
    copied to the host first).

    ``keep``: after each commit, delete this rank's versions older than the newest ``keep``
    (never the one ``version.yaml`` names, never another rank's files, never a writer's
    temp dir; rules in :mod:`.snapshot_store`). ``None`` keeps every version.
    """

    framework: Framework = "numpy"

    def __init__(
        self, directory: str | Path, rank: int, max_part_bytes: int = 1 << 30, keep: int | None = DEFAULT_KEEP
    ) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"SnapshotWriter: rank must be an int >= 0, got {rank!r}; fix: the daemon's rank")
        if max_part_bytes < 4096:
            raise ConfigError(f"SnapshotWriter: max_part_bytes must be >= 4096, got {max_part_bytes}; fix: e.g. 1 << 30")
        self.keep = None if keep is None else check_keep(keep, "SnapshotWriter")
        self.directory = Path(directory)
        self.rank = rank
        self.max_part_bytes = max_part_bytes
        _private_directory(self.directory)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"weightstream-snapshot{rank}")
        self._tmp: Path | None = None  # temp dir of the open version
        self._part = _Part()
        self._written = 0  # parts handed to the background writer
        self._pending: Future[None] | None = None
        self._aborted = False
        self._error: BaseException | None = None  # a disk error: the version is dropped, commit raises it
        self._remove_stale_temp_dirs()

    # --- sink protocol ------------------------------------------------------------------

    def param_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {}  # accepts any tensor; the model's sink does the checking

    def destination(self, name: str) -> None:
        return None  # chunked tensors must reach load_one, never be written in place

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        self.begin()
        for name, tensor in weights:
            self.load_one(name, tensor)

    def load_one(self, name: str, tensor: Any) -> None:
        """Copy one tensor into the open version. A disk error never fails the caller (the
        live update must not depend on the snapshot disk): it drops the version and
        :meth:`commit` raises it."""
        if self._error is not None:
            return
        dtype = dtype_of(tensor)
        shape = tuple(int(d) for d in tensor.shape)
        data = np.array(host_bytes(to_host(tensor)), copy=True)  # own memory: the view dies next step
        with self._lock:
            if self._aborted:
                raise VersionAborted(
                    f"snapshot writer of rank {self.rank}: the version was aborted while tensor {name!r} was arriving; "
                    "call begin() before the next version"
                )
            tmp = self._tmp if self._tmp is not None else self._open()
            part = self._part
            extra_header = entry_header_bytes(name, dtype, shape, part.data_bytes)
            if part.items and part.size_with(data.nbytes, extra_header) > self.max_part_bytes:
                try:
                    self._flush(tmp, last=False)
                except Exception as exc:  # e.g. ENOSPC from the background write
                    log.error("snapshot: rank %d could not write a part (%s); this version will not be saved", self.rank, exc)
                    self._discard()
                    self._error = exc
                    return
                part = self._part
                extra_header = entry_header_bytes(name, dtype, shape, 0)
            if part.size_with(data.nbytes, extra_header) > self.max_part_bytes:
                log.warning(
                    "snapshot: tensor %r (%d bytes) exceeds max_part_bytes=%d; it gets a part of its own",
                    name, data.nbytes, self.max_part_bytes,
                )
            part.items.append((name, dtype, shape, data))
            part.data_bytes += data.nbytes
            part.header_bytes += extra_header

    # --- version lifecycle ---------------------------------------------------------------

    def begin(self) -> None:
        """Start a version, discarding anything not committed (a version that never finished)."""
        with self._lock:
            if self._tmp is not None:
                log.warning("snapshot: discarding an uncommitted version of rank %d (no commit/abort came)", self.rank)
            self._discard()
            self._aborted = False
            self._error = None

    def commit(self, version: str) -> list[Path]:
        """Finish the open version: write the last part, rename every part into place, then
        ``version.yaml``. Blocks on disk I/O: call it off the event loop. Returns the part paths.

        A version not usable in a file name raises before anything becomes visible, and what
        was copied of it is dropped (see :meth:`check_version`)."""
        version = str(version)
        try:
            self.check_version(version)
        except WeightstreamError:
            with self._lock:
                self._discard()
            raise
        with self._lock:
            error, self._error = self._error, None
            if error is not None:
                raise WeightstreamError(
                    f"snapshot of version {version!r} (rank {self.rank}) was not written: {error}; "
                    f"fix: free space / check permissions of {self.directory}"
                ) from error
            tmp = self._tmp
            if self._aborted or tmp is None:
                raise WeightstreamError(
                    f"snapshot writer of rank {self.rank}: expected an open version to commit as {version!r}, got "
                    f"{'an aborted one' if self._aborted else 'none'}; fix: commit once per version, after load_weights"
                )
            try:
                self._flush(tmp, last=True)
                self._wait_pending()
                count = self._written
                targets = [self.directory / part_name(self.rank, version, i) for i in range(count)]
                # Last part last: it carries the part count, so a half-renamed set is refused as incomplete.
                for i, target in enumerate(targets):
                    os.replace(tmp / f"part{i}.safetensors", target)
                self._remove_extra_parts(version, count)
                _fsync_dir(self.directory)
                write_version(self.directory, version)  # last: only now does the snapshot exist
            except OSError as exc:
                self._discard()
                raise WeightstreamError(
                    f"snapshot of version {version!r} (rank {self.rank}) was not written: {exc}; "
                    f"fix: free space / check permissions of {self.directory}"
                ) from exc
            except BaseException:
                self._discard()
                raise
            self._discard()
        log.info("snapshot: rank %d committed version %s in %d part(s) under %s", self.rank, version, count, self.directory)
        if self.keep is not None:
            self._prune(version)
        return targets

    def check_version(self, version: str) -> None:
        """Raise WeightstreamError unless ``version`` can name this writer's files.

        Versions are part of the file names (``model_state.tp{rank}.{version}.part{N}.safetensors``),
        so ``/``, ``\\``, NUL, ``.`` and ``..`` cannot be snapshotted. :meth:`commit` checks
        it; a host that knows the version before streaming it (a daemon at BEGIN) can call this
        first to refuse such a version before anything is written."""
        problem = version_text_problem(str(version))
        if problem is None:
            return
        raise WeightstreamError(
            f"snapshot writer of rank {self.rank}: version {version!r} cannot be snapshotted: {problem}, and a "
            f"version is part of its snapshot's file names (model_state.tp{self.rank}.<version>.part<N>.safetensors "
            f"in {self.directory}); no snapshot of it is written (the model itself is not affected); fix: give "
            "versions usable in a file name: no '/', '\\' or NUL, not '.' or '..' (the rule of "
            f"weightstream.receiver.snapshot_format.check_version_text), e.g. {_safe_example(str(version))!r}"
        )

    def on_commit(self, version: str) -> None:
        """Daemon hook: a version committed, so publish its snapshot."""
        self.commit(version)

    def on_abort(self) -> None:
        """Daemon hook: the version failed, so drop what was written of it."""
        self.abort()

    def abort(self) -> None:
        """Drop the open version: no file of it becomes visible. Safe from any thread, any time;
        a ``load_one`` still running for it raises VersionAborted until :meth:`begin`."""
        with self._lock:
            self._discard()
            self._aborted = True
            self._error = None

    def close(self) -> None:
        self.abort()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _open(self) -> Path:
        tmp = self.directory / f"{TEMP_PREFIX}tp{self.rank}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        self._tmp = tmp
        self._part = _Part()
        self._written = 0
        return tmp

    def _flush(self, tmp: Path, *, last: bool) -> None:
        """Hand the current part to the background writer (waits for the previous one: 2 parts max)."""
        part = self._part
        index = self._written
        meta = {META_FORMAT: FORMAT_TAG, META_PART: str(index)}
        if last:
            meta[META_PARTS] = str(index + 1)
        self._wait_pending()
        self._pending = self._pool.submit(_write_part, tmp / f"part{index}.safetensors", part, meta)
        self._written += 1
        self._part = _Part()

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises a disk error (e.g. ENOSPC) in the apply thread

    def _discard(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:  # the version is being dropped anyway
                log.debug("snapshot: discarded part failed to write: %s", exc)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._part = _Part()
        self._written = 0

    def _remove_extra_parts(self, version: str, count: int) -> None:
        """Parts of an earlier attempt at the same version beyond this one's count."""
        pattern = part_regex(self.rank, version)
        for path in self.directory.iterdir():
            found = pattern.fullmatch(path.name)
            if found and (not (found.group(1).isascii() and found.group(1).isdigit()) or int(found.group(1)) >= count):
                path.unlink(missing_ok=True)

    def _prune(self, committed: str) -> None:
        """Delete this rank's versions beyond the newest ``keep``; never fails the commit."""
        keep = self.keep
        if keep is None:
            return
        try:
            snaps = list_snapshots(self.directory, self.rank)
            plan = plan_prune(snaps, keep, rank=self.rank, protect=(committed,))
            result = execute_prune(plan)  # logs each file it could not delete, with why
        except Exception as exc:
            log.warning("snapshot: rank %d could not prune %s after committing %s: %s", self.rank, self.directory, committed, exc)
            return
        if result.versions:
            log.info(
                "snapshot: rank %d pruned version(s) %s (keep=%d) under %s",
                self.rank, ", ".join(s.version for s in result.versions), keep, self.directory,
            )

    def _remove_stale_temp_dirs(self) -> None:
        """Temp dirs of this rank left by a crashed writer (another pid): never complete, never needed."""
        for path in self.directory.glob(f"{TEMP_PREFIX}tp{self.rank}-*"):
            pid = path.name.split("-")[-2]
            if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _write_part(path: Path, part: _Part, meta: dict[str, str]) -> None:
    # Widest dtype first so every tensor lands aligned to its itemsize (the data start is 8-aligned).
    items = sorted(part.items, key=lambda it: -it[1].itemsize)
    hasher = BlockHasher(DIGEST_BLOCK)
    for *_, data in items:
        hasher.update(data.data)
    meta = {**meta, META_DIGEST: ",".join(hasher.finish()), META_DIGEST_BLOCK: str(DIGEST_BLOCK)}
    header = build_header([(n, d, s, a.nbytes) for n, d, s, a in items], meta)
    # 0600 like version.yaml: weights are as private as the rank's endpoints
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(header)
        # NumPy's stubs type ndarray.__buffer__ on 3.12+ only (mypy checks as 3.10)
        f.writelines(memoryview(data) for *_, data in items)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    part.items.clear()  # free the part as soon as it is on disk


def _safe_example(version: str) -> str:
    """A file-name-safe spelling of ``version`` to suggest."""
    fixed = version.replace("/", "_").replace("\\", "_").replace("\0", "")
    return fixed if version_text_problem(fixed) is None else "step_1234"


_warned_shared: set[Path] = set()  # directories already warned about, once per process


def _private_directory(directory: Path) -> None:
    """Create ``directory`` 0700 (whatever the umask); an existing one is left as it is, with a
    warning, once per process, when other users can enter or read it."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
        return
    try:
        st = os.stat(directory)
    except OSError:
        return  # not there any more, or unreadable: the first write names the problem
    if not stat.S_ISDIR(st.st_mode):
        return  # a file: the first write names the problem
    mode = stat.S_IMODE(st.st_mode)
    resolved = directory.resolve()
    if mode & 0o077 and resolved not in _warned_shared:
        _warned_shared.add(resolved)
        log.warning(
            "snapshot: directory %s is mode %o: other users can list the versions it holds (and read any snapshot "
            "file written before SnapshotWriter made them 0600); weights are as private as the rank's endpoints; "
            "fix: chmod 700 %s",
            directory, mode, directory,
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Tee:
    """One stream of tensors to several sinks: ``Tee(model_sink, SnapshotWriter(...))``.

    ``param_specs`` and ``framework`` come from the first sink (the model), so the daemon
    checks manifests against the model and hands out its framework's views; every tensor
    goes to each sink's ``load_one`` in turn while its view is valid. ``destination`` is
    always None: an in-place chunk write would bypass the other sinks.
    """

    def __init__(self, *sinks: Any) -> None:
        from .sinks import as_sink

        if not sinks:
            raise ConfigError("Tee: expected at least one sink, got none; fix: Tee(model_sink, writer)")
        self.sinks = [as_sink(s) if not isinstance(s, SnapshotWriter) else s for s in sinks]
        for sink in self.sinks:
            if not callable(getattr(sink, "load_one", None)):
                raise ConfigError(
                    f"Tee: expected sinks with load_one(name, tensor), got {type(sink).__qualname__} without it; "
                    "fix: add load_one so the tee can stream"
                )
        self.framework: Framework = self.sinks[0].framework
        self._restoring = False

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """While ``daemon.restore`` streams a snapshot, its writers are skipped: they would
        copy aside, and write again, what is being read back from disk."""
        self._restoring = True
        try:
            yield
        finally:
            self._restoring = False

    def param_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return dict(self.sinks[0].param_specs())

    def destination(self, name: str) -> None:
        return None

    def name_groups(self) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
        """The model's (first sink's) tied, optional and unmaterialised names: a tee checks a
        manifest exactly as its model would."""
        return name_groups_of(self.sinks[0])

    def unmaterialised(self) -> list[str]:
        check = getattr(self.sinks[0], "unmaterialised", None)
        return list(check()) if callable(check) else []

    def _active(self) -> list[Any]:
        return [s for s in self.sinks if not isinstance(s, SnapshotWriter)] if self._restoring else self.sinks

    def load_one(self, name: str, tensor: Any) -> None:
        for sink in self._active():
            sink.load_one(name, tensor)

    def check_version(self, version: str) -> None:
        """Each sink's ``check_version(version)``, where it has one (a SnapshotWriter refuses a
        version it could not name): for a host that can refuse a version before streaming it."""
        for sink in self.sinks:
            check = getattr(sink, "check_version", None)
            if callable(check):
                check(version)

    def on_commit(self, version: str) -> None:
        """Called by the daemon (on its apply thread) once ``version`` committed. Every sink's
        hook runs even when one fails; then the failure is raised (several: one error naming all)."""
        self._each("on_commit", version)

    def on_abort(self) -> None:
        """Called by the daemon when a version failed or was aborted (every sink's hook, as on_commit)."""
        self._each("on_abort")

    def _each(self, name: str, *args: Any) -> None:
        errors: list[Exception] = []
        for sink in self.sinks:
            hook = getattr(sink, name, None)
            if not callable(hook):
                continue
            try:
                hook(*args)
            except Exception as exc:  # the other sinks' hooks still run
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise WeightstreamError(
                f"Tee: {len(errors)} sink {name} hooks failed: " + "; ".join(f"{type(e).__name__}: {e}" for e in errors)
            ) from errors[0]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        sinks = self._active()
        for sink in sinks:
            begin = getattr(sink, "begin", None)
            if callable(begin):
                begin()
        for name, tensor in weights:
            for sink in sinks:
                sink.load_one(name, tensor)
