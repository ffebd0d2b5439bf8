"""``weightstream snapshot ls|verify|prune DIR``: the snapshots a SnapshotWriter left in a directory.

A typer sub-app; the main CLI mounts it with ``app.add_typer(snapshot.app, name="snapshot")``.
The work is done by :mod:`weightstream.receiver.snapshot_store`; this module only parses
options and prints. Exit status: 0 when all is well, 1 when verify finds a bad snapshot or
prune cannot delete a file, 2 for bad input (a missing directory, ``--keep 0``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from typer.core import TyperCommand

from ..protocol.errors import WeightstreamError
from ..receiver.snapshot_store import (
    SnapshotInfo,
    VerifyResult,
    check_grace,
    check_keep,
    execute_prune,
    list_snapshots,
    plan_prune,
    verify_snapshot,
)

app = typer.Typer(
    help="List, verify and prune the snapshots that SnapshotWriter keeps in a directory.",
    no_args_is_help=True,
)

DirArg = Annotated[Path, typer.Argument(metavar="DIR", help="the snapshot directory (the one given to SnapshotWriter)", show_default=False)]
RankOpt = Annotated[int | None, typer.Option("--rank", min=0, help="only this rank's snapshots", show_default=False)]


class _Command(TyperCommand):
    """A required argument reads ``DIR`` in the usage line, as click writes it (typer: ``{DIR}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # Any: typer's vendored click.Context
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument" and param.required and param.nargs == 1 and param.metavar:
                pieces.append(param.metavar)
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


# Text from file names, versions and errors is printed verbatim: markup=False, or escape() where
# the text sits inside markup (a table), and no :emoji: codes anywhere ("v:fire:1" is a version).
def _out() -> Console:
    return Console(highlight=False, soft_wrap=True, emoji=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


@contextmanager
def _errors(command: str) -> Iterator[None]:
    """Bad input (WeightstreamError, ConfigError among them) becomes one line on stderr and exit 2."""
    try:
        yield
    except WeightstreamError as exc:
        text = str(exc)
        prefix = f"snapshot {command}"
        # an error that names the command already (check_keep's "snapshot prune --keep: ...") is not prefixed again
        _err().print(text if text.startswith(prefix) else f"{prefix}: {text}", markup=False)
        raise typer.Exit(2) from None


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable: the loop returns at TiB


def _when(mtime: float) -> str:
    return datetime.fromtimestamp(mtime).isoformat(sep=" ", timespec="seconds")


def _label(snap: SnapshotInfo) -> str:
    return f"rank {snap.rank} version {snap.version!r}"


def _as_json(snap: SnapshotInfo) -> dict[str, Any]:
    return {
        "rank": snap.rank,
        "version": snap.version,
        "kind": snap.kind,
        "parts": len(snap.parts),
        "files": [p.path.name for p in snap.parts],
        "tensors": snap.tensors,
        "payload_bytes": snap.payload_bytes,
        "file_bytes": snap.file_bytes,
        "complete": snap.complete,
        "problem": snap.problem,
        "current": snap.current,
        "mtime": snap.mtime,
        "modified": _when(snap.mtime),
    }


@app.command("ls", cls=_Command)
def ls_command(
    directory: DirArg,
    rank: RankOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list, one object per snapshot")] = False,
) -> None:
    """List the snapshots in DIR.

    Per rank, oldest version first: parts, tensors, bytes, whether it is whole, which version
    version.yaml names, and when it was written.
    """
    with _errors("ls"):
        snaps = list_snapshots(directory, rank)
    if as_json:
        typer.echo(json.dumps([_as_json(s) for s in snaps], indent=2))
        return
    out = _out()
    if not snaps:
        out.print(f"no snapshots in {directory}" + (f" for rank {rank}" if rank is not None else ""), markup=False)
        return
    table = Table(title=f"snapshots in {escape(str(directory))}", title_justify="left")
    for name, justify in (("rank", "right"), ("version", "left"), ("parts", "right"), ("tensors", "right"),
                          ("size", "right"), ("state", "left"), ("current", "center"), ("modified", "left")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=name in ("version", "modified"))  # type: ignore[arg-type]
    for s in snaps:
        state = "whole" if s.complete else "[red]incomplete[/red]"
        table.add_row(
            str(s.rank), escape(s.version), str(len(s.parts)), str(s.tensors), _size(s.payload_bytes),
            state if s.kind == "parts" else f"{state} ({s.kind} file)", "yes" if s.current else "", _when(s.mtime),
        )
    out.print(table)
    for s in snaps:
        if s.problem is not None:
            out.print(f"{_label(s)}: {s.problem}", markup=False)


@app.command("verify", cls=_Command)
def verify_command(
    directory: DirArg,
    rank: RankOpt = None,
    version: Annotated[str | None, typer.Option("--version", help="only this version (default: every version)", show_default=False)] = None,
) -> None:
    """Read and check every byte of the snapshots in DIR.

    Checks that all parts are present, that headers and tensor offsets agree with the file
    sizes, and that the data matches the xxh3 digests written with it (snapshots written
    without digests are checked for structure only, and the output says so). Exits 1 naming
    the bad part when one is corrupt or incomplete.
    """
    with _errors("verify"):
        snaps = [s for s in list_snapshots(directory, rank) if version is None or s.version == version]
    if not snaps:
        what = " ".join(x for x in (f"rank {rank}" if rank is not None else "", f"version {version!r}" if version else "") if x)
        _err().print(f"snapshot verify: no snapshot{' of ' + what if what else ''} in {directory}; "
                     "fix: see `weightstream snapshot ls DIR`", markup=False)
        raise typer.Exit(1)
    results = _verify_with_bar(snaps)
    out = _out()
    for r in results:
        s = r.snapshot
        how = {"checked": "xxh3 digests checked", "absent": "structure only (written without digests)",
               "partial": "xxh3 digests checked where present (some parts have none)"}[r.digests]  # fmt: skip
        status = "ok " if r.ok else "BAD"
        out.print(f"{status} {_label(s)}: {len(s.parts)} part(s), {s.tensors} tensors, {_size(r.bytes_read)} read; {how}",
                  markup=False)
        for problem in r.problems:
            out.print(f"    {problem}", markup=False)
    bad = [r for r in results if not r.ok]
    if bad:
        _err().print(
            f"snapshot verify: {len(bad)} of {len(results)} snapshot(s) failed: "
            + "; ".join(f"{_label(r.snapshot)}: {r.problems[0]}" for r in bad),
            markup=False,
        )
        raise typer.Exit(1)


def _verify_with_bar(snaps: list[SnapshotInfo]) -> list[VerifyResult]:
    console = _err()
    total = sum(s.file_bytes for s in snaps)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())  # fmt: skip
    results = []
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("verify", total=total)
        base = 0
        for snap in snaps:
            bar.update(task, description=f"verify {_label(snap)}")  # the column takes no markup
            results.append(verify_snapshot(snap, _advance(bar, task, base)))
            base += snap.file_bytes
            bar.update(task, completed=base)
    return results


def _advance(bar: Progress, task: Any, base: int) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        bar.update(task, completed=base + done)

    return progress


@app.command("prune", cls=_Command)
def prune_command(
    directory: DirArg,
    keep: Annotated[int, typer.Option("--keep", help="versions to keep per rank, newest first (at least 1)", show_default=False)],
    rank: RankOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be deleted")] = False,
    grace_seconds: Annotated[float, typer.Option("--grace-seconds", help="never delete a version with a file modified this recently")] = 0.0,
) -> None:
    """Delete the snapshots in DIR older than the newest KEEP versions of each rank.

    Never deletes the version that version.yaml names, a version modified within the grace
    period, or files SnapshotWriter did not write. Each version goes last part first, so no
    reader ever takes a partly deleted version for a whole one.
    """
    with _errors("prune"):
        check_keep(keep, "snapshot prune --keep", fix="e.g. --keep 3")
        check_grace(grace_seconds, "snapshot prune --grace-seconds")
        plan = plan_prune(list_snapshots(directory, rank), keep, rank=rank, grace_s=grace_seconds)
    out = _out()
    for snap, why in plan.keep:
        out.print(f"keep   {_label(snap)}: {why}", markup=False)
    for snap, why in plan.skipped:
        out.print(f"skip   {_label(snap)}: {why}", markup=False)
    verb = "would remove" if dry_run else "remove"
    for snap in plan.remove:
        out.print(f"{verb} {_label(snap)}: {len(snap.parts)} part(s), {_size(snap.file_bytes)}", markup=False)
    if dry_run:
        out.print(f"dry run: would remove {len(plan.remove)} version(s), {_size(plan.freed_bytes)}; nothing deleted",
                  markup=False)
        return
    result = execute_prune(plan)
    freed = sum(s.file_bytes for s in result.versions)
    out.print(f"removed {len(result.versions)} version(s), {_size(freed)}", markup=False)
    if not result.ok:
        for path, why in result.failed:
            _err().print(f"snapshot prune: could not delete {path}: {why}; fix: check its permissions", markup=False)
        raise typer.Exit(1)
