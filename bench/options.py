"""Argument types for the benches' command lines, and the cleanup every bench runs under.

Each type refuses a bad value with an ``argparse.ArgumentTypeError``: argparse then exits 2 with
``argument --OPTION: expected ..., got ...`` under the usage line, before anything is built or
spawned. Bounds are what a run on one host can mean, not what it can hold: a bench that does not
fit the machine still fails in its own run.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from weightstream.protocol.messages import MAX_SLOTS

T = TypeVar("T")

MAX_RANKS = 64  # receiver processes (or handoff readers) of one run on one host
MAX_MIB = 1 << 20  # 1 TiB: a model, a bucket or a run's bytes
MAX_REPEATS = 1000  # timed repeats, rounds or versions of one row
SHM = Path("/dev/shm")
HANDOFF_PREFIX = "ws-handoff-"  # bench/handoff.py's slot files: ws-handoff-<pid>-<random>
SLOT_PREFIX = "ws_"  # weightstream's shm slots: ws_<pid>_<session>_<random>
HANDLES_PREFIX = "wsbench_"  # bench/peers/handles.py's per-tensor segments: wsbench_<pid>_<random>_...


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """A whole number from ``lo`` to ``hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {value}")
        return value

    return parse


def _comma_list(convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> Callable[[str], list[T]]:
    """A comma list whose every item ``convert`` takes and ``ok`` accepts; else argparse's error
    with ``expected`` and the item that came."""

    def parse(text: str) -> list[T]:
        values = []
        for part in text.split(","):
            try:
                value = convert(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
            if not ok(value):
                raise argparse.ArgumentTypeError(f"{expected}, got {part.strip()} in {text!r}")
            values.append(value)
        return values

    return parse


def wholes(lo: int, hi: int, example: str = "1,2") -> Callable[[str], list[int]]:
    """A comma list of whole numbers, each from ``lo`` to ``hi``."""
    return _comma_list(int, lambda v: lo <= v <= hi, f"expected a comma list of whole numbers from {lo} to {hi}, such as {example}")


def numbers(lo: float, hi: float, example: str) -> Callable[[str], list[float]]:
    """A comma list of finite numbers, each from ``lo`` to ``hi``."""
    return _comma_list(  # NaN fails ``ok`` too
        float, lambda v: math.isfinite(v) and lo <= v <= hi,
        f"expected a comma list of numbers from {lo:g} to {hi:g}, such as {example}",
    )


def names(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """A comma list of names, each one of ``choices``."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        parts = text.split(",")
        unknown = [p for p in parts if p not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {','.join(allowed)}, got {', '.join(map(repr, unknown))} in {text!r}"
            )
        return parts

    return parse


SIZE_MIB = whole(1, MAX_MIB)
RANKS = wholes(1, MAX_RANKS)
REPEATS = whole(1, MAX_REPEATS)
BUFFERS = whole(1, MAX_SLOTS)


def _own(pid: int) -> set[str]:
    """This process's segments in /dev/shm (each name carries its creator's pid)."""
    marks = (f"{SLOT_PREFIX}{pid}_", f"{HANDOFF_PREFIX}{pid}-", f"{HANDLES_PREFIX}{pid}_")
    try:
        return {p.name for p in SHM.iterdir() if p.name.startswith(marks)}
    except FileNotFoundError:
        return set()


@contextmanager
def segments_removed() -> Iterator[None]:
    """Run a bench, then unlink every shared-memory segment this process made during it and left
    behind, whichever way it ended (an error, a SIGTERM turned into SystemExit, Ctrl-C).

    The runs close their senders and handoffs in ``finally`` blocks; this catches what an exception
    raised half way through a constructor leaves, so a failed bench never leaves /dev/shm fuller."""
    pid = os.getpid()
    before = _own(pid)
    try:
        yield
    finally:
        for name in sorted(_own(pid) - before):
            try:
                (SHM / name).unlink()
            except FileNotFoundError:
                continue
            if name.startswith(SLOT_PREFIX):  # made by SharedMemory: its resource tracker would warn at exit
                from multiprocessing import resource_tracker

                try:
                    resource_tracker.unregister(f"/{name}", "shared_memory")
                except (OSError, ValueError):  # no tracker to tell: nothing would warn
                    pass
