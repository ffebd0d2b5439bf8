"""Every dtype reaches load_weights as a bit-exact, correctly typed view in each framework."""

from __future__ import annotations

import numpy as np
import pytest

from weightstream import BucketSender, ReceiverDaemon
from weightstream.frameworks import module
from weightstream.protocol.dtypes import DTYPES

pytestmark = pytest.mark.timeout(60)


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    model = {}
    for d in DTYPES:
        raw = rng.integers(0, 256, size=6 * 5 * d.itemsize, dtype=np.uint8)
        model[f"t.{d.name}"] = raw.view(d.numpy).reshape(6, 5)
        model[f"s.{d.name}"] = raw[: d.itemsize].view(d.numpy).reshape(())
    return model


@pytest.mark.parametrize("framework", ["numpy", "torch", "paddle"])
def test_every_dtype_as_a_view_of_each_framework(endpoint: str, framework: str) -> None:
    if framework != "numpy":
        pytest.importorskip(framework)
    model = _model()
    seen: dict[str, tuple[object, tuple[int, ...], bytes]] = {}

    def load(weights):
        for name, tensor in weights:
            if framework == "numpy":
                raw = tensor.tobytes()
            elif framework == "torch":
                raw = tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
            else:
                raw = np.from_dlpack(tensor.contiguous().reshape([-1]).view("uint8")).tobytes()
            seen[name] = (tensor.dtype, tuple(tensor.shape), raw)

    daemon = ReceiverDaemon(endpoint, load, rank=0, framework=framework).start()
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=4096, timeout=30) as sender:
            sender.push(model.items(), version="v1")
    finally:
        daemon.stop()
    assert set(seen) == set(model)
    for d in DTYPES:
        want = module(framework).native_dtype(d)
        for name in (f"t.{d.name}", f"s.{d.name}"):
            dtype, shape, raw = seen[name]
            assert raw == model[name].tobytes(), name
            assert shape == model[name].shape, name
            assert dtype == want, (name, dtype, want)
