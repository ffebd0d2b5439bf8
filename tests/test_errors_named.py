"""Mistakes a user makes get an error that names the offending tensor, argument or step and the fix,
at the call that made them (the constructor, the push), never later in another thread."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weightstream import BucketSender, ReceiverDaemon, RemoteError, WeightstreamError

pytestmark = pytest.mark.timeout(60)
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 2.0}


def _bad_tensors() -> dict[str, tuple[Any, str]]:
    torch = pytest.importorskip("torch")
    return {
        "complex": (torch.zeros(2, dtype=torch.complex64), "dtype torch.complex64 is not supported"),
        "not_a_tensor": ([1.0, 2.0], "got list"),
        "meta": (torch.zeros(3, device="meta"), "meta device"),
        "sparse": (torch.eye(3).to_sparse(), "dense (strided)"),
        "numpy_complex": (np.zeros(2, np.complex128), "dtype complex128 is not supported"),
    }


@pytest.mark.parametrize("case", ["complex", "not_a_tensor", "meta", "sparse", "numpy_complex"])
def test_push_names_the_tensor_it_cannot_send(endpoint: str, case: str) -> None:
    bad, says = _bad_tensors()[case]
    with BucketSender(endpoint, bucket_bytes=1 << 16, timeout=5, **HB) as sender:
        with pytest.raises(WeightstreamError) as info:  # before waiting for any receiver
            sender.push([("layers.0.ok", np.zeros(4, np.float32)), ("layers.1.bad", bad)], version="v1")
    text = str(info.value)
    assert "'layers.1.bad'" in text and says in text and "fix" in text, text


def test_load_weights_error_names_the_tensor_it_was_given_last(endpoint: str) -> None:
    seen: list[str] = []

    def load_weights(weights: Any) -> None:
        for name, _tensor in weights:
            seen.append(name)
            if name == "b":
                raise KeyError("no such parameter in this engine")

    named = [(n, np.full(8, i, np.float32)) for i, n in enumerate("abc")]
    with ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(RemoteError) as info:
            sender.push(named, version="v1")
        assert "while loading tensor 'b'" in str(info.value) and info.value.remote_type == "KeyError", str(info.value)
        assert "while loading tensor 'b'" in (daemon.status.last_error or "")


def mixed_batches() -> list[tuple[str, np.ndarray]]:
    """300 tensors in one bucket that the rank views in batches (runs of one shape) and apiece."""
    named: list[tuple[str, np.ndarray]] = []
    for i in range(300):
        shape = (4,) if i < 100 else () if i == 100 else (2, 3) if i < 200 else (7 + i % 2,)
        named.append((f"t{i}", np.full(shape, i, np.float32)))
    return named


@pytest.mark.parametrize("stop_at", [0, 57, 137, 250, 299])
def test_load_weights_error_in_a_batch_of_views_names_its_tensor(endpoint: str, stop_at: int) -> None:
    named = mixed_batches()

    def load_weights(weights: Any) -> None:
        for name, tensor in weights:
            if name == f"t{stop_at}":
                raise KeyError("no such parameter in this engine")
            assert float(np.asarray(tensor).reshape(-1)[0]) == int(name[1:])

    with ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(RemoteError) as info:
            sender.push(named, version="v1")
        assert f"while loading tensor 't{stop_at}'" in str(info.value), str(info.value)
        assert daemon.status.committed_version is None


@pytest.mark.parametrize("stop_after", [1, 137, 299])
def test_load_weights_returning_early_in_a_batch_is_counted(endpoint: str, stop_after: int) -> None:
    named = mixed_batches()

    def load_weights(weights: Any) -> None:
        for k, _ in enumerate(weights):
            if k + 1 == stop_after:
                return

    with ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, **HB), BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(WeightstreamError) as info:
            sender.push(named, version="v1")
        assert f"after applying {stop_after} of 300 tensors" in str(info.value), str(info.value)


def test_a_defect_while_a_rank_prepares_a_bucket_fails_the_push_at_once(endpoint: str) -> None:
    """A plain exception (not a WeightstreamError) from a transport on the rank's side fails the
    version with its type and text within moments, not when the push's timeout runs out."""
    import time

    import buggy_transport

    named = [("w", np.ones(8, np.float32))]
    with ReceiverDaemon(endpoint, lambda weights: [None for _ in weights], framework="numpy", rank=0,
                        **HB) as daemon, BucketSender(endpoint, transport=buggy_transport.NAME, timeout=60, **HB) as sender:
        sender.wait_for_receivers(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(WeightstreamError) as info:
            sender.push(named, version="v1")
        assert time.monotonic() - t0 < 10, "the push waited for its timeout"
        text = str(info.value)
        assert "RuntimeError" in text and "a defect in this transport's raw()" in text and "bucket 0" in text, text
        assert daemon.status.connected and daemon.status.committed_version is None


def test_a_wrong_framework_fails_in_the_constructor(endpoint: str) -> None:
    with pytest.raises(WeightstreamError, match=r"framework='pytorch': expected one of numpy, paddle, torch"):
        ReceiverDaemon(endpoint, lambda weights: None, framework="pytorch", rank=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["/tmp/ws/gpu0.sock", "localhost:5555"])
def test_an_endpoint_without_a_scheme_is_named_as_such(bad: str) -> None:
    for make in (lambda: BucketSender(bad), lambda: ReceiverDaemon(bad, lambda weights: None, framework="numpy")):
        with pytest.raises(WeightstreamError) as info:
            make()
        text = str(info.value)
        assert "has no scheme" in text and "ipc://" in text and "CURVE" not in text, text


def test_wait_for_version_before_start_says_so(endpoint: str) -> None:
    daemon = ReceiverDaemon(endpoint, lambda weights: None, framework="numpy", rank=0)
    with pytest.raises(WeightstreamError, match=r"not running; call daemon.start\(\) first"):
        daemon.wait_for_version("v1", timeout=1)
