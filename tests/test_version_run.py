"""VersionRun on real shared-memory slots: in-order bucket checks and direct copies.

The buckets are laid out by the sender's planner and packed by the shm transport
exactly as a push does; only the ZMQ hop is left out, so the receiver's checks can
be driven with frames a real sender never makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from weightstream.frameworks import bytes_view
from weightstream.protocol import messages as m
from weightstream.protocol.errors import ProtocolError
from weightstream.protocol.packed import pack_u64
from weightstream.protocol.transports.shm import TRANSPORT
from weightstream.receiver.prefetch import PrefetchQueue
from weightstream.receiver.version_run import VersionRun
from weightstream.sender.manifest import describe
from weightstream.sender.planner import plan_buckets

pytestmark = pytest.mark.timeout(60)

SLOT = 4096


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal((8, 8)).astype(np.float32),
        "big": rng.standard_normal(3000).astype(np.float32),  # 12000 bytes: chunked over 4 KiB slots
        "b": rng.integers(-9, 9, (5,), dtype=np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "c": rng.standard_normal((2, 3)).astype(np.float64),
    }


def packed(tensors: dict[str, np.ndarray]) -> Iterator[tuple[m.Begin, list[tuple[m.Bucket, Any]]]]:
    """BEGIN and every BUCKET with its slot (one slot per bucket, so all stay readable)."""
    manifest = describe(list(tensors.items()))
    plan = plan_buckets(manifest.nbytes, SLOT)
    begin = m.Begin.build(version="v1", names=manifest.names, dtypes=manifest.dtypes, shapes=manifest.shapes,
                          total_bytes=sum(manifest.nbytes), buckets=len(plan))
    exported = TRANSPORT.create_slots(len(plan), SLOT)
    try:
        buckets = []
        for bucket, slot in zip(plan, exported):
            for index, offset, nbytes, chunk in zip(bucket.tensors, bucket.offsets, bucket.nbytes, bucket.chunks):
                if nbytes:
                    slot.write(offset, slot.source_bytes(manifest.tensors[index]), chunk, nbytes)
            msg = m.Bucket.build(version="v1", seq=bucket.seq, slot=bucket.seq, first=bucket.tensors[0],
                                 offsets=bucket.offsets, nbytes=bucket.nbytes, chunks=bucket.chunks)
            buckets.append((m.decode(m.encode(msg)), TRANSPORT.open_slot(slot.descriptor())))
        yield begin, buckets
        for _, imported in buckets:
            imported.close()
    finally:
        for slot in exported:
            slot.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def new_run(begin: m.Begin, loop: asyncio.AbstractEventLoop, destination: Any = None, direct: bool = False) -> VersionRun:
    return VersionRun(begin, framework="numpy", queue=PrefetchQueue(16, loop), timeout=5.0,
                      on_ack=lambda seq, slot: None, destination=destination, direct=direct)


def feed(run: VersionRun, buckets: list[tuple[m.Bucket, Any]], loop: asyncio.AbstractEventLoop) -> None:
    for msg, slot in buckets:
        loop.run_until_complete(run.queue.put(run.prepare(msg, slot)))


@pytest.mark.parametrize("direct", [False, True])
def test_every_tensor_arrives_bit_exact(loop: asyncio.AbstractEventLoop, direct: bool) -> None:
    src = model(1)
    dst = {k: np.zeros_like(v) for k, v in model(2).items()}
    no_destination = {"c"}  # the sink has no place for it: load_weights must get it as a view

    def destination(name: str) -> np.ndarray | None:
        return None if name in no_destination else bytes_view(dst[name])

    for begin, buckets in packed(src):
        assert len(buckets) >= 4
        run = new_run(begin, loop, destination, direct)
        feed(run, buckets, loop)
        yielded = []
        for name, view in run.iterate():
            yielded.append(name)
            np.copyto(dst[name], view)
        assert run.complete and run.touched
    for name, arr in src.items():
        assert dst[name].tobytes() == arr.tobytes(), name
    # direct: whole tensors and in-place chunks never reach load_weights; without it all do,
    # except the chunked one, which is written into its destination in place either way
    assert set(yielded) == (no_destination if direct else set(src) - {"big"})


def changed(msg: m.Bucket, **fields: Any) -> m.Bucket:
    """``msg`` with some fields replaced; per-entry lists are packed as the wire does."""
    return replace(msg, **{k: pack_u64(v) if k in ("offsets", "nbytes", "chunks") else v for k, v in fields.items()})


def test_out_of_order_entry_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    for begin, buckets in packed(model(1)):
        run = new_run(begin, loop)
        run.prepare(*buckets[0])
        msg, slot = buckets[2]
        with pytest.raises(ProtocolError, match="'big': expected its bytes from offset 3840"):
            run.prepare(changed(msg, seq=1), slot)  # a piece of "big" left out


def test_bucket_that_skips_or_resizes_a_tensor_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    for begin, buckets in packed(model(1)):
        msg, slot = buckets[0]
        with pytest.raises(ProtocolError, match=r"'first': expected manifest index 0 \('a'\), got 1 \(buckets carry .* in order"):
            new_run(begin, loop).prepare(changed(msg, first=1), slot)
        _offsets, nbytes, _chunks = (a.tolist() for a in msg.arrays())
        with pytest.raises(ProtocolError, match="'a': expected its bytes from offset 0 on to its end \\(of 256\\), got a 200-byte"):
            new_run(begin, loop).prepare(changed(msg, nbytes=[200, *nbytes[1:]]), slot)
        with pytest.raises(ProtocolError, match=r"'a': .*got a 0-byte piece"):
            new_run(begin, loop).prepare(changed(msg, nbytes=[0, *nbytes[1:]]), slot)
        with pytest.raises(ProtocolError, match=r"'big': expected its bytes from offset 0 .*got a 3840-byte piece at 256"):
            new_run(begin, loop).prepare(changed(msg, chunks=[0, 256]), slot)


def test_entries_past_the_manifest_are_refused(loop: asyncio.AbstractEventLoop) -> None:
    for begin, buckets in packed(model(1)):
        run = new_run(begin, loop)
        for msg, slot in buckets[:-1]:
            run.prepare(msg, slot)
        msg, slot = buckets[-1]
        offsets, nbytes, chunks = (a.tolist() for a in msg.arrays())
        extra = changed(msg, offsets=[*offsets, 3840], nbytes=[*nbytes, 8], chunks=[*chunks, 0])
        with pytest.raises(ProtocolError, match="run past the 5 tensors"):
            run.prepare(extra, slot)


def test_repeated_bucket_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    for begin, buckets in packed(model(1)):
        run = new_run(begin, loop)
        run.prepare(*buckets[0])
        with pytest.raises(ProtocolError, match="seq"):
            run.prepare(*buckets[0])
