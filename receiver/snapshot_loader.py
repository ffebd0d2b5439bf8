"""``load_snapshot``: find a rank's snapshot of a version and stream it part by part.

Search order, in ``directory`` and then in ``fallback_dir``:

a. part files ``model_state.tp{rank}.{version}.part{N}.safetensors`` in ascending numeric N
   (a file whose N is not a number is ignored with a warning naming it);
b. one full file ``model_state.tp{rank}.{version}.safetensors``;
c. the legacy names ``model_state.tp0{version}.safetensors`` / ``.pdparams``.

Every file of the version found is opened before :func:`load_snapshot` returns, and read
through those open files: on Linux an open file outlives its unlink, so a concurrent prune
(``SnapshotWriter(keep=...)``, ``weightstream snapshot prune``) cannot tear a version out
from under a restore that found it whole. A part that vanishes between the directory
listing and its open makes the version refused as incomplete, never loaded torn. One file
descriptor per part is held until that part is mapped (the mapping keeps its own).

A restore (``open_part(i, check_digests=True)``) first reads each part's data through
its file against the xxh3 digests written with it, so a flipped bit is a
:class:`~.snapshot_format.CorruptSnapshot` naming the file, byte range and tensors before
any byte of that part reaches the model (parts without digests load as before).

Parts are memory-mapped privately (copy-on-write), so reading one costs page cache, not
a heap copy; a consumed part's pages are dropped (``MADV_DONTNEED``) so resident memory
stays at about one part. Arrays are NumPy with ml_dtypes for bfloat16/float8.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..frameworks import dtype_of, host_bytes
from ..frameworks import paddle as paddle_fw
from ..protocol.dtypes import DType
from ..protocol.errors import CorruptSnapshot, WeightstreamError
from ..versions import read_version
from .snapshot_format import (
    META_FORMAT,
    BlockHasher,
    Header,
    base_name,
    check_version_text,
    digest_mismatches,
    digests_of,
    full_name,
    legacy_names,
    part_regex,
    parts_problem,
    read_header_from,
    read_range,
)

log = logging.getLogger("weightstream.snapshot")


class MappedPart:
    """One part: ``tensors`` are ``(name, array)`` over a private mapping of the file.

    ``raw`` holds each tensor's flat uint8 bytes (for typed views of other frameworks).
    The arrays stay valid while referenced; :meth:`release` only drops resident pages
    (they read back from the file if touched again).
    """

    def __init__(self, path: Path, header: Header | None, tensors: list[tuple[str, np.ndarray]], raw: list[np.ndarray], mm: mmap.mmap | None) -> None:
        self.path = path
        self.header = header
        self.tensors = tensors
        self.raw = raw
        self._mm = mm

    def prefetch(self) -> None:
        if self._mm is not None and hasattr(mmap, "MADV_WILLNEED"):
            self._mm.madvise(mmap.MADV_WILLNEED)  # async read-ahead into the page cache

    def release(self) -> None:
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED") and not self._mm.closed:
            self._mm.madvise(mmap.MADV_DONTNEED)
        self.tensors = []
        self.raw = []


def _map_part(path: Path, header: Header, f: BinaryIO) -> MappedPart:
    """Map the part through ``f``, the file opened when the version was found (the mapping
    holds the file from here on, whatever happens to its name)."""
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views, file never written
    if len(mm) != header.file_size:
        raise WeightstreamError(f"{path}: changed size while loading (expected {header.file_size} bytes, got {len(mm)})")
    tensors: list[tuple[str, np.ndarray]] = []
    raw: list[np.ndarray] = []
    for e in header.entries:
        flat = np.frombuffer(mm, dtype=np.uint8, count=e.nbytes, offset=e.begin)
        if e.begin % max(e.dtype.itemsize, 1):
            flat = flat.copy()  # a foreign writer left it unaligned; typed views need alignment
        raw.append(flat)
        tensors.append((e.name, flat.view(e.dtype.numpy).reshape(e.shape)))
    return MappedPart(path, header, tensors, raw, mm)


def _refuse_foreign_pickle(path: Path) -> None:
    """.pdparams is pickle, which runs code when loaded: only trust a file of ours that only we can write."""
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise WeightstreamError(
            f"{path}: refusing to unpickle a .pdparams file owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):o}; expected a file of this user (uid {os.getuid()}) that no one else can write. "
            "Fix: convert it to safetensors, or chown/chmod it if you trust it"
        )


def _load_pdparams(path: Path) -> MappedPart:
    try:
        import paddle
    except ImportError:
        raise WeightstreamError(
            f"{path}: a .pdparams snapshot needs paddle to read, and paddle is not installed; "
            "fix: pip install paddlepaddle, or convert it to safetensors"
        ) from None
    _refuse_foreign_pickle(path)
    state = paddle.load(str(path))  # pickle: a local file of this user's only (checked just above)
    if not isinstance(state, dict):
        raise WeightstreamError(f"{path}: expected a state dict, got {type(state).__name__}")
    tensors: list[tuple[str, np.ndarray]] = []
    raw: list[np.ndarray] = []
    for name, value in state.items():
        if not isinstance(value, np.ndarray) and not paddle_fw.owns(value):
            continue  # e.g. StructuredToParameterName@@ bookkeeping
        dtype: DType = dtype_of(value)
        flat = np.ascontiguousarray(host_bytes(value))
        raw.append(flat)
        tensors.append((str(name), flat.view(dtype.numpy).reshape(tuple(int(d) for d in value.shape))))
    return MappedPart(path, None, tensors, raw, None)


@dataclass
class SnapshotSource:
    """A found snapshot: which files, and what they hold. Iterate for parts, one at a time."""

    version: str
    rank: int
    kind: str  # "parts" | "full" | "legacy"
    paths: list[Path]
    tried: list[Path] = field(default_factory=list)
    _headers: list[Header | None] = field(default_factory=list, repr=False)
    _pdparams: MappedPart | None = field(default=None, repr=False)
    # each safetensors file, open since the version was found; None once mapped (or closed)
    _files: list[BinaryIO | None] = field(default_factory=list, repr=False)

    @property
    def specs(self) -> list[tuple[str, DType, tuple[int, ...]]]:
        """Every tensor in stream order, from the headers only (a .pdparams file is loaded once)."""
        out: list[tuple[str, DType, tuple[int, ...]]] = []
        for i, header in enumerate(self._headers):
            if header is not None:
                out.extend((e.name, e.dtype, e.shape) for e in header.entries)
            else:
                out.extend((n, dtype_of(a), tuple(a.shape)) for n, a in self._pdparams_part(i).tensors)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in self.specs)

    def part_bytes(self, index: int) -> int:
        """Tensor bytes in part ``index`` (a .pdparams file: the whole snapshot)."""
        header = self._headers[index]
        return sum(e.nbytes for e in header.entries) if header is not None else self.total_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def _pdparams_part(self, index: int) -> MappedPart:
        if self._pdparams is None:
            self._pdparams = _load_pdparams(self.paths[index])
        return self._pdparams

    def open_part(self, index: int, *, check_digests: bool = False) -> MappedPart:
        """Map part ``index``. ``check_digests``: first read its data through the file against
        the xxh3 digests written with it (a part without them is mapped unchecked) and raise
        :class:`CorruptSnapshot` naming the file, byte range and tensors of a mismatch."""
        header = self._headers[index]
        if header is None:
            part, self._pdparams = self._pdparams_part(index), None
            return part
        f = self._files[index] if index < len(self._files) else None
        if f is None:  # mapped before (a second pass): the name must still be there
            f = open(self.paths[index], "rb")  # noqa: SIM115 - closed just below, after mapping
        else:
            self._files[index] = None
        try:
            if check_digests:
                self._check_digests(index, header, f)
            return _map_part(self.paths[index], header, f)
        finally:
            f.close()

    def _check_digests(self, index: int, header: Header, f: BinaryIO) -> None:
        path = self.paths[index]
        where = self.paths[0].parent
        fix = (
            f"fix: run `weightstream snapshot verify {shlex.quote(str(where))} --rank {self.rank} --version "
            f"{shlex.quote(self.version)}`, then restore "
            "another version (daemon.restore(dir, version=..., force=True for an older one)) or delete this one"
        )
        what = f"{path}: part {index} of rank {self.rank}'s snapshot of version {self.version!r}"
        try:
            recorded = digests_of(header)
            if recorded is None:
                return
            want, block = recorded
            hasher = BlockHasher(block)
            read_range(f, header.data_start, header.file_size, hasher)
        except CorruptSnapshot as exc:
            raise CorruptSnapshot(f"{what}: {exc}; it was not applied; {fix}") from None
        except OSError as exc:
            raise CorruptSnapshot(f"{what}: cannot read it ({exc.strerror or exc}); it was not applied; {fix}") from exc
        problems = digest_mismatches(header, want, hasher.finish(), block)
        if problems:
            more = f" (and {len(problems) - 1} more corrupt block(s))" if len(problems) > 1 else ""
            raise CorruptSnapshot(f"{what}: {problems[0]}{more}; it was not applied; {fix}")

    def close(self) -> None:
        """Close the files not mapped yet (an abandoned or failed load); parts already
        handed out stay valid."""
        files, self._files = getattr(self, "_files", []), []  # getattr: __del__ after a failed __init__
        for f in files:
            if f is not None:
                f.close()

    def __enter__(self) -> SnapshotSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __iter__(self) -> Iterator[list[tuple[str, np.ndarray]]]:
        """Each part as ``[(name, array), ...]``; a part's pages are dropped once the next is asked for."""
        for i in range(len(self.paths)):
            part = self.open_part(i)
            try:
                yield part.tensors
            finally:
                part.release()


