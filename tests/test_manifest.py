"""A version whose manifest does not match the model is rejected before any byte is written."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import workers as w

from weightstream import BucketSender, ManifestMismatch, ReceiverDaemon
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(60)

BUCKET = 4096


def model() -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in w.make_weights(w.NUMPY_SPECS, 5).items()}


def good_version(seed: int) -> dict[str, np.ndarray]:
    return w.make_weights(w.NUMPY_SPECS, seed)


def fingerprint(state: dict[str, Any]) -> dict[str, w.Digest]:
    return {k: w.digest(v) for k, v in state.items()}


def _missing(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    v = dict(v)
    del v["layers.0.mlp.up"]
    return v, "layers.0.mlp.up"


def _unexpected(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    return {**v, "layers.9.extra.weight": np.zeros(4, np.float32)}, "layers.9.extra.weight"


def _wrong_shape(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    return {**v, "layers.0.attn.qkv.bias": np.zeros(47, np.float32)}, "layers.0.attn.qkv.bias"


def _wrong_dtype(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    return {**v, "embed.weight": np.zeros((33, 16), np.float16)}, "embed.weight"


@pytest.mark.parametrize("corrupt", [_missing, _unexpected, _wrong_shape, _wrong_dtype], ids=lambda f: f.__name__[1:])
def test_mismatch_rejected_model_untouched_then_next_version_served(endpoint: str, corrupt: Any) -> None:
    state = model()
    before = fingerprint(state)
    bad, offender = corrupt(good_version(1))
    with BucketSender(endpoint, bucket_bytes=BUCKET, num_buffers=2, timeout=30) as sender:
        with ReceiverDaemon(endpoint, NumpySink(state), rank=1, heartbeat_interval=0.2) as daemon:
            with pytest.raises(ManifestMismatch) as info:
                sender.push(bad.items(), version="bad")
            assert offender in str(info.value)
            assert info.value.rank == 1
            assert fingerprint(state) == before, "a rejected version touched the model"
            status = daemon.status
            assert status.model_intact and status.committed_version is None
            assert status.last_error is not None and offender in status.last_error
            with pytest.raises(ManifestMismatch):
                daemon.wait_for_version("bad", timeout=5)

            good = good_version(2)
            sender.push(good.items(), version="good")
            daemon.wait_for_version("good", timeout=10)
            assert fingerprint(state) == fingerprint(good)
            assert daemon.status.model_intact


def test_expected_specs_for_a_plain_callable(endpoint: str) -> None:
    """expected= gives a plain load_weights callable the same check as a sink."""
    got: list[str] = []

    def load_weights(weights: Any) -> None:
        got.extend(name for name, _ in weights)

    specs = {"w": ("float32", (4,)), "b": ("int64", ())}
    with BucketSender(endpoint, bucket_bytes=BUCKET, timeout=30) as sender:
        with ReceiverDaemon(endpoint, load_weights, expected=specs, heartbeat_interval=0.2) as daemon:
            with pytest.raises(ManifestMismatch, match=r"'?b'?"):
                sender.push([("w", np.zeros(4, np.float32)), ("b", np.zeros(1, np.int64))], version="bad")
            assert got == [], "load_weights ran for a rejected version"
            sender.push([("w", np.zeros(4, np.float32)), ("b", np.array(3, np.int64))], version="ok")
            assert daemon.committed_version == "ok" and sorted(got) == ["b", "w"]


def test_one_of_two_ranks_rejects(endpoint: str) -> None:
    """One rank's mismatch fails the whole version; the other rank's model is untouched too."""
    s0, s1 = model(), {k: v for k, v in model().items() if k != "stats.ids"}
    before0, before1 = fingerprint(s0), fingerprint(s1)
    with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, timeout=30) as sender:
        with ReceiverDaemon(endpoint, NumpySink(s0), rank=0, heartbeat_interval=0.2) as d0, \
                ReceiverDaemon(endpoint, NumpySink(s1), rank=1, heartbeat_interval=0.2) as d1:
            with pytest.raises(ManifestMismatch) as info:
                sender.push(good_version(3).items(), version="v")
            assert "stats.ids" in str(info.value) and info.value.rank == 1
            assert fingerprint(s0) == before0 and fingerprint(s1) == before1
            assert d0.committed_version is None and d1.committed_version is None
