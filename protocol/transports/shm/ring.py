"""A bucket streamed through a small ring in its shm slot, so a rank reads it from the cache.

Through a slot much larger than the last-level cache every byte crosses DRAM four times: the
sender reads the trainer's tensor and writes the slot, a rank reads the slot and writes the
model. When the sender instead writes the bucket into a ring of a few MiB and each rank copies
it out right behind, the rank reads what the sender wrote a moment ago from the shared cache:
two crossings, as for one memcpy.

Each slot keeps its full size (a bucket a rank takes as views still needs it) and adds a ring
over its first ``ring_bytes``, mapped twice in a row (``weightstream.native._ring``): a bucket keeps its
layout, its byte at offset o lives at o % ring_bytes, and any copy of at most ``ring_bytes`` is
contiguous across the wrap. Counters in a control block after the slot say how far the sender
wrote and each rank read; each side sleeps on a futex, with a timeout, when it gets too far
ahead.

A bucket goes through the ring only when every rank said (READY ``streamed``) that it copies
every tensor out itself, since a view handed to ``load_weights`` may outlive the ring's next
lap, and never with checksums, whose digest needs the whole bucket at once.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .... import native as speedups
from ....deadline import Deadline
from ....frameworks import host_bytes
from ...errors import PeerTimeout, VersionAborted
from .streaming import cache_bytes as measured_cache_bytes
from .streaming import env_bytes, kept

try:
    from ....native._ring import CONTROL_BYTES as CONTROL_BYTES
    from ....native._ring import MAX_CONSUMERS as MAX_CONSUMERS
    from ....native._ring import Control as Control
    from ....native._ring import RingMap as RingMap
except ImportError:  # no C compiler at install, or not Linux: slots stay plain
    Control = RingMap = None  # type: ignore[misc,assignment]
    CONTROL_BYTES, MAX_CONSUMERS = 0, 0

ENV = "WEIGHTSTREAM_RING_BYTES"  # "0": no rings; a size in bytes: rings of that size
PAGE = 4096
TICK = 0.05  # seconds a wait sleeps before it looks for a dead peer or an abort
PROBE_RINGS = tuple(1 << k for k in range(20, 25))  # ring sizes timed: 1, 2, 4, 8 and 16 MiB
PROBE_BYTES = 64 << 20  # streamed through each, per pass: 16 laps of the largest, from memory not in cache
PROBE_TIMEOUT = 10.0  # seconds a probe's side may wait for the other

log = logging.getLogger("weightstream.transport")


def ring_bytes_for(slot_bytes: int, ring_bytes: int | None = None) -> int:
    """The ring for a slot of ``slot_bytes``, or 0 for none: ``WEIGHTSTREAM_RING_BYTES`` if set,
    else ``ring_bytes``, else the size this machine streams fastest (:func:`calibrated_ring_bytes`),
    for slots at least 4 rings long."""
    if Control is None or not (speedups.NATIVE and speedups.SPANS):
        return 0
    forced = env_bytes(ENV)
    if forced is not None:
        ring = forced // PAGE * PAGE
        return ring if 0 < ring < slot_bytes else 0
    ring = calibrated_ring_bytes() if ring_bytes is None else ring_bytes
    return ring if slot_bytes >= 4 * ring else 0


def ring_seconds(sizes: tuple[int, ...] = PROBE_RINGS, total: int = PROBE_BYTES, passes: int = 3) -> dict[int, float]:
    """Per ring size, the best of ``passes`` times two threads take to stream ``total`` bytes through
    it as the sender and a rank do: the writer copies from memory not in cache into the ring, the
    reader copies out behind it with streaming stores. One thread a side, the GIL released in each
    copy and wait, so two cores run it as two processes would."""
    fd = os.memfd_create("ws-ring-probe", os.MFD_CLOEXEC)
    block = mmap.mmap(-1, CONTROL_BYTES)  # page-aligned, as the counters need
    try:
        os.ftruncate(fd, max(sizes))
        src, dst = np.ones(total, np.uint8), np.ones(total, np.uint8)  # faulted in before any timing
        best = dict.fromkeys(sizes, math.inf)
        for _ in range(passes):
            for size in sizes:  # interleaved: a drift of the host's speed hits every size alike
                best[size] = min(best[size], _stream_once(fd, block, size, src, dst))
        return best
    finally:
        block.close()
        os.close(fd)


def _stream_once(fd: int, block: Any, size: int, src: np.ndarray, dst: np.ndarray) -> float:
    mapping = RingMap(fd, size, 2 * size)
    view = np.frombuffer(mapping, np.uint8)  # type: ignore[call-overload]  # RingMap exports a buffer
    writer = RingWriter(Control(block, 0), view, size)
    writer.begin([0], lambda: None, PROBE_TIMEOUT)
    reading = RingReader(writer.control, view, size).reading(0, dst.nbytes, lambda: None, PROBE_TIMEOUT)
    failed: list[Exception] = []
    thread = threading.Thread(target=_read_out, args=(reading, dst, failed), name="ws-ring-probe", daemon=True)
    try:
        t0 = time.perf_counter()
        thread.start()
        writer.write(0, src, 0, src.nbytes)
        writer.finish(src.nbytes)
        thread.join(PROBE_TIMEOUT)
        seconds = time.perf_counter() - t0
    finally:
        thread.join(PROBE_TIMEOUT)
        writer.close()
        del view, reading
        if not thread.is_alive():
            mapping.close()  # else the thread's frame still holds a view: left to the collector
    if failed:
        raise failed[0]
    if thread.is_alive():
        raise PeerTimeout(f"the ring probe's reader still ran after {PROBE_TIMEOUT}s")
    return seconds


def _read_out(reading: RingRead, dst: np.ndarray, failed: list[Exception]) -> None:
    try:
        reading.copy_out(dst, 0, 0, dst.nbytes, True)
    except Exception as exc:  # raised again by the timing thread
        failed.append(exc)


def ring_from_seconds(seconds: dict[int, float]) -> int:
    """The largest ring within 5% of the fastest: within 5% the probe does not tell sizes apart,
    and each piece of a smaller ring costs a wait, dearer between two processes than between the
    probe's threads (on the AMD VM below the probe put 2 MiB level with 4-8 MiB; pushes through
    it were 9-28% slower)."""
    fastest = min(seconds.values())
    return max(size for size, t in seconds.items() if t <= 1.05 * fastest)


def ring_sizes(cache: int) -> tuple[int, ...]:
    """The ring sizes worth timing on a machine measuring ``cache`` bytes of cache: those that fit
    in it (the smallest at least). A ring exists so that a rank reads what the sender wrote a moment
    ago from the cache; the probe's two threads run in step and never fill a ring, two processes
    do. On the AMD VM (8 MiB measured) the probe put 16 MiB within 5% of 4-8 MiB, and pushes of 1
    GiB to one direct rank took 95-207 ms through it against 76-80 through 8 MiB."""
    return tuple(s for s in PROBE_RINGS if s <= cache) or PROBE_RINGS[:1]


def measure_ring_bytes() -> int:
    """:func:`ring_from_seconds` of :func:`ring_seconds` over :func:`ring_sizes` (~0.3-0.5 s); an
    eighth of the measured cache (within the sizes timed), with a warning, if the probe itself fails."""
    try:
        return ring_from_seconds(ring_seconds(ring_sizes(measured_cache_bytes())))
    except (OSError, ValueError, BufferError, PeerTimeout, VersionAborted) as exc:
        fallback = min(max(measured_cache_bytes() // 8 // PAGE * PAGE, min(PROBE_RINGS)), max(PROBE_RINGS))
        log.warning("could not time the ring sizes (%s); taking %d bytes, set %s to choose", exc, fallback, ENV)
        return fallback


@functools.cache
def calibrated_ring_bytes() -> int:
    """The ring this machine streams fastest, measured once and kept for a month
    (:func:`~.streaming.kept`), among the sizes that fit the measured cache
    (:func:`ring_sizes`). Decided by this measurement, not by the cache size alone: on a
    2-core AMD EPYC VM (sysfs: 32 MiB L3; copies slow past an 8 MiB working set), 1 GiB in 64
    tensors to one direct-sink rank took 142 ms through a 1 MiB ring (an eighth of that measured
    cache, the rule before), 99 through 2 MiB, 91 through 4, 102 through 8, 124 through 16; on an
    Intel VM measuring 64 MiB, 4-32 MiB rings were alike (93-97 ms a GiB) and 1 MiB took 187."""
    return kept("ring-probe", "ring_bytes", measure_ring_bytes, valid_ring_bytes)


def valid_ring_bytes(ring: int) -> bool:
    """Whether a kept ring size is one the probe could have chosen: whole pages, 1-16 MiB, no
    larger than the measured cache (a size kept before the probe left those out is timed again)."""
    return ring % PAGE == 0 and min(PROBE_RINGS) <= ring <= max(ring_sizes(measured_cache_bytes()))


def control_offset(slot_bytes: int) -> int:
    """Where a slot's control block starts: the page after its bytes."""
    return -(-slot_bytes // PAGE) * PAGE


def segment_bytes(slot_bytes: int, ring_bytes: int) -> int:
    return control_offset(slot_bytes) + CONTROL_BYTES if ring_bytes else slot_bytes


class RingPlan(NamedTuple):
    """How the sender copies a push's whole-tensor buckets through a ring, made once per layout.
    Per tensor (by manifest index) its offset in its bucket and its size, as tuples, which the C
    gather takes as they are, so that no run copies a slice of them. Per bucket its runs (see
    :func:`windows`) as (start, stop, shift) in manifest indexes, ``shift`` being the multiple of
    the ring's size to take off their offsets so that they fall inside the doubled ring."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    runs: dict[int, list[tuple[int, int, int]]]  # bucket seq -> its runs


def ring_plan(buckets: list[Any], tensor_bytes: list[int], ring_bytes: int) -> RingPlan:
    """The :class:`RingPlan` of planned buckets (``tensors``, ``offsets``, ``nbytes``, ``chunks``
    per bucket) of tensors of ``tensor_bytes``; a bucket with a chunk piece gets no runs (the
    sender writes it piece by piece)."""
    count = len(tensor_bytes)
    offsets, sizes = [0] * count, [0] * count
    runs: dict[int, list[tuple[int, int, int]]] = {}
    for bucket in buckets:
        if any(bucket.chunks) or any(n != tensor_bytes[i] for i, n in zip(bucket.tensors, bucket.nbytes)):
            continue
        first = bucket.tensors[0]
        offsets[first : first + len(bucket.offsets)] = bucket.offsets
        sizes[first : first + len(bucket.nbytes)] = bucket.nbytes
        found = []
        for a, b in windows(np.asarray(bucket.offsets, np.int64), np.asarray(bucket.nbytes, np.int64), ring_bytes // 8):
            start = bucket.offsets[a]
            found.append((first + a, first + b, start - start % ring_bytes))
        runs[bucket.seq] = found
    return RingPlan(tuple(offsets), tuple(sizes), runs)


def windows(offsets: np.ndarray, sizes: np.ndarray, piece: int) -> list[tuple[int, int]]:
    """Split a bucket's spans, in offset order, into runs copied between two waits: the spans that
    start in the same ``piece``-sized block, and a span larger than ``piece`` alone (it is copied
    piece by piece). A run covers at most two pieces, so neither side ever waits for more than a
    quarter of a ring whose pieces are an eighth of it."""
    n = len(offsets)
    if n == 0:
        return []
    offsets = np.asarray(offsets, np.int64)
    big = np.asarray(sizes, np.int64) > piece
    cut = np.ones(n, bool)
    block = offsets // piece
    cut[1:] = (block[1:] != block[:-1]) | big[1:] | big[:-1]
    starts = np.flatnonzero(cut)
    stops = np.append(starts[1:], n)
    return list(zip(starts.tolist(), stops.tolist()))


class _Waiter:
    """Repeats a timed wait until it succeeds, calling ``check`` (which raises for a dead peer or an
    abort) between ticks, and raises PeerTimeout once nothing moved for ``timeout`` seconds."""

    def __init__(self, check: Callable[[], None], timeout: float, what: str) -> None:
        self.check, self.timeout, self.what = check, timeout, what

    def until(self, attempt: Callable[[], int]) -> int:
        deadline = Deadline(self.timeout)
        while True:
            state = attempt()
            if state:
                return state
            self.check()
            if deadline.expired():
                raise PeerTimeout(
                    f"{self.what}: nothing moved for {self.timeout:.1f}s; the peer stalled. "
                    "Raise the timeout if that is expected"
                )


class RingWriter:
    """The sender's side of one slot's ring."""

    def __init__(self, control: Any, view: np.ndarray, ring_bytes: int) -> None:
        self.control, self.view, self.ring_bytes = control, view, ring_bytes
        self.piece = ring_bytes // 8
        self._mv = memoryview(view)  # type: ignore[arg-type]  # NumPy types __buffer__ on 3.12+ only
        self._waiter = _Waiter(lambda: None, 1.0, "")
        self.produced = 0

    def begin(self, consumers: list[int], check: Callable[[], None], timeout: float) -> None:
        """A new bucket for ``consumers`` (rank indexes < MAX_CONSUMERS); before it is published."""
        mask = 0
        for index in consumers:
            mask |= 1 << index
        self.control.reset(mask, self.ring_bytes)
        self.produced = 0
        self._waiter = _Waiter(check, timeout, f"waiting for ranks {consumers} to read the slot's ring")

    def _space(self, end: int) -> None:
        control, slack = self.control, self.ring_bytes // 4
        self._waiter.until(lambda: control.wait_space(end, slack, TICK))

    def _produce(self, end: int) -> None:
        if end > self.produced:
            self.produced = end
            self.control.produce(end)

    def write(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        """``source[start:start + nbytes]`` to the bucket's ``offset``, piece by piece."""
        piece, view, ring = self.piece, self.view, self.ring_bytes
        for at in range(0, nbytes, piece):
            n = min(piece, nbytes - at)
            self._space(offset + at + n)
            here = (offset + at) % ring
            speedups.copy(view[here : here + n], source[start + at : start + at + n])
            self._produce(offset + at + n)

    def _write_here(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        """A copy inside a run whose space was already waited for; ``offset`` in the doubled ring."""
        speedups.copy(self.view[offset : offset + nbytes], source[start : start + nbytes])

    def write_tensors(
        self, items: tuple[Any, ...], plan: RingPlan, seq: int,
        write_one: Callable[[Callable[[int, np.ndarray, int, int], None], memoryview, int, Any, int], bool],
    ) -> int | None:
        """Bucket ``seq``'s whole tensors (``items`` holds every tensor of the push, by manifest index),
        run by run; the index of one whose byte size is not as planned, else None.
        ``write_one(write, mv, offset, tensor, n)`` is the slot's checked copy of one tensor,
        through ``write`` or into the memoryview ``mv``."""
        view, mv, offsets, nbytes = self.view, self._mv, plan.offsets, plan.nbytes
        for a, b, shift in plan.runs[seq]:
            if b - a == 1 and nbytes[a] > self.piece:  # a big tensor: piece by piece
                source = host_bytes(items[a])
                if source.nbytes != nbytes[a]:
                    return a
                self.write(offsets[a], source, 0, nbytes[a])
                continue
            end = offsets[b - 1] + nbytes[b - 1]
            self._space(end)
            i = speedups.gather(view, offsets, nbytes, items, a, False, b, shift)
            while i < b:
                if not write_one(self._write_here, mv, offsets[i] - shift, items[i], nbytes[i]):
                    return i
                i = speedups.gather(view, offsets, nbytes, items, i + 1, False, b, shift)
            self._produce(end)
        return None

    def finish(self, used: int) -> None:
        """Every byte of the bucket is written: wake every rank still waiting."""
        self.produced = max(self.produced, used)
        self.control.produce(self.produced, True)

    def abort(self) -> None:
        self.control.abort()

    def close(self) -> None:
        """Let go of the control block and the ring view, so both mappings can close."""
        self.control.release()
        self._mv.release()
        self.view = None  # type: ignore[assignment]


class RingReader:
    """A rank's side of one slot's ring."""

    def __init__(self, control: Any, view: np.ndarray, ring_bytes: int) -> None:
        self.control, self.view, self.ring_bytes = control, view, ring_bytes
        self.piece = ring_bytes // 8

    def reading(self, index: int, used: int, check: Callable[[], None], timeout: float) -> RingRead:
        return RingRead(self, index, used, check, timeout)


class RingRead:
    """One rank's pass over one bucket in the ring: wait for bytes, copy them, say so."""

    def __init__(self, ring: RingReader, index: int, used: int, check: Callable[[], None], timeout: float) -> None:
        self.ring, self.index, self.used = ring, index, used
        self.control, self.view, self.piece = ring.control, ring.view, ring.piece
        self._waiter = _Waiter(check, timeout, "waiting for the sender to write the slot's ring")
        self._slack = ring.ring_bytes // 4

    def wait(self, end: int) -> None:
        control, index, used, slack = self.control, self.index, self.used, self._slack

        def attempt() -> int:
            return control.wait_data(index, end, used, slack, TICK)  # type: ignore[no-any-return]

        if self._waiter.until(attempt) < 0:
            raise VersionAborted("the sender gave up the bucket it was writing; the version was aborted")

    def consume(self, end: int) -> None:
        self.control.consume(self.index, end)

    def copy_out(self, dst: np.ndarray, at: int, offset: int, nbytes: int, stream: bool) -> None:
        """``dst[at:at + nbytes]`` = the bucket's bytes at ``offset``, piece by piece."""
        piece, view, ring = self.piece, self.view, self.ring.ring_bytes
        for k in range(0, nbytes, piece):
            n = min(piece, nbytes - k)
            self.wait(offset + k + n)
            here = (offset + k) % ring
            speedups.copy(dst[at + k : at + k + n], view[here : here + n], stream)
            self.consume(offset + k + n)

    def scatter(self, offsets: np.ndarray, sizes: np.ndarray, addresses: np.ndarray, start: int, stop: int,
                stream: bool) -> int:
        """Spans [start, stop) to their addresses through the ring; the index of the first without an
        address (``stop`` when all had one). The caller copies that one and calls again after it."""
        view, ring = self.view, self.ring.ring_bytes
        for a, b in windows(offsets[start:stop], sizes[start:stop], self.piece):
            a, b = a + start, b + start
            if b - a == 1 and sizes[a] > self.piece:  # a big tensor: piece by piece
                if addresses[a] == 0:
                    return a
                o, size, address = int(offsets[a]), int(sizes[a]), int(addresses[a])
                for k in range(0, size, self.piece):
                    n = min(self.piece, size - k)
                    self.wait(o + k + n)
                    one = np.array([(o + k) % ring, n, address + k], np.uint64)
                    speedups.scatter(view, one[0:1], one[1:2], one[2:3], 0, stream)
                    self.consume(o + k + n)
                continue
            end = int(offsets[b - 1] + sizes[b - 1])
            self.wait(end)
            first = int(offsets[a])
            at = offsets[a:b] - (first - first % ring)  # inside the doubled ring
            k = a + speedups.scatter(view, at, sizes[a:b], addresses[a:b], 0, stream)
            while k < b and sizes[k] == 0:  # an empty tensor may have no address: nothing to copy
                k = a + speedups.scatter(view, at, sizes[a:b], addresses[a:b], k - a + 1, stream)
            if k < b:
                return k
            self.consume(end)
        return stop
