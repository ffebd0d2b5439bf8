"""The yardstick for two (or three) processes: a minimal handoff pipeline over shared memory.

One writer copies a private source into shm slots in turn; each reader copies every slot
out into its own private destination as soon as the slot is full; semaphores hand the slots
back and forth; ``np.copyto`` on both sides. Nothing else: no sockets, no metadata, no
threads. This is what any two-copy transport between processes can reach on the machine at
hand, and its best slot size depends on the machine (a few MiB where the slot and the copy
around it stay in the last-level cache, larger on machines whose cache is small or shared
with noisy neighbours), so :func:`sweep` runs every slot size and the best one counts.

    handoff = Handoff(1 << 30, readers=1)     # persistent processes, slots of up to 256 MiB
    seconds = handoff.run(4 << 20)            # one 1 GiB handoff through 2 x 4 MiB slots
    handoff.close()

The processes stay up between runs so a bench can interleave this yardstick with the
project's own runs (yardstick, project, yardstick, ...). Alone:

    weightstream bench handoff            # 1 GiB, 1 and 2 readers, 3 repeats of every slot size
    weightstream bench handoff --quick    # 64 MiB, 1 reader, 1 repeat: a smoke run

From a checkout, ``python -m bench.handoff`` runs the same with the same options.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from .options import HANDOFF_PREFIX, RANKS, REPEATS, SIZE_MIB, segments_removed

MiB = 1 << 20
SLOTS = 2
MAX_SLOT = 256 * MiB
SLOT_SIZES = tuple(MiB << k for k in range(9))  # 1 .. 256 MiB
TIMEOUT = 120.0


def _map(path: str, size: int) -> tuple[Any, np.ndarray]:
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return mm, np.frombuffer(mm, np.uint8)


def _writer(path: str, nbytes: int, readers: int, empty: list[Any], full: list[list[Any]], conn: Any,
            max_slot: int) -> None:
    mm, shared = _map(path, SLOTS * max_slot)
    source = np.frombuffer(np.random.default_rng(1).bytes(nbytes), np.uint8).copy()
    conn.send(("ready", 0.0))
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        slot_bytes = cmd
        t0 = time.perf_counter()
        for k, at in enumerate(range(0, nbytes, slot_bytes)):
            i = k % SLOTS
            n = min(slot_bytes, nbytes - at)
            for _ in range(readers):
                if not empty[i].acquire(timeout=TIMEOUT):
                    raise TimeoutError("a reader stopped taking slots")
            np.copyto(shared[i * max_slot : i * max_slot + n], source[at : at + n])
            for r in range(readers):
                full[r][i].release()
        conn.send(("done", time.perf_counter() - t0))
    del shared
    mm.close()


def _reader(path: str, nbytes: int, index: int, empty: list[Any], full: list[Any], conn: Any, max_slot: int) -> None:
    mm, shared = _map(path, SLOTS * max_slot)
    dest = np.zeros(nbytes, np.uint8)  # faulted in, like a live model's params
    expected = xxhash.xxh3_64_intdigest(np.random.default_rng(1).bytes(nbytes))  # a digest: no second copy held
    conn.send(("ready", 0.0))
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        slot_bytes = cmd
        dest[:: 4096] = 0
        t0 = time.perf_counter()
        for k, at in enumerate(range(0, nbytes, slot_bytes)):
            i = k % SLOTS
            n = min(slot_bytes, nbytes - at)
            if not full[i].acquire(timeout=TIMEOUT):
                raise TimeoutError("the writer stopped filling slots")
            np.copyto(dest[at : at + n], shared[i * max_slot : i * max_slot + n])
            empty[i].release()
        elapsed = time.perf_counter() - t0
        conn.send(("done" if xxhash.xxh3_64_intdigest(dest) == expected else "corrupt", elapsed))
    del shared
    mm.close()


class Handoff:
    """Persistent writer and ``readers`` reader processes moving ``nbytes`` through 2 shm slots."""

    def __init__(self, nbytes: int, readers: int = 1) -> None:
        self.nbytes, self.readers = nbytes, readers
        self.sizes = slot_sizes(nbytes)
        self.max_slot = max(self.sizes)
        # the pid in the name: bench.options.segments_removed() finds what a failed run of this process left
        self.path = f"/dev/shm/{HANDOFF_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        try:
            with open(self.path, "wb") as f:
                f.truncate(SLOTS * self.max_slot)
            ctx = mp.get_context("spawn")
            empty = [ctx.Semaphore(readers) for _ in range(SLOTS)]
            full = [[ctx.Semaphore(0) for _ in range(SLOTS)] for _ in range(readers)]
            a, b = ctx.Pipe()
            self.procs.append(ctx.Process(target=_writer, args=(self.path, nbytes, readers, empty, full, b, self.max_slot),
                                          daemon=True))
            self.conns.append(a)
            for r in range(readers):
                a, b = ctx.Pipe()
                self.procs.append(ctx.Process(target=_reader, args=(self.path, nbytes, r, empty, full[r], b, self.max_slot),
                                              daemon=True))
                self.conns.append(a)
            for p in self.procs:
                p.start()
            for c in self.conns:
                self._answer(c)
            os.unlink(self.path)  # every process mapped it: gone with them, even after a kill -9
        except BaseException:
            self.close()
            raise

    def _answer(self, conn: Any) -> tuple[str, float]:
        if not conn.poll(TIMEOUT):
            raise TimeoutError("a handoff process did not answer within the timeout")
        status, seconds = conn.recv()
        return status, float(seconds)

    def run(self, slot_bytes: int) -> float:
        """Seconds for the whole handoff through 2 slots of ``slot_bytes`` (the slowest reader's
        time from its first wait to its last copy); raises if a reader's bytes differ."""
        for c in self.conns:
            c.send(slot_bytes)
        answers = [self._answer(c) for c in self.conns]
        if any(status == "corrupt" for status, _ in answers):
            raise RuntimeError(f"the handoff at {slot_bytes >> 20} MiB slots delivered wrong bytes")
        return max(seconds for _, seconds in answers)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slot_sizes(nbytes: int) -> tuple[int, ...]:
    """The slot sizes worth sweeping for ``nbytes``: 1 MiB doubling up to 256 MiB, none past
    the first that holds all of it."""
    sizes = [s for s in SLOT_SIZES if s < nbytes]
    return (*sizes, min(SLOT_SIZES[len(sizes)], MAX_SLOT)) if len(sizes) < len(SLOT_SIZES) else SLOT_SIZES


