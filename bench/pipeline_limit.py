"""The machine's ceiling for a two-copy pipeline over shared memory.

weightstream copies every byte twice: the sender from the trainer's memory into a
shm slot, a rank from the slot into the model, and the two run at the same time.
The one-process memcpy is the ceiling of one copy; this measures the ceiling of
the pair. A writer process copies private memory into one sender slot while a
reader process copies another slot into private memory, in slot-sized pieces, with
the copy weightstream makes for a slot that size (streaming stores past the cache's size),
each timing every piece. Only pieces copied while both processes were copying
count (one running alone would run at the single-copy speed), and the pipeline
cannot beat the slower of the two, so the ceiling is the slower one's rate.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

import numpy as np

from weightstream import native as speedups
from weightstream.protocol.transports.shm import TRANSPORT

PIECE = 256 << 20


def _copier(descriptor: dict[str, Any], direction: str, piece: int, nbytes: int, start: Any, out: Any) -> None:
    mapped = TRANSPORT.open_slot(descriptor)  # the receivers' own mapping of a sender slot
    try:
        slot = mapped.host_view()[:piece]
        private = np.arange(piece, dtype=np.uint8) if direction == "in" else np.zeros(piece, np.uint8)
        spans = []
        start.wait(60)
        stream = mapped.streams  # weightstream's own copy for a slot of this size
        for at in range(0, nbytes, piece):
            n = min(piece, nbytes - at)
            t = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            if direction == "in":
                speedups.copy(slot[:n], private[:n], stream)
            else:
                speedups.copy(private[:n], slot[:n], stream)
            spans.append((t, time.perf_counter(), n))
        out.put((direction, spans, bool(np.array_equal(slot, private))))  # the last piece moved intact
        del slot
    finally:
        mapped.close()


def _overlapped_rate(spans: list[tuple[float, float, int]], lo: float, hi: float) -> float:
    inside = [(t1 - t0, n) for t0, t1, n in spans if t0 >= lo and t1 <= hi]
    if not inside:  # the copies barely overlapped: fall back to the whole run
        inside = [(t1 - t0, n) for t0, t1, n in spans]
    return sum(n for _, n in inside) / sum(dt for dt, _ in inside)


def measure(nbytes: int, repeats: int = 3) -> tuple[list[float], bool]:
    """Per repeat, ``nbytes`` divided by the slower copy's overlapped rate (seconds);
    and whether both copies verified. Each copier moves at least 4 pieces so they overlap."""
    piece = min(PIECE, max(nbytes, 1))
    moved = max(nbytes, 4 * piece)
    ctx = mp.get_context("spawn")
    slots = TRANSPORT.create_slots(2, piece)  # sender slots, as a BucketSender makes them
    times: list[float] = []
    ok = True
    try:
        slots[1].host_view()[:] = np.arange(piece, dtype=np.uint8)  # what the reader must find
        slots[0].host_view().fill(0)  # both touched once, as a ring is after its first version
        for _ in range(repeats):
            result = _run_pair(ctx, slots, piece, moved)
            if result is None:
                return [], False  # a copier died or hung: no ceiling to report
            (spans_a, ok_a), (spans_b, ok_b) = result
            lo = max(spans_a[0][0], spans_b[0][0])
            hi = min(spans_a[-1][1], spans_b[-1][1])
            rate = min(_overlapped_rate(spans_a, lo, hi), _overlapped_rate(spans_b, lo, hi))
            times.append(nbytes / rate)
            ok = ok and ok_a and ok_b
        return times, ok
    finally:
        for slot in slots:
            slot.close()


def _run_pair(ctx: Any, slots: list[Any], piece: int, moved: int) -> list[tuple[list[Any], bool]] | None:
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_copier, args=(slot.descriptor(), d, piece, moved, start, out))
        for slot, d in zip(slots, ("in", "out"))
    ]
    for p in procs:
        p.start()
    try:
        results: list[Any] = []
        deadline = time.monotonic() + 600
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    return None
        return [(spans, same) for _, spans, same in results]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
