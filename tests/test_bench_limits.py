"""The bench's own measuring: the two-copy ceiling at any model size, and the paired memcpy ratio."""

from __future__ import annotations

import os

import pytest

from bench import handoff

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("nbytes", [(3 << 20) + 1000, (70 << 20) + 1000])
def test_the_handoff_yardstick_sweeps_its_slot_sizes_and_verifies(nbytes: int, readers: int) -> None:
    """Odd sizes: the last slot of every size is partial; no slot size past the first that holds
    the whole model is tried. Each reader checks every byte (a wrong byte raises)."""
    best, times, medians = handoff.sweep(nbytes, readers, repeats=1)
    assert list(medians) == [s for s in handoff.SLOT_SIZES if s < 2 * nbytes][: len(medians)]
    assert max(medians) >= nbytes > max(medians) // 2
    assert best in medians and len(times) == 1 and times[0] > 0


def test_the_handoff_leaves_no_segment_behind() -> None:
    with handoff.Handoff(1 << 20) as pipe:
        assert not os.path.exists(pipe.path), "unlinked once mapped: nothing left even if the bench is killed"
        assert pipe.run(1 << 20) > 0
    assert not os.path.exists(pipe.path)


def test_a_weightstream_row_pairs_each_version_with_a_memcpy_of_the_same_bytes() -> None:
    """The ratio to memcpy is taken per version against a memcpy timed just before it, and
    the small-vs-large comparison uses each row's own paired ratio."""
    from bench import throughput
    from weightstream import synthetic

    model = synthetic.many_small(count=300, nbytes=4096)
    row = throughput.peer_row("weightstream", "small", model, receivers=1, bucket=1 << 20, buffers=2, prefetch=2,
                              versions=3)
    assert row.verified and row.error is None, row.error
    assert len(row.paired_memcpy) == len(row.seconds) == 3 and all(t > 0 for t in row.paired_memcpy)
    assert row.paired_ratio == sorted(m / s for m, s in zip(row.paired_memcpy, row.seconds))[1]

    large = throughput.Row("large_same", "weightstream", 4, row.bytes, 1, 1, 2, 2, seconds=[1.0, 2.0],
                           paired_memcpy=[0.5, 0.5])
    small = throughput.Row("small", "weightstream", 300, row.bytes, 1, 1, 2, 2, seconds=[2.0, 3.0],
                           paired_memcpy=[1.0, 1.0])
    plan = throughput.Plan(shapes=["small", "large_same"], size=0, methods=["weightstream"], receivers=[1],
                           buckets=[1], buffers=[2], prefetch=[2], versions=2, default_bucket=1)
    (s, _) = throughput.ratios([small, large], plan)
    assert s["vs_memcpy_paired"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert s["time_vs_large_same_bytes_paired"] == pytest.approx(((0.5 + 0.25) / 2) / ((1 / 2 + 1 / 3) / 2))


def test_the_hot_floor_times_the_engine_copies_only_and_copies_every_tensor() -> None:
    """floor[numpy,hot]: each tensor goes through the scratch, the engine's loop copies it into
    its model, and the time left out is the scratch's fill."""
    import numpy as np

    from bench import engine
    from weightstream import synthetic

    model = synthetic.few_large(8 << 20, count=4)
    dest = {name: np.zeros_like(a) for name, a in model.tensors}
    timed = engine.hot_floor_timer(model, dest)
    assert timed() > 0
    for name, a in model.tensors:
        assert np.array_equal(dest[name].view(np.uint8), a.view(np.uint8)), name


def test_the_busy_floor_times_the_engine_loop_while_memory_streams_beside_it() -> None:
    """floor[numpy,busy]: the engine's loop copies every tensor into its model while the busy
    thread runs, and the thread is gone once the timer returns."""
    import threading

    import numpy as np

    from bench import engine
    from weightstream import synthetic

    model = synthetic.few_large(8 << 20, count=4)
    dest = {name: np.zeros_like(a) for name, a in model.tensors}
    timed = engine.busy_floor_timer(model, dest)
    assert timed() > 0
    assert not any(t.name == "floor-busy" for t in threading.enumerate())
    for name, a in model.tensors:
        assert np.array_equal(dest[name].view(np.uint8), a.view(np.uint8)), name


@pytest.mark.parametrize(
    ("medians", "largest", "expected"),
    [
        ({1 << 20: 3.0, 4 << 20: 1.0, 16 << 20: 2.0, 256 << 20: 1.5}, 16 << 20, 256 << 20),  # best of those that hold it
        ({1 << 20: 3.0, 4 << 20: 1.0, 16 << 20: 1.2, 256 << 20: 1.5}, 8 << 20, 16 << 20),  # a slot larger than it
        ({1 << 20: 3.0, 4 << 20: 1.0, 16 << 20: 2.0}, 4 << 20, None),  # the best slot holds it: no other bound
        ({1 << 20: 3.0, 4 << 20: 1.0}, 400 << 20, None),  # no slot holds it
        ({1 << 20: 1.0}, 4096, None),
    ],
)
def test_the_whole_tensor_bound_is_the_best_slot_that_holds_the_largest_tensor(
    medians: dict[int, float], largest: int, expected: int | None
) -> None:
    from bench import engine

    assert engine.whole_slot(medians, largest) == expected
