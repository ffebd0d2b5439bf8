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


def test_take_prefers_the_smallest_buffer_that_fits() -> None:
    pool = ScratchPool()
    big, small = np.empty(300, np.uint8), np.empty(200, np.uint8)
    pool.give(big)
    pool.give(small)
    assert np.shares_memory(pool.take(150), small)
    assert np.shares_memory(pool.take(150), big)


def test_give_keeps_the_newest_and_never_one_buffer_twice() -> None:
    pool = ScratchPool()
    bufs = [np.empty(10 * (i + 1), np.uint8) for i in range(KEEP + 2)]
    for buf in bufs:
        pool.give(buf)
    pool.give(bufs[-1])
    assert pool.kept_bytes == sum(b.nbytes for b in bufs[-KEEP:])
    pool.clear()
    assert pool.kept_bytes == 0


@pytest.mark.timeout(120)
def test_a_views_rank_reuses_the_scratch_of_tensors_larger_than_a_bucket_and_gets_every_byte(endpoint: str) -> None:
    """Two tensors of several buckets each, to a rank whose load_weights takes views, over three
    versions of new contents: every byte arrives, and from the second version on each is
    assembled in the memory the first version's was, though the rank keeps every view it was ever
    given (so the allocator could not hand back freed memory at the same address)."""
    rng = np.random.default_rng(3)
    versions = ["v1", "v2", "v3"]
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
                    "head": rng.integers(0, 255, 3000, dtype=np.uint8),
                    "embed": rng.standard_normal(50 * KiB // 4).astype(np.float32),  # 200 KiB: 4 buckets
                    "mid": rng.integers(0, 255, 5000, dtype=np.uint8),
                    "lm_head": rng.standard_normal(150 * KiB // 8),  # 150 KiB of float64
                    "tail": rng.integers(-5, 5, 7, dtype=np.int64),
                }
                sender.push(model.items(), version=version)
                seen = expect(version)
                assert {name: data for name, (data, _) in seen.items()} == {n: a.tobytes() for n, a in model.items()}
                where.append({name: seen[name][1] for name in ("embed", "lm_head")})
        rank.join(30)
    finally:
        if rank.is_alive():
            rank.kill()
            rank.join()
    assert where[1] == where[0] and where[2] == where[0], where
