"""Bucket planning: pure function, so properties can be checked exhaustively."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightstream import ConfigError, WeightstreamError
from weightstream.protocol.packed import packed_offsets
from weightstream.sender.planner import _plan_unchunked, align_up, plan_buckets, ramp_limits

pytestmark = pytest.mark.timeout(60)


def check_plan(
    sizes: list[int], bucket_bytes: int, alignment: int, max_entries: int = 16384, ramp: int = 0, max_bytes: int = 0
) -> None:
    """Every invariant a receiver relies on."""
    plan = plan_buckets(sizes, bucket_bytes, alignment, max_entries=max_entries, ramp=ramp, max_bytes=max_bytes)
    covered: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(sizes))}
    order: list[int] = []
    for seq, bucket in enumerate(plan):
        assert bucket.seq == seq
        assert bucket.tensors, "no empty buckets"
        n = len(bucket.tensors)
        assert len(bucket.offsets) == len(bucket.nbytes) == len(bucket.chunks) == n
        assert n <= max_entries
        limit, cap = ramp_limits(seq, bucket_bytes, max_entries, alignment, ramp, max_bytes)
        assert n <= cap, "a bucket under the ramp holds at most its share of tensors"
        if n > 1:  # one tensor that fits a whole bucket may exceed a ramp's limit, never more
            assert bucket.used <= limit, "a bucket under the ramp holds at most its share of bytes"
        end = 0
        for t, off, nb, chunk in zip(bucket.tensors, bucket.offsets, bucket.nbytes, bucket.chunks):
            assert off % alignment == 0, "offset not aligned"
            assert off >= end, "pieces overlap"
            assert off + nb <= bucket_bytes, "piece runs past the bucket"
            end = off + nb
            covered[t].append((chunk, nb))
            if not order or order[-1] != t:
                order.append(t)
        assert bucket.used == end
        whole = all(chunk == 0 and nb == sizes[t] for t, nb, chunk in zip(bucket.tensors, bucket.nbytes, bucket.chunks))
        assert bucket.whole == whole, "a bucket of whole tensors sends only their count, and only such a bucket"
        if bucket.whole:  # what the rank derives from the manifest must be the plan
            derived = packed_offsets(np.array([sizes[t] for t in bucket.tensors], np.int64), alignment)
            assert derived.tolist() == bucket.offsets
    assert order == list(range(len(sizes))), "tensor order must be preserved"
    for i, size in enumerate(sizes):
        pieces = covered[i]
        assert pieces, f"tensor {i} missing"
        if size <= bucket_bytes:
            assert pieces == [(0, size)], "a tensor that fits one bucket is never split"
        pos = 0
        for chunk, nb in pieces:  # consecutive, exactly once
            assert chunk == pos and (nb > 0 or size == 0)
            pos += nb
        assert pos == size


def test_empty_input() -> None:
    assert plan_buckets([], 4096) == []


def test_alignment_of_odd_sizes() -> None:
    plan = plan_buckets([1, 255, 257, 0, 3], 4096, 256)
    assert len(plan) == 1
    assert plan[0].offsets == [0, 256, 512, 1024, 1024]
    assert plan[0].nbytes == [1, 255, 257, 0, 3]


def test_exact_fill_makes_one_bucket_per_tensor() -> None:
    plan = plan_buckets([4096, 4096, 2048, 2048], 4096, 256)
    assert [b.tensors for b in plan] == [[0], [1], [2, 3]]
    assert [b.used for b in plan] == [4096, 4096, 4096]


def test_tensor_that_does_not_fit_starts_a_new_bucket() -> None:
    plan = plan_buckets([3000, 2000], 4096, 256)
    assert [b.tensors for b in plan] == [[0], [1]]


def test_chunking_fills_the_rest_then_whole_buckets() -> None:
    plan = plan_buckets([100, 3 * 4096 + 10, 5], 4096, 256)
    check_plan([100, 3 * 4096 + 10, 5], 4096, 256)
    assert plan[0].tensors == [0, 1] and plan[0].offsets == [0, 256] and plan[0].nbytes == [100, 4096 - 256]
    assert plan[1].chunks == [4096 - 256] and plan[1].nbytes == [4096]
    assert plan[-1].tensors[-1] == 2


def test_empty_tensors_get_an_entry() -> None:
    plan = plan_buckets([0, 0, 4096, 0], 4096, 256)
    check_plan([0, 0, 4096, 0], 4096, 256)
    assert sum(len(b.tensors) for b in plan) == 4


def test_chunking_can_be_refused() -> None:
    with pytest.raises(WeightstreamError, match="bucket_bytes"):
        plan_buckets([5000], 4096, 256, allow_chunks=False)


@pytest.mark.parametrize(
    ("sizes", "bucket_bytes", "alignment", "match"),
    [
        ([1], 4096, 0, "power of two"),
        ([1], 4096, 3, "power of two"),
        ([1], 4096, -256, "power of two"),
        ([1], 100, 256, "multiple"),
        ([1], 4097, 256, "multiple"),
        ([1], 0, 256, "multiple"),
        ([1, -1], 4096, 256, "size"),
    ],
)
def test_bad_arguments(sizes: list[int], bucket_bytes: int, alignment: int, match: str) -> None:
    with pytest.raises(WeightstreamError, match=match):
        plan_buckets(sizes, bucket_bytes, alignment)


def test_align_up() -> None:
    assert [align_up(n, 256) for n in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 600), st.integers(0, 5000), st.sampled_from([0, 256, 1024, 1023, 1025])),
                   max_size=40),
    buckets_of=st.integers(1, 8),
    align_pow=st.integers(0, 8),
)
def test_plan_properties(sizes: list[int], buckets_of: int, align_pow: int) -> None:
    alignment = 1 << align_pow
    check_plan(sizes, buckets_of * max(alignment, 128), alignment)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 3000), max_size=64),
    st.integers(1, 16),
    st.integers(0, 9),
    st.integers(1, 70),
    st.integers(0, 4),
)
def test_vectorised_layout_equals_the_loop(sizes: list[int], buckets_of: int, align_pow: int, cap: int, ramp: int) -> None:
    """Short lists take the per-tensor loop; the vectorised path must lay out the same."""
    alignment = 1 << align_pow
    bucket_bytes = align_up(max([*sizes, 1]), alignment) * buckets_of
    loop = plan_buckets(sizes, bucket_bytes, alignment, max_entries=cap, ramp=ramp)
    assert _plan_unchunked(sizes, bucket_bytes, alignment, cap, ramp) == loop
    hot = bucket_bytes // 3  # and under a byte cap (shm.streaming.hot_bytes)
    loop = plan_buckets(sizes, bucket_bytes, alignment, max_entries=cap, ramp=ramp, max_bytes=hot)
    assert _plan_unchunked(sizes, bucket_bytes, alignment, cap, ramp, hot) == loop


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=65, max_size=400), st.integers(1, 8), st.integers(1, 500))
def test_long_unchunked_lists_keep_every_invariant(sizes: list[int], buckets_of: int, cap: int) -> None:
    check_plan(sizes, align_up(max(sizes) or 1, 256) * buckets_of, 256, cap)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 600), st.integers(0, 5000)), max_size=40),
    buckets_of=st.integers(1, 8),
    cap=st.integers(1, 5),
)
def test_entry_cap_holds_with_chunked_tensors(sizes: list[int], buckets_of: int, cap: int) -> None:
    check_plan(sizes, buckets_of * 256, 256, cap)


@settings(max_examples=600, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 600), st.integers(0, 5000)), max_size=120),
    buckets_of=st.integers(1, 16),
    cap=st.integers(1, 40),
    ramp=st.integers(0, 4),
    hot=st.one_of(st.just(0), st.integers(1, 4096)),  # 0: no byte cap
)
def test_ramp_and_byte_cap_keep_every_invariant(sizes: list[int], buckets_of: int, cap: int, ramp: int, hot: int) -> None:
    check_plan(sizes, buckets_of * 256, 256, cap, ramp, hot)


def test_a_byte_cap_makes_buckets_small_without_splitting_a_tensor_that_fits_a_bucket() -> None:
    """max_bytes (a quarter of the cache, for ranks to read a bucket from it): small tensors
    share buckets of at most max_bytes; a tensor above it but within a bucket travels whole,
    alone; one larger than a bucket is chunked in pieces of max_bytes."""
    plan = plan_buckets([1 << 20] * 10, 8 << 20, 256, max_bytes=3 << 20)
    assert [len(b.tensors) for b in plan] == [3, 3, 3, 1]
    plan = plan_buckets([1 << 20, 5 << 20, 1 << 20], 8 << 20, 256, max_bytes=2 << 20)
    assert [b.tensors for b in plan] == [[0], [1], [2]] and plan[1].nbytes == [5 << 20]
    plan = plan_buckets([10 << 20], 8 << 20, 256, max_bytes=4 << 20)
    assert [(b.chunks, b.nbytes) for b in plan] == [([0], [4 << 20]), ([4 << 20], [4 << 20]), ([8 << 20], [2 << 20])]
    assert plan_buckets([1 << 20] * 4, 8 << 20, 256, max_bytes=0) == plan_buckets([1 << 20] * 4, 8 << 20, 256)
    with pytest.raises(ConfigError, match="max_bytes must be >= 0"):
        plan_buckets([1], 4096, max_bytes=-1)


def test_a_plan_of_thousands_of_buckets_under_the_ramp() -> None:
    """The ramp's share is not computed past the bucket that is full anyway: 1.5 ** seq overflowed
    a float at ~1,750 buckets (28 GiB in 16 MiB buckets) and the push failed with OverflowError."""
    for sizes, bucket in (([1 << 20] * (28 * 1024), 16 << 20), ([4096] * 5000, 4096)):
        plan = plan_buckets(sizes, 256 << 20 if bucket > 4096 else bucket, 256, ramp=3, max_bytes=bucket)
        assert len(plan) > 1750 and plan[-1].tensors[-1] == len(sizes) - 1
    assert ramp_limits(10**6, 1 << 20, 16, 256, 3) == (1 << 20, 16)


def test_ramp_makes_the_first_buckets_small() -> None:
    """The ranks start after an eighth of a bucket, each next bucket 1.5 times the last; a tensor
    that fits a bucket is never split for the ramp; the ring (ramp 0) keeps full buckets."""
    plan = plan_buckets([1 << 20] * 32, 8 << 20, 256, ramp=3)  # 1, 1.5, 2.25, ... MiB, then 8
    assert [len(b.tensors) for b in plan] == [1, 1, 2, 3, 5, 7, 8, 5]
    plan = plan_buckets([4 << 20] * 4, 8 << 20, 256, ramp=3)
    assert [b.tensors for b in plan] == [[0], [1], [2], [3]]
    plan = plan_buckets([256] * 100, 1 << 20, 256, max_entries=16, ramp=2)
    assert [len(b.tensors) for b in plan][:5] == [4, 6, 9, 13, 16]
    assert [len(b.tensors) for b in plan_buckets([256] * 100, 1 << 20, 256, max_entries=16)][:2] == [16, 16]
    with pytest.raises(ConfigError, match="ramp"):
        plan_buckets([1], 4096, ramp=-1)


def test_entry_cap_splits_runs_of_small_tensors() -> None:
    plan = plan_buckets([256] * 10, 1 << 20, 256, max_entries=4)
    assert [b.tensors for b in plan] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.offsets for b in plan] == [[0, 256, 512, 768]] * 2 + [[0, 256]]
    with pytest.raises(WeightstreamError, match="max_entries"):
        plan_buckets([1], 4096, max_entries=0)
