"""``weightstream status ENDPOINT``: ask a running rank's daemon how it is doing.

The daemon answers only if it was started with ``ReceiverDaemon(..., status_endpoint=ENDPOINT)``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..protocol.errors import WeightstreamError


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


def render(status: dict[str, Any], console: Console) -> None:
    """A status as a summary and a table of the last versions."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    intact = status.get("model_intact")
    # every value the daemon sent is text to show as it is (a version "step_5[/x]" is no markup)
    text = {key: escape(str(value)) for key, value in status.items() if key != "versions"}
    rows = [
        ("rank", f"{text.get('rank')}  (pid {text.get('pid')}, weightstream {text.get('weightstream')})"),
        ("state", text.get("state", "?")),
        ("committed", text.get("committed_version", "?")),
        ("receiving", text["receiving_version"] if status.get("receiving_version") else "-"),
        ("model intact", "[green]yes[/]" if intact else "[red]no[/]"),
        ("connected", "yes" if status.get("connected") else "[yellow]no[/]"),
        ("reconnects", f"{text.get('reconnects', 0)} (heartbeat misses {text.get('heartbeat_misses', 0)})"
         + (f": {text['last_reconnect']}" if status.get("last_reconnect") else "")),
        ("last error", f"[red]{text['last_error']}[/]" if status.get("last_error") else "-"),
        ("sender", text.get("endpoint", "?")),
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
            escape(str(v.get("version"))), f"[{style}]{escape(str(v.get('outcome')))}[/]", escape(str(v.get("tensors"))),
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
        Console(stderr=True).print(f"[red]status:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    render(status, Console())
