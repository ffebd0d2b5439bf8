"""A snapshot directory as a whole: list its snapshots, verify one, plan and do a prune.

Shared by :class:`~weightstream.receiver.snapshot_writer.SnapshotWriter` (``keep=``) and
``weightstream snapshot ls|verify|prune``. Listing and planning touch nothing; only
:func:`execute_prune` deletes.

Prune rules (:func:`plan_prune`), per rank, over the part sets SnapshotWriter wrote (files
of other writers, full files and legacy names are listed but never deleted):

- the newest ``keep`` whole versions stay, and so does every incomplete set newer than the
  oldest of them (a commit may be renaming it into place right now); a rank with fewer than
  ``keep`` whole versions loses nothing;
- the version ``version.yaml`` names stays, and so does any version in ``protect``;
- a version with a file modified less than ``grace_s`` seconds ago stays;
- "newest" (:func:`newest_first`): within a family (``9``, ``step_10``, ``v11``; or
  ``ckpt_5``, ``ckpt_6``: what :mod:`weightstream.versions` orders) by number, as ranks
  order them; across families (``v1.9`` and ``v2.0`` are two: ``v1``/``v2``), and for
  versions without a number, by commit time, the newest mtime of their parts (the last part
  is written just before the commit renames it into place). A version counts as committed
  no earlier than any lower-numbered version of its family, so the two rules never
  disagree; that version (a rollback committed after it) stays while it does, when the
  kept versions span families, so that pruning again prunes nothing more.

A version is deleted last part first: that part carries the part count, so from the first
unlink on the loader refuses the rest as incomplete (a prune killed midway leaves such an
incomplete set, which the next prune removes). A restore is not hurt either way: it opens
every part of its version before reading any (:mod:`.snapshot_loader`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import ConfigError, CorruptSnapshot, WeightstreamError
from ..versions import read_version, version_key
from .snapshot_format import (
    META_FORMAT,
    META_PART,
    META_PARTS,
    BlockHasher,
    Header,
    digest_mismatches,
    digests_of,
    layout_problem,
    parts_problem,
    read_header_from,
    read_range,
)

log = logging.getLogger("weightstream.snapshot")

# model_state.tp{rank}.{version}.part{N}.safetensors / model_state.tp{rank}.{version}.safetensors;
# the version is greedy so that a dotted version ("1.5") keeps its dots
_PART_FILE = re.compile(r"model_state\.tp(0|[1-9][0-9]*)\.(.+)\.part([0-9]+)\.safetensors")
_FULL_FILE = re.compile(r"model_state\.tp(0|[1-9][0-9]*)\.(.+)\.safetensors")

#: ``progress(bytes_done, bytes_total)`` while verifying
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PartInfo:
    """One file of a snapshot, as found on disk (header fields are None when it did not parse)."""

    path: Path
    index: int  # part index; 0 for a full file
    size: int  # file bytes
    mtime: float
    tensors: int | None = None
    payload: int | None = None  # tensor bytes
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why its header is unreadable


@dataclass(frozen=True)
class SnapshotInfo:
    """One rank's snapshot of one version."""

    rank: int
    version: str
    kind: str  # "parts" | "full"
    parts: tuple[PartInfo, ...]  # ascending index
    current: bool  # version.yaml names this version
    problem: str | None  # why the loader would refuse it; None when whole

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def ours(self) -> bool:
        """Written by SnapshotWriter (its parts carry the part count, so it can be pruned atomically)."""
        return self.kind == "parts" and any(p.metadata.get(META_FORMAT) for p in self.parts)

    @property
    def tensors(self) -> int:
        return sum(p.tensors or 0 for p in self.parts)

    @property
    def payload_bytes(self) -> int:
        return sum(p.payload or 0 for p in self.parts)

    @property
    def file_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def mtime(self) -> float:
        """Newest modification time of its files: about when it was committed."""
        return max(p.mtime for p in self.parts)

    @property
    def paths(self) -> list[Path]:
        return [p.path for p in self.parts]


