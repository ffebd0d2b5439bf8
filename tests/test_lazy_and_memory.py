"""Lazy pushes from a generator, and bounded memory on both sides."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
from memory_workers import MiB, lazy_sender, preallocated_receiver

from weightstream import BucketSender, ReceiverDaemon, WeightstreamError
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(120)


def _specs(model: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (str(a.dtype), a.shape) for name, a in model.items()}


@pytest.fixture
def served(endpoint: str):
    model = {
        "embed": np.arange(3000, dtype=np.float32),  # chunked through 4 KiB buckets
        "layers.0.w": np.full((7, 9), 3, np.int16),
        "norm": np.array(1.5, np.float64),
    }
    state = {k: np.zeros_like(v) for k, v in model.items()}
    daemon = ReceiverDaemon(endpoint, NumpySink(state), rank=0).start()
    try:
        yield model, state, daemon
    finally:
        daemon.stop()


def test_lazy_push_is_bit_exact_and_pulls_on_demand(endpoint: str, served) -> None:
    model, state, _ = served
    pulled: list[str] = []

    def make():
        for name, array in model.items():
            pulled.append(name)
            yield name, array.copy()

    with BucketSender(endpoint, receivers=1, bucket_bytes=4096, timeout=30) as sender:
        sender.push(make(), version="v1", specs=_specs(model))
    assert pulled == list(model)
    for name, array in model.items():
        assert state[name].tobytes() == array.tobytes()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda items: [(("wrong" if n == "layers.0.w" else n), a) for n, a in items], "expected 'layers.0.w'"),
        (lambda items: items[:2], "ended before 'norm'"),
        (lambda items: [*items, ("extra", np.zeros(2, np.int8))], "ran past"),
        (lambda items: [(n, a.astype(np.float64) if n == "layers.0.w" else a) for n, a in items], "int16"),
    ],
    ids=["wrong-name", "too-few", "too-many", "wrong-dtype"],
)
def test_lazy_tensors_that_break_their_specs_abort_the_version(endpoint: str, served, mutate, match) -> None:
    model, state, daemon = served
    with BucketSender(endpoint, receivers=1, bucket_bytes=4096, timeout=30) as sender:
        with pytest.raises(WeightstreamError, match=match):
            sender.push(iter(mutate(list(model.items()))), version="bad", specs=_specs(model))
        assert daemon.committed_version is None
        sender.push(model.items(), version="good")  # the rank still serves
    assert daemon.committed_version == "good"
    assert all(state[n].tobytes() == a.tobytes() for n, a in model.items())


def test_bad_specs_are_refused_with_the_expected_form(endpoint: str) -> None:
    with BucketSender(endpoint, receivers=1, timeout=5) as sender:
        with pytest.raises(WeightstreamError, match=r"expected \(dtype name, shape\)"):
            sender.push(iter([]), version="v", specs={"w": "float32"})


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize(
    ("mode", "count", "nbytes"),
    [("direct", 8, 64 * MiB), ("views", 8, 64 * MiB), ("views", 65536, 4096)],
    ids=["direct-chunked", "views-chunked", "views-64k-small"],
)
def test_memory_stays_bounded_on_both_sides(endpoint: str, mode: str, count: int, nbytes: int) -> None:
    """Tensors made lazily, through 2 x 32 MiB slots, into a rank that copies them itself
    (direct) or a load_weights that copies each view (views): 8 x 64 MiB (every tensor chunked)
    and 64k x 4 KiB (views made in batches, as the consumer takes them)."""
    bucket = 32 * MiB
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    receiver = ctx.Process(target=preallocated_receiver, args=(endpoint, count, nbytes, out, mode))
    sender = ctx.Process(target=lazy_sender, args=(endpoint, count, nbytes, bucket, out))
    receiver.start()
    sender.start()
    try:
        results = {}
        for _ in range(2):
            kind, *values = out.get(timeout=100)
            results[kind] = values
    finally:
        for proc in (sender, receiver):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    model_bytes = count * nbytes
    (sender_growth,) = results["sender"]
    receiver_growth, exact = results["receiver"]
    print(f"model {model_bytes / MiB:.0f} MiB; peak RSS growth: sender {sender_growth / MiB:.0f} MiB, "
          f"receiver {receiver_growth / MiB:.0f} MiB")
    assert exact
    # The sender holds one tensor (plus the one being made) and its slots, never the model.
    assert sender_growth < 2 * bucket + 2 * nbytes + 48 * MiB < model_bytes
    # The receiver writes into its params (itself or through load_weights): only the mapped
    # slots are extra, and no view outlives what load_weights took. A tensor larger than a bucket
    # that load_weights takes as a view is assembled in scratch first, and the engine's loop
    # variable keeps the last one alive while the next is assembled: two such tensors more.
    scratch = 2 * nbytes if mode == "views" and nbytes > bucket else 0
    assert receiver_growth <= 2 * bucket + scratch + 48 * MiB
