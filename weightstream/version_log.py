"""One structured log line per version per side.

The line is ``key=value`` pairs (logfmt), so it greps and parses without a JSON formatter, and
the same fields ride on the record as ``record.weightstream`` (a dict) for handlers that emit
JSON. Only names, counts, sizes and timings: never tensor contents.

    INFO weightstream.sender: version side=sender version=step_7 outcome=committed bytes=1073741824 tensors=64 ...
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["log_version", "printable"]


def printable(text: str) -> str:
    """``text`` with every character that is not printable written out as its escape: a version
    or an error text from the wire cannot start a line of its own, move the cursor or colour a
    terminal, in a log line or on a status screen."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    # quoted: quotes and backslashes escaped, then what is not printable
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def log_version(logger: logging.Logger, **fields: Any) -> None:
    """Log the end of a version: INFO when it committed, WARNING otherwise. ``fields`` must
    hold ``side``, ``version`` and ``outcome``; None values are left out."""
    present = {key: value for key, value in fields.items() if value is not None}
    level = logging.INFO if present.get("outcome") == "committed" else logging.WARNING
    if logger.isEnabledFor(level):
        line = " ".join(f"{key}={_text(value)}" for key, value in present.items())
        logger.log(level, "version %s", line, extra={"weightstream": present})
