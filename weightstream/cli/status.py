"""``weightstream status ENDPOINT``: ask a running rank's daemon how it is doing.

The daemon answers only if it was started with ``ReceiverDaemon(..., status_endpoint=ENDPOINT)``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..protocol.errors import WeightstreamError
from ..version_log import printable


def _number(value: Any, scale: float, form: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else "?"
    return form.format(value * scale)


def _seconds(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
        return _number(value, 1e3, "{:.1f} ms")
    return _number(value, 1.0, "{:.2f} s")


def _ago(ended: Any) -> str:
    if isinstance(ended, bool) or not isinstance(ended, (int, float)):
        return "?"
    age = max(0.0, time.time() - ended)
    return f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago"


def _shown(value: Any, style: str = "") -> Text:
    """A value the daemon sent, as plain text: never markup or emoji, and every non-printable
    character (a terminal escape in a version or an error) written out as an escape."""
    return Text(printable(str(value)), style=style)


def render(status: dict[str, Any], console: Console) -> None:
    """A status as a summary and a table of the last versions."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    intact = status.get("model_intact")

    def field(key: str, style: str = "") -> Text:
        return _shown(status.get(key, "?"), style)

    reconnects = Text.assemble(
        field("reconnects"), " (heartbeat misses ", field("heartbeat_misses"), ")",
        *((": ", field("last_reconnect")) if status.get("last_reconnect") else ()),
    )
    rows: list[tuple[str, Text]] = [
        ("rank", Text.assemble(field("rank"), "  (pid ", field("pid"), ", weightstream ", field("weightstream"), ")")),
        ("state", field("state")),
        ("committed", field("committed_version")),
        ("receiving", field("receiving_version") if status.get("receiving_version") else Text("-")),
        ("model intact", Text("yes", "green") if intact else Text("no", "red")),
        ("connected", Text("yes") if status.get("connected") else Text("no", "yellow")),
        ("reconnects", reconnects),
        ("last error", field("last_error", "red") if status.get("last_error") else Text("-")),
        ("sender", field("endpoint")),
    ]
    for key, value in rows:
        head.add_row(key, value)
    console.print(head)
    versions = status.get("versions") or []
    if not versions:
        console.print("no version ended here yet")
        return
    table = Table(title="last versions (prepare: BEGIN to PREPARED; model changing: first write to commit)")
    for column in ("version", "outcome", "tensors", "MB", "total", "prepare", "model changing", "ended"):
        table.add_column(column, justify="right" if column not in ("version", "outcome") else "left")
    for v in versions:
        if not isinstance(v, dict):
            continue
        style = "green" if v.get("outcome") == "committed" else "red"
        table.add_row(
            _shown(v.get("version")), _shown(v.get("outcome"), style), _shown(v.get("tensors")),
            _number(v.get("bytes"), 1e-6, "{:.1f}"), _seconds(v.get("seconds")), _seconds(v.get("prepare_seconds")),
            _seconds(v.get("change_seconds")), _ago(v.get("ended")),
        )
    console.print(table)


def status_command(
    endpoint: Annotated[str, typer.Argument(metavar="ENDPOINT", help="the daemon's status_endpoint, e.g. ipc:///tmp/ws-1000/rank0-status.sock")],
    timeout: Annotated[float, typer.Option(min=0.01, max=3600.0, help="seconds to wait for the answer (at most an hour)")] = 5.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the raw status as JSON")] = False,
) -> None:
    """Ask a rank's daemon (started with status_endpoint=) for its state, committed version, last error and
    the timings of its last versions."""
    from ..receiver.status_endpoint import query_status

    try:
        status = query_status(endpoint, timeout=timeout)
    except WeightstreamError as exc:
        Console(stderr=True, emoji=False).print(Text.assemble(("status: ", "red"), _shown(f"{type(exc).__name__}: {exc}")))
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    render(status, Console(emoji=False, highlight=False))