def sweep(nbytes: int, readers: int = 1, repeats: int = 3) -> tuple[int, list[float], dict[int, float]]:
    """(the best slot size, its times, every slot size's median) for ``nbytes`` through the
    handoff, every size once per repeat after one warm-up lap."""
    import statistics

    with Handoff(nbytes, readers) as pipe:
        for s in pipe.sizes:
            pipe.run(s)
        times: dict[int, list[float]] = {s: [] for s in pipe.sizes}
        for _ in range(repeats):
            for s in pipe.sizes:
                times[s].append(pipe.run(s))
    medians = {s: statistics.median(t) for s, t in times.items()}
    best = min(medians, key=lambda s: medians[s])
    return best, times[best], medians


def memcpy_timer(nbytes: int, src: np.ndarray | None = None, dst: np.ndarray | None = None) -> Callable[[], float]:
    """A timer of one ``np.copyto`` of ``nbytes`` in this process, between arrays faulted in once
    (the caller's 1-D uint8 ``src``/``dst`` if given, so a bench holds no more copies than it must)."""
    src = np.ones(nbytes, np.uint8) if src is None else src
    dst = np.ones(nbytes, np.uint8) if dst is None else dst

    def timed() -> float:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    return timed


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The yardstick alone: every slot size swept, per reader count, and a memcpy of the same bytes.
    ``argv`` defaults to the command line; ``prog`` names the command in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.handoff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 MiB, 1 reader, 1 repeat")
    ap.add_argument("--size-mib", type=SIZE_MIB, help="bytes handed off per run (default 1024; --quick: 64)")
    ap.add_argument("--readers", type=RANKS, help="comma list of reader counts (default 1,2; --quick: 1)")
    ap.add_argument("--repeats", type=REPEATS, help="timed laps over every slot size, after one warm-up (default 3; --quick: 1)")
    args = ap.parse_args(argv)
    mib = args.size_mib if args.size_mib is not None else 64 if args.quick else 1024
    readers_list = args.readers if args.readers is not None else [1] if args.quick else [1, 2]
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else 3
    with segments_removed():
        return _run(mib, readers_list, repeats)


def _run(mib: int, readers_list: list[int], repeats: int) -> int:
    nbytes = mib * MiB
    for readers in readers_list:
        best, _, medians = sweep(nbytes, readers, repeats)
        print(f"readers={readers}: best {best >> 20} MiB; "
              + "  ".join(f"{s >> 20}M:{m * 1e3:.0f}ms" for s, m in medians.items()), flush=True)
    memcpy = memcpy_timer(nbytes)
    print(f"memcpy {mib} MiB: {min(memcpy() for _ in range(3)) * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
