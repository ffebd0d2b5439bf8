"""Scratch for tensors larger than a bucket: reused by the next such tensor once the consumer
moved past the view, in this version or the next, never while its view is still valid."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod

import numpy as np
import pytest
import scratch_workers

from weightstream import BucketSender
from weightstream.receiver.scratch import KEEP, ScratchPool

KiB = 1 << 10


def test_take_gives_new_memory_until_a_buffer_comes_back() -> None:
    pool = ScratchPool()
    a = pool.take(100)
    assert a.nbytes == 100 and a.dtype == np.uint8 and pool.kept_bytes == 0
    pool.give(a)
    assert pool.kept_bytes == 100
    b = pool.take(60)  # the kept one's first bytes
    assert b.nbytes == 60 and np.shares_memory(a, b) and pool.kept_bytes == 0
    pool.give(b)  # its base goes back, whole
    assert pool.kept_bytes == 100 and pool.take(100).nbytes == 100
    assert not np.shares_memory(pool.take(101), a)  # none large enough: new


def test_new_buffers_are_as_large_as_the_largest_asked_for_and_smaller_ones_are_dropped() -> None:
    pool = ScratchPool()
    small, big = pool.take(100), pool.take(300)
    pool.give(small)  # smaller than the largest asked for: of no use to every tensor, dropped
    assert pool.kept_bytes == 0
    pool.give(big)
    assert pool.kept_bytes == 300
    assert np.shares_memory(pool.take(50), big)
    assert pool.take(50).base.nbytes == 300  # new, at the largest size


@pytest.mark.parametrize(
    "layout",
    [
        # (tensor MiB, how many views are still out when it is taken): the second tensor is taken
        # while the first's view is out, the third while the second's is
        [(13, 0), (5, 1), (21, 1), (6, 1)],
        [(9, 0), (5, 0), (21, 1)],
        [(21, 0), (21, 1), (21, 1)],
    ],
)
def test_a_repeating_layout_allocates_nothing_after_its_second_version(layout: list[tuple[int, int]]) -> None:
    pool, M = ScratchPool(), 1 << 20
    kept: set[int] = set()
    for version in range(4):
        out: list[np.ndarray] = []
        for mib, still_out in layout:
            while len(out) > still_out:
                pool.give(out.pop(0))  # the consumer moved past its bucket
            buf = pool.take(mib * M)
            assert buf.nbytes == mib * M
            base = id(buf.base)
            # the first version finds the largest size, the second how many overlap at that size
            assert version < 2 or base in kept, f"version {version}: {mib} MiB in new memory"
            out.append(buf)
        for buf in out:
            pool.give(buf)
        kept = {id(b) for b in pool._free}
        assert pool.kept_bytes <= KEEP * max(m for m, _ in layout) * M


def test_give_keeps_the_newest_and_never_one_buffer_twice() -> None:
    pool = ScratchPool()
    bufs = [np.empty(10 * (i + 1), np.uint8) for i in range(KEEP + 2)]
    for buf in bufs:
        pool.give(buf)
    pool.give(bufs[-1])
    assert pool.kept_bytes == sum(b.nbytes for b in bufs[-KEEP:])
    pool.clear()
    assert pool.kept_bytes == 0


LAYOUTS = {
    # name -> KiB per tensor; 64 KiB buckets, so every tensor above 64 KiB is assembled in scratch
    "two": [3, 200, 5, 150, 1],
    "overlapping": [208, 80, 336, 96],  # 13:5:21:6, each next taken while the last's view is out
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_views_rank_reuses_the_scratch_of_tensors_larger_than_a_bucket_and_gets_every_byte(
    endpoint: str, layout: str
) -> None:
    """Tensors of several buckets each, to a rank whose load_weights takes views, over five
    versions of new contents: every byte arrives, and from the fourth version on each is assembled
    in memory the third version used, though the rank keeps every view it was ever given
    (so the allocator could not hand back freed memory at the same address)."""
    rng = np.random.default_rng(3)
    versions = ["v1", "v2", "v3", "v4", "v5"]
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    rank = ctx.Process(target=scratch_workers.views_rank, args=(endpoint, versions, events), daemon=True)
    rank.start()

    def expect(kind: str) -> dict[str, tuple[bytes, int]]:
        try:
            got, payload = events.get(timeout=60)
        except queue_mod.Empty:
            raise AssertionError(f"no {kind!r} from the rank in 60 s (alive: {rank.is_alive()})") from None
        assert got == kind, payload
        return payload  # type: ignore[no-any-return]

    try:
        expect("started")
        where: list[dict[str, int]] = []
        with BucketSender(endpoint, receivers=1, bucket_bytes=64 * KiB, num_buffers=2, timeout=60) as sender:
            for version in versions:
                model = {
                    f"t{i}": rng.standard_normal(kib * KiB // 4).astype(np.float32) if i % 2 else
                    rng.integers(0, 255, kib * KiB, dtype=np.uint8)
                    for i, kib in enumerate(LAYOUTS[layout])
                }
                sender.push(model.items(), version=version)
                seen = expect(version)
                assert {name: data for name, (data, _) in seen.items()} == {n: a.tobytes() for n, a in model.items()}
                where.append({name: seen[name][1] for name, a in model.items() if a.nbytes > 64 * KiB})
        rank.join(30)
    finally:
        if rank.is_alive():
            rank.kill()
            rank.join()
    third = set(where[2].values())
    assert set(where[3].values()) <= third and set(where[4].values()) <= third, where
