"""Micro-benchmarks of the per-tensor hot paths at 100k tensors, with pytest-benchmark.

Each checks what it computed, and each group has a baseline measured in the same run
(one memcpy of the same bytes; building the same number of plain tuples), so the table
reads as overhead per tensor. Not in the default test run (``testpaths = tests``):

    python -m pytest bench/micro --benchmark-columns=min,median,max

CI runs them once each with ``--benchmark-disable``, for the checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from weightstream import native as speedups
from weightstream.frameworks import bytes_view
from weightstream.gc_pause import gc_paused
from weightstream.protocol import messages as m
from weightstream.protocol.transports import get_transport
from weightstream.protocol.transports.shm import ShmExportedSlot, write_one
from weightstream.protocol.transports.shm import ring as shm_ring
from weightstream.sender.manifest import Manifest, describe
from weightstream.sender.planner import align_up, plan_buckets

N = 100_000
TENSOR_BYTES = 4096
ALIGN = 256

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 255, N * TENSOR_BYTES, dtype=np.uint8).view(np.float32)
    # separate arrays, as a trainer's parameters are, not views of one buffer
    return [(f"layers.{i // 8}.w{i % 8}", flat[i * 1024 : (i + 1) * 1024].copy()) for i in range(N)]


@pytest.fixture(scope="module")
def manifest(model: list[tuple[str, np.ndarray]]) -> Manifest:
    return describe(model)


@pytest.fixture
def slot() -> Iterator[ShmExportedSlot]:
    (exported,) = get_transport("shm").create_slots(1, N * TENSOR_BYTES)
    yield exported
    exported.close()


@pytest.mark.benchmark(group="describe 100k")
def test_describe_first_push(benchmark: Any, model: list[tuple[str, np.ndarray]]) -> None:
    got = benchmark(describe, model)
    assert len(got) == N and got.nbytes[0] == TENSOR_BYTES and got.names[-1] == model[-1][0]


@pytest.mark.benchmark(group="describe 100k")
def test_describe_unchanged_push(benchmark: Any, model: list[tuple[str, np.ndarray]], manifest: Manifest) -> None:
    got = benchmark(describe, model, manifest)
    assert got.names is manifest.names and got.tensors is not None and got.tensors[7] is model[7][1]


@pytest.mark.benchmark(group="describe 100k")
def test_baseline_one_tuple_per_tensor(benchmark: Any, model: list[tuple[str, np.ndarray]]) -> None:
    """The floor for anything that touches each tensor once from Python (collector paused, as describe's is)."""

    def one_tuple_each() -> list[tuple[str, Any, Any]]:
        with gc_paused():
            return [(name, t.dtype, t.shape) for name, t in model]

    got = benchmark(one_tuple_each)
    assert len(got) == N


@pytest.mark.benchmark(group="plan 100k")
def test_plan_buckets(benchmark: Any) -> None:
    sizes = [TENSOR_BYTES] * N
    plan = benchmark(plan_buckets, sizes, 64 << 20, ALIGN)
    placed = sorted(tensor for bucket in plan for tensor in bucket.tensors)
    assert placed == list(range(N))


@pytest.mark.benchmark(group="BEGIN 100k")
def test_begin_encode(benchmark: Any, manifest: Manifest) -> None:
    """A sender's session codec, as every push of an RL loop meets it: the same manifest again."""
    msg = m.Begin.build("v1", manifest.names, manifest.dtypes, manifest.shapes, sum(manifest.nbytes), 7)
    frame = benchmark(m.Codec().encode, msg)
    assert m.decode(frame).names == manifest.names


@pytest.mark.benchmark(group="BEGIN 100k")
def test_begin_decode(benchmark: Any, manifest: Manifest) -> None:
    """A rank's session codec, as every full BEGIN of an RL loop meets it: the same manifest again."""
    frame = m.encode(m.Begin.build("v1", manifest.names, manifest.dtypes, manifest.shapes, sum(manifest.nbytes), 7))
    got = benchmark(m.Codec().decode, frame)
    assert isinstance(got, m.Begin) and got.names == manifest.names and got.shapes()[5] == (1024,)


@pytest.mark.benchmark(group="BEGIN 100k")
def test_begin_decode_first(benchmark: Any, manifest: Manifest) -> None:
    """The first BEGIN of a session (or any BEGIN through the module's decode): every check."""
    frame = m.encode(m.Begin.build("v1", manifest.names, manifest.dtypes, manifest.shapes, sum(manifest.nbytes), 7))
    got = benchmark(m.decode, frame)
    assert isinstance(got, m.Begin) and got.names == manifest.names


@pytest.mark.benchmark(group="BUCKET and ACK: per-message cost")
def test_bucket_encode_decode(benchmark: Any) -> None:
    """A packed BUCKET out and an ACK back, through session codecs: what every bucket costs the
    control plane on both sides, whatever its size."""
    sender, rank = m.Codec(), m.Codec()
    bucket = m.Bucket(version="step_100", seq=7, slot=1, first=4096, offsets=b"", nbytes=b"", chunks=b"", count=512)
    ack = m.Ack(version="step_100", seq=7)

    def round_trip() -> m.Message:
        rank.decode(sender.encode(bucket))
        return sender.decode(rank.encode(ack))

    assert benchmark(round_trip) == ack and rank.decode(sender.encode(bucket)) == bucket


@pytest.mark.benchmark(group="copy 100k x 4 KiB into a slot")
def test_write_tensors(benchmark: Any, slot: ShmExportedSlot, manifest: Manifest, model: list[tuple[str, np.ndarray]]) -> None:
    tensors = [t for _, t in model]
    offsets = [align_up(i * TENSOR_BYTES, ALIGN) for i in range(N)]
    left = benchmark(slot.write_tensors, offsets, tensors, manifest.nbytes)
    assert left is None
    written = slot.host_view()[: N * TENSOR_BYTES]
    same = np.array_equal(written, np.concatenate(tensors).view(np.uint8))  # bytes: random floats hold NaNs
    del written  # no view may outlive the slot
    assert same


@pytest.mark.benchmark(group="copy 100k x 4 KiB into a slot")
def test_baseline_one_memcpy_of_the_same_bytes(benchmark: Any, slot: ShmExportedSlot, model: list[tuple[str, np.ndarray]]) -> None:
    source = np.concatenate([t for _, t in model]).view(np.uint8)
    target = slot.host_view()[: source.nbytes]
    slot.write_tensors([0], [source], [source.nbytes])  # fault the pages in, as the ring's slots are
    benchmark(np.copyto, target, source)
    same = np.array_equal(target, source)
    del target
    assert same


@pytest.mark.benchmark(group="copy 100k x 4 KiB into a slot")
def test_baseline_one_streaming_copy_of_the_same_bytes(
    benchmark: Any, slot: ShmExportedSlot, model: list[tuple[str, np.ndarray]]
) -> None:
    """The copy ``write_tensors`` makes into a slot past the cache's size, in one piece: what is
    left over it is the cost per tensor."""
    source = np.concatenate([t for _, t in model]).view(np.uint8)
    target = slot.host_view()[: source.nbytes]
    slot.write_tensors([0], [source], [source.nbytes])
    benchmark(speedups.copy, target, source, slot.streams)
    same = np.array_equal(target, source)
    del target
    assert same


@pytest.mark.benchmark(group="copy 100k x 4 KiB out of a slot")
def test_scatter_into_separate_arrays(benchmark: Any, slot: ShmExportedSlot, model: list[tuple[str, np.ndarray]]) -> None:
    """A rank's direct copy: each tensor from the slot into its own parameter array, as a
    model's parameters are separate allocations (the C scatter, by streaming stores, to the
    addresses a rank reads once per layout)."""
    source = np.concatenate([t for _, t in model]).view(np.uint8)
    slot.write_tensors([0], [source], [source.nbytes])
    targets = [np.empty_like(t) for _, t in model]
    views = [bytes_view(t) for t in targets]
    offsets, sizes = np.arange(N, dtype=np.uint64) * TENSOR_BYTES, np.full(N, TENSOR_BYTES, np.uint64)
    addresses = np.frombuffer(speedups.destinations(views, sizes.tolist()) or b"", np.uint64)  # once per layout
    raw = slot.host_view()
    done = benchmark(speedups.scatter, raw, offsets, sizes, addresses, 0, slot.streams)
    del raw
    assert done == N and all(np.array_equal(a.view(np.uint8), t.view(np.uint8)) for a, (_, t) in zip(targets, model))


@pytest.mark.benchmark(group="copy 100k x 4 KiB out of a slot")
def test_baseline_one_streaming_copy_out_of_the_slot(benchmark: Any, slot: ShmExportedSlot, model: list[tuple[str, np.ndarray]]) -> None:
    source = np.concatenate([t for _, t in model]).view(np.uint8)
    slot.write_tensors([0], [source], [source.nbytes])
    target = np.empty_like(source)
    target.fill(0)
    raw = slot.host_view()[: source.nbytes]
    benchmark(speedups.copy, target, raw, slot.streams)
    del raw
    assert np.array_equal(target, source)


@pytest.fixture
def ring_slot(monkeypatch: pytest.MonkeyPatch) -> Iterator[ShmExportedSlot]:
    monkeypatch.setenv(shm_ring.ENV, str(4 << 20))
    (exported,) = get_transport("shm").create_slots(1, 64 << 20)
    if exported.ring is None:
        exported.close()
        pytest.skip("no ring here (weightstream.native._ring not built)")
    yield exported
    exported.close()


@pytest.mark.benchmark(group="copy 100k x 4 KiB through a 4 MiB ring, no rank reading")
def test_ring_write_tensors(benchmark: Any, ring_slot: ShmExportedSlot, manifest: Manifest,
                            model: list[tuple[str, np.ndarray]]) -> None:
    """The sender's side of a push through rings (64 MiB buckets): the gather run by run, with a
    space check before each run and a counter after it."""
    ring = ring_slot.ring
    assert ring is not None
    plan = plan_buckets(manifest.nbytes, 64 << 20, ALIGN)
    runs = shm_ring.ring_plan(plan, manifest.nbytes, ring.ring_bytes)
    items = tuple(t for _, t in model)

    def push() -> None:
        for bucket in plan:
            ring.begin([], lambda: None, 5.0)
            if ring.write_tensors(items, runs, bucket.seq, write_one) is not None:
                raise AssertionError("a tensor did not fit its plan")

    benchmark(push)
    last = plan[-1]  # the ring holds the end of the last bucket: its last tensors, whole
    for k in (-1, -2, -500):
        at = last.offsets[k] % ring.ring_bytes
        assert np.array_equal(ring.view[at : at + TENSOR_BYTES], items[last.tensors[k]].view(np.uint8))


@pytest.mark.benchmark(group="copy 100k x 4 KiB through a 4 MiB ring, no rank reading")
def test_baseline_the_same_bytes_through_the_ring_in_pieces(
    benchmark: Any, ring_slot: ShmExportedSlot, model: list[tuple[str, np.ndarray]]
) -> None:
    ring = ring_slot.ring
    assert ring is not None
    source = np.concatenate([t for _, t in model]).view(np.uint8)

    def push() -> None:
        ring.begin([], lambda: None, 5.0)
        ring.write(0, source, 0, source.nbytes)

    benchmark(push)
    at = (source.nbytes - TENSOR_BYTES) % ring.ring_bytes
    assert np.array_equal(ring.view[at : at + TENSOR_BYTES], source[-TENSOR_BYTES:])