def load_snapshot(
    directory: str | os.PathLike[str], rank: int, version: str | None = None,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> SnapshotSource:
    """Find rank ``rank``'s snapshot of ``version`` (default: ``step`` of ``directory/version.yaml``).

    Every safetensors file of it is open when this returns (see the module docstring), until
    its part is mapped or :meth:`SnapshotSource.close`. Raises FileNotFoundError listing
    every path tried when nothing is found. A legacy
    ``.pdparams`` file is read with ``paddle.load``, which unpickles: only point this at
    local files you trust (never at a directory others can write to).
    """
    directory = Path(directory)
    if version is None:
        try:
            version = read_version(directory)
        except WeightstreamError:
            if fallback_dir is None or not (Path(fallback_dir) / "version.yaml").is_file():
                raise
            version = read_version(fallback_dir)
    version = str(version)
    check_version_text(version)
    tried: list[Path] = []
    notes: list[str] = []
    for where in [directory, *([Path(fallback_dir)] if fallback_dir is not None else [])]:
        found = _search(where, rank, version, tried, notes)
        if found is not None:
            found.tried = tried
            if where != directory:
                log.warning("snapshot: nothing for rank %d version %s in %s; loading from fallback %s", rank, version, directory, where)
            return found
    extra = f" ({'; '.join(notes)})" if notes else ""
    raise FileNotFoundError(
        f"no snapshot of version {version!r} for rank {rank}; tried: {', '.join(str(p) for p in tried)}{extra}; "
        "fix: check the directory, the version (version.yaml 'step') and the rank"
    )


def _search(where: Path, rank: int, version: str, tried: list[Path], notes: list[str]) -> SnapshotSource | None:
    tried.append(where / f"{base_name(rank, version)}.part<N>.safetensors")
    parts = _find_parts(where, rank, version, notes)
    if parts:
        return SnapshotSource(
            version, rank, "parts", [p for p, _, _ in parts], _headers=[h for _, _, h in parts], _files=[f for _, f, _ in parts]
        )
    full = where / full_name(rank, version)
    tried.append(full)
    if full.is_file():
        f, header = _open_header(full)
        return SnapshotSource(version, rank, "full", [full], _headers=[header], _files=[f])
    for name in legacy_names(version):
        path = where / name
        tried.append(path)
        if path.is_file():
            if path.suffix != ".safetensors":
                return SnapshotSource(version, rank, "legacy", [path], _headers=[None], _files=[None])
            f, header = _open_header(path)
            return SnapshotSource(version, rank, "legacy", [path], _headers=[header], _files=[f])
    return None


def _open_header(path: Path) -> tuple[BinaryIO, Header]:
    """Open ``path`` and read its header through the open file (kept open for the mapping)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - held open on purpose: the SnapshotSource closes it
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            raise WeightstreamError(
                f"{path}: cannot open it: too many open files (a snapshot's parts are all held open while it "
                "loads, one descriptor each); fix: raise the limit (ulimit -n) or write fewer, bigger parts "
                "(SnapshotWriter max_part_bytes)"
            ) from exc
        raise
    try:
        return f, read_header_from(f, path)
    except BaseException:
        f.close()
        raise


def _find_parts(where: Path, rank: int, version: str, notes: list[str]) -> list[tuple[Path, BinaryIO, Header]]:
    if not where.is_dir():
        return []
    pattern = part_regex(rank, version)
    indexed: dict[int, Path] = {}
    bad: list[str] = []
    for path in where.iterdir():
        found = pattern.fullmatch(path.name)
        if found is None:
            continue
        text = found.group(1)
        if not (text.isascii() and text.isdigit()) or int(text) in indexed:
            bad.append(path.name)
            continue
        indexed[int(text)] = path
    if bad:
        log.warning("snapshot: ignoring part files with a bad or duplicate part index in %s: %s", where, ", ".join(sorted(bad)))
    if not indexed:
        return []
    ordered = [(i, indexed[i]) for i in sorted(indexed)]  # numeric: part2 before part10
    indices = [i for i, _ in ordered]
    parts: list[tuple[Path, BinaryIO, Header]] = []

    def refused(why: str) -> list[tuple[Path, BinaryIO, Header]]:
        for _, f, _ in parts:
            f.close()
        notes.append(f"{where}: parts {indices} of {base_name(rank, version)} are incomplete{why}; they were not used")
        log.warning("snapshot: %s", notes[-1])
        return []

    try:
        for _, path in ordered:  # every part open before anything is read: a prune can no longer tear it
            f, header = _open_header(path)
            parts.append((path, f, header))
    except FileNotFoundError as exc:
        return refused(f": {Path(exc.filename or '').name} vanished while opening (pruned meanwhile?)")
    except BaseException:
        for _, f, _ in parts:
            f.close()
        raise
    ours = [h.metadata for _, _, h in parts if h.metadata.get(META_FORMAT)]
    problem = parts_problem(indices, ours) if ours else None  # ours: the last part says how many there are
    if problem is not None:
        return refused(f" ({problem}; a crash or prune while committing?)")
    return parts