def check_keep(keep: object, who: str, fix: str = "e.g. keep=3, or keep=None to keep every version") -> int:
    """``keep`` as an int >= 1, else ConfigError naming ``who``."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(
            f"{who}: keep must be an int >= 1 (how many committed versions to keep per rank), got {keep!r} "
            f"({type(keep).__name__}); fix: {fix}"
        )
    return keep


def check_grace(grace_s: object, who: str) -> float:
    """``grace_s`` as a finite float >= 0, else ConfigError naming ``who``."""
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
        raise ConfigError(
            f"{who}: grace period must be a number of seconds >= 0, got {grace_s!r}; fix: e.g. 0 or 60"
        )
    return float(grace_s)


def current_version(directory: str | os.PathLike[str]) -> str | None:
    """The version ``directory/version.yaml`` names, or None when it is missing or unreadable."""
    try:
        return read_version(directory)
    except WeightstreamError:
        return None


# --- listing ------------------------------------------------------------------------------


def list_snapshots(directory: str | os.PathLike[str], rank: int | None = None) -> list[SnapshotInfo]:
    """Every snapshot in ``directory`` (only rank ``rank``'s when given), by rank, oldest version
    first (see :func:`newest_first`). Reads each file's header, nothing more. A file that
    vanishes meanwhile is left out; an unreadable header makes its snapshot incomplete."""
    where = Path(directory)
    if not where.is_dir():
        raise WeightstreamError(
            f"snapshot directory {where}: expected a directory, got {'a file' if where.exists() else 'nothing there'}; "
            "fix: pass the directory given to SnapshotWriter"
        )
    current = current_version(where)
    groups: dict[tuple[int, str, str], list[PartInfo]] = {}
    for entry in os.scandir(where):
        found = _PART_FILE.fullmatch(entry.name)
        if found is not None:
            key, index = (int(found.group(1)), found.group(2), "parts"), int(found.group(3))
        else:
            found = _FULL_FILE.fullmatch(entry.name)
            if found is None:
                continue
            key, index = (int(found.group(1)), found.group(2), "full"), 0
        if rank is not None and key[0] != rank:
            continue
        part = _part_info(Path(entry.path), index)
        if part is not None:
            groups.setdefault(key, []).append(part)
    snaps = [
        _snapshot(r, version, kind, sorted(parts, key=lambda p: p.index), current)
        for (r, version, kind), parts in groups.items()
    ]
    out: list[SnapshotInfo] = []
    for r in sorted({s.rank for s in snaps}):
        out.extend(reversed(newest_first([s for s in snaps if s.rank == r])))
    return out


def _part_info(path: Path, index: int) -> PartInfo | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                header = read_header_from(f, path)
            except WeightstreamError as exc:
                return PartInfo(path, index, st.st_size, st.st_mtime, error=str(exc))
    except FileNotFoundError:
        return None  # pruned or renamed since the listing
    except OSError as exc:
        return PartInfo(path, index, 0, 0.0, error=f"{path}: cannot read it ({exc.strerror})")
    payload = sum(e.nbytes for e in header.entries)
    return PartInfo(path, index, st.st_size, st.st_mtime, len(header.entries), payload, header.metadata)


def _snapshot(rank: int, version: str, kind: str, parts: list[PartInfo], current: str | None) -> SnapshotInfo:
    bad = [p for p in parts if p.error is not None]
    problem: str | None = None
    if bad:
        problem = f"unreadable header: {bad[0].error}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    elif kind == "parts":
        ours = [p.metadata for p in parts if p.metadata.get(META_FORMAT)]
        if ours:
            problem = parts_problem([p.index for p in parts], ours)
    return SnapshotInfo(rank, version, kind, tuple(parts), version == current, problem)


def _family(version: str) -> tuple[str, str]:
    """What a version is ordered by number against: ``("numbered", prefix)`` for versions
    :func:`~weightstream.versions.version_key` orders (``12``, ``step_12`` and ``v12`` share
    the prefix ""), ``("unnumbered", version)`` for every other one (a family of its own)."""
    found = version_key(version)
    return ("numbered", found[0]) if found is not None else ("unnumbered", version)


@dataclass(frozen=True)
class _Place:
    """Where a snapshot sorts (:func:`newest_first`) and which version of its family set it."""

    key: tuple[float, int, float, str]  # (commit time, number or -1, own mtime, version)
    anchor: int  # index of the snapshot whose mtime is key[0]: itself, or a lower-numbered one


def _places(snapshots: Sequence[SnapshotInfo]) -> list[_Place]:
    by_family: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(snapshots):
        by_family.setdefault(_family(s.version), []).append(i)
    places: dict[int, _Place] = {}
    for (kind, _), members in by_family.items():
        if kind == "unnumbered":
            for i in members:
                s = snapshots[i]
                places[i] = _Place((s.mtime, -1, s.mtime, s.version), i)
            continue
        number = {i: _number(snapshots[i].version) for i in members}
        members.sort(key=lambda i: number[i])
        latest = members[0]  # the latest commit among the numbers up to the current one
        for _, group in itertools.groupby(members, key=lambda i: number[i]):
            same = list(group)  # equal numbers ("12", "step_12") share one commit time
            for i in same:
                if snapshots[i].mtime > snapshots[latest].mtime:
                    latest = i
            for i in same:
                s = snapshots[i]
                anchor = i if s.mtime >= snapshots[latest].mtime else latest
                places[i] = _Place((snapshots[anchor].mtime, number[i], s.mtime, s.version), anchor)
    return [places[i] for i in range(len(snapshots))]


def _number(version: str) -> int:
    found = version_key(version)
    return found[1] if found is not None else -1


def newest_first(snapshots: Sequence[SnapshotInfo]) -> list[SnapshotInfo]:
    """One rank's snapshots, newest first.

    Within a family (versions :func:`~weightstream.versions.version_key` gives the same
    prefix: ``9``, ``step_10``, ``v11``; or ``ckpt_5``, ``ckpt_6``) by number, as ranks order
    them; across families, and for versions without a number, by commit time (the newest
    mtime of a version's parts). So that the two agree, a version's commit time is the latest
    of its own and of every lower-numbered version of its family: a rollback to ``step_3``
    committed after ``step_5`` makes ``step_5`` at least that new. Ties: the number, then the
    version's own mtime, then its name.
    """
    places = _places(snapshots)
    return [snapshots[i] for i in sorted(range(len(snapshots)), key=lambda i: places[i].key, reverse=True)]


# --- pruning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunePlan:
    """What a prune deletes (``remove``) and what it keeps, each with why."""

    remove: tuple[SnapshotInfo, ...]
    keep: tuple[tuple[SnapshotInfo, str], ...]
    skipped: tuple[tuple[SnapshotInfo, str], ...]  # never considered: not SnapshotWriter's part sets

    @property
    def paths(self) -> list[Path]:
        return [p for s in self.remove for p in s.paths]

    @property
    def freed_bytes(self) -> int:
        return sum(s.file_bytes for s in self.remove)


def plan_prune(
    snapshots: Iterable[SnapshotInfo],
    keep: int,
    *,
    rank: int | None = None,
    grace_s: float = 0.0,
    now: float | None = None,
    protect: Iterable[str] = (),
) -> PrunePlan:
    """Which snapshots a prune keeping the newest ``keep`` versions per rank deletes (pure:
    reads no disk). ``rank``: only that rank's snapshots are considered; ``protect``: versions
    never deleted, beside the one version.yaml names (``SnapshotInfo.current``); ``now``:
    the time ``grace_s`` counts back from (default: the clock). Rules: the module docstring."""
    keep = check_keep(keep, "snapshot prune")
    grace_s = check_grace(grace_s, "snapshot prune")
    now = time.time() if now is None else now
    protected = {str(v) for v in protect}
    remove: list[SnapshotInfo] = []
    kept: list[tuple[SnapshotInfo, str]] = []
    skipped: list[tuple[SnapshotInfo, str]] = []
    by_rank: dict[int, list[SnapshotInfo]] = {}
    for snap in snapshots:
        if rank is not None and snap.rank != rank:
            continue
        if not snap.ours:
            skipped.append((snap, "not written by SnapshotWriter (full, foreign or unreadable files): never pruned"))
            continue
        by_rank.setdefault(snap.rank, []).append(snap)
    for r, snaps in by_rank.items():
        rank_kept, rank_remove = _plan_rank(r, snaps, keep, protected, now - grace_s, grace_s)
        kept.extend(rank_kept)
        remove.extend(rank_remove)
    return PrunePlan(tuple(remove), tuple(kept), tuple(skipped))


def _plan_rank(
    rank: int, snaps: list[SnapshotInfo], keep: int, protected: set[str], fresh_after: float, grace_s: float
) -> tuple[list[tuple[SnapshotInfo, str]], list[SnapshotInfo]]:
    places = _places(snaps)
    order = sorted(range(len(snaps)), key=lambda i: places[i].key, reverse=True)
    wholes = [i for i in order if snaps[i].complete]
    cut = order.index(wholes[keep - 1]) + 1 if len(wholes) >= keep else len(order)
    why: dict[int, str] = {}
    for at, i in enumerate(order[:cut]):  # the window: the newest keep whole versions and all newer
        if snaps[i].complete:
            why[i] = f"one of the newest {keep}"
        elif any(snaps[j].complete for j in order[at + 1 : cut]):
            why[i] = "incomplete but newer than a kept whole version (a commit in progress?)"
        elif not wholes:
            why[i] = f"incomplete, and rank {rank} has no whole version to keep: nothing of it is pruned until one is"
        else:
            why[i] = (
                f"incomplete, and rank {rank} has {len(wholes)} whole version(s), fewer than keep={keep}: "
                "nothing of it is pruned until it has more"
            )
    for i in order[cut:]:
        s = snaps[i]
        if s.current:
            why[i] = "named by version.yaml"
        elif s.version in protected:
            why[i] = "protected"
        elif s.mtime > fresh_after:
            why[i] = f"modified less than {grace_s:g}s ago"
    # A kept version ranks by the commit time of a lower-numbered version of its family (a
    # rollback): that one stays too while the kept ones span families, or a prune run again
    # would rank the kept version lower than another family's and prune more.
    if len({_family(snaps[i].version) for i in why}) > 1:
        for i in order[:cut]:
            anchor = places[i].anchor
            if anchor not in why:
                why[anchor] = (
                    f"committed after the kept version {snaps[i].version!r} of its family (a rollback): it sets "
                    "where that version ranks against other families, so it stays while that one does"
                )
    kept = [(snaps[i], why[i]) for i in order if i in why]
    return kept, [snaps[i] for i in order if i not in why]


@dataclass
class PruneResult:
    removed: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    versions: list[SnapshotInfo] = field(default_factory=list)  # wholly removed

    @property
    def ok(self) -> bool:
        return not self.failed


def execute_prune(plan: PrunePlan, on_removed: Callable[[Path], None] | None = None) -> PruneResult:
    """Delete what ``plan`` removes, each version last part first (see the module docstring).

    Never raises for a file: one that cannot be deleted is logged with its path and why and
    ends that version's prune (its other parts stay, so it stays loadable if its last part
    did); one already gone counts as removed. ``on_removed(path)`` is called after each unlink.
    """
    result = PruneResult()
    for snap in plan.remove:
        whole = True
        for part in sorted(snap.parts, key=lambda p: p.index, reverse=True):
            try:
                os.unlink(part.path)
            except FileNotFoundError:
                log.info("snapshot prune: %s was already gone (another prune?)", part.path)
            except OSError as exc:
                why = exc.strerror or str(exc)
                log.warning("snapshot prune: could not delete %s (%s); rank %d version %s stays", part.path, why,
                            snap.rank, snap.version)
                result.failed.append((part.path, why))
                whole = False
                break
            result.removed.append(part.path)
            if on_removed is not None:
                on_removed(part.path)
        if whole:
            result.versions.append(snap)
    if plan.remove:
        _fsync_dir(plan.remove[0].parts[0].path.parent)
    return result


def prune_directory(
    directory: str | os.PathLike[str],
    keep: int,
    *,
    rank: int | None = None,
    grace_s: float = 0.0,
    protect: Iterable[str] = (),
    dry_run: bool = False,
) -> tuple[PrunePlan, PruneResult]:
    """List ``directory``, plan a prune and (unless ``dry_run``) do it."""
    plan = plan_prune(list_snapshots(directory, rank), keep, rank=rank, grace_s=grace_s, protect=protect)
    return plan, PruneResult() if dry_run else execute_prune(plan)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the unlinks happened; only their durability across a power cut is unknown
    finally:
        os.close(fd)


# --- verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    snapshot: SnapshotInfo
    problems: tuple[str, ...]
    digests: str  # "checked" (every part had one), "absent" (structure only), "partial"
    bytes_read: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_snapshot(snapshot: SnapshotInfo, progress: Progress | None = None) -> VerifyResult:
    """Read every byte of ``snapshot`` and check it: every part present, each header parses,
    its tensors tile the data exactly up to the file's end, part indices match, and each
    data block matches its xxh3 digest where the writer recorded one (older parts have
    none: checked for structure only, and ``digests`` says so). ``progress(done, total)``
    gets file bytes read. Problems name the part file and, for a digest mismatch, the byte
    range and the tensors in it."""
    problems: list[str] = []
    if snapshot.problem is not None and all(p.error is None for p in snapshot.parts):
        problems.append(snapshot.problem)  # missing parts; an unreadable header is reported with its part below
    total = sum(p.size for p in snapshot.parts)
    done = 0
    with_digest = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    advance(0)
    for part in snapshot.parts:
        before = done
        found, digested = _verify_part(snapshot, part, advance)
        problems.extend(found)
        with_digest += digested
        advance(max(0, part.size - (done - before)))  # a short or failed read still moves the bar to the end
    digests = "checked" if with_digest == len(snapshot.parts) else "absent" if not with_digest else "partial"
    return VerifyResult(snapshot, tuple(problems), digests, done)


def _verify_part(snapshot: SnapshotInfo, part: PartInfo, advance: Callable[[int], None]) -> tuple[list[str], bool]:
    name = f"part {part.index} ({part.path})"
    try:
        with open(part.path, "rb") as f:
            try:
                header = read_header_from(f, part.path)
            except WeightstreamError as exc:
                return [f"{name}: {exc}"], False
            problems = _check_metadata(snapshot, part, header)
            layout = layout_problem(header)
            if layout is not None:
                problems.append(f"{name}: {layout}")
            advance(header.data_start)
            try:
                recorded = digests_of(header)
            except CorruptSnapshot as exc:
                problems.append(f"{name}: {exc}; {_FIX}")
                recorded = None
            if recorded is None or layout is not None:
                read_range(f, header.data_start, header.file_size, None, advance)
                return problems, recorded is not None
            want, block = recorded
            hasher = BlockHasher(block)
            read_range(f, header.data_start, header.file_size, hasher, advance)
            problems.extend(f"{name}: {p}; {_FIX}" for p in digest_mismatches(header, want, hasher.finish(), block))
            return problems, True
    except OSError as exc:
        return [f"{name}: cannot read it ({exc.strerror or exc})"], False


_FIX = "fix: delete this version's snapshot (or prune it) and let the next commit write a new one"


def _check_metadata(snapshot: SnapshotInfo, part: PartInfo, header: Header) -> list[str]:
    meta = header.metadata
    if snapshot.kind != "parts" or not meta.get(META_FORMAT):
        return []
    problems = []
    if meta.get(META_PART) != str(part.index):
        problems.append(f"part {part.index} ({part.path}): its header says part {meta.get(META_PART)!r}, expected {part.index}")
    last = part.index == max(p.index for p in snapshot.parts)
    if not last and META_PARTS in meta:
        problems.append(f"part {part.index} ({part.path}): carries the part count {meta[META_PARTS]!r} but is not the last part")
    return problems
