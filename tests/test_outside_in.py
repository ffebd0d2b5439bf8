"""Regressions found by trying the README as a stranger would and by review: a snapshot tee in
front of a tied model, a rank restarted between pushes, the tensor a staged load_weights failed
on, a trainer-side exception in the middle of a push, ties that change between pushes, a torn
rank reported as such in later pushes, and no fd left by a refused WELCOME."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_workers import HB, ReceiverProc, digests, make_weights, wait_until

from weightstream import BucketSender, ReceiverDaemon, RemoteError, VersionAborted, WeightstreamError
from weightstream.receiver.sinks import NumpySink

pytestmark = pytest.mark.timeout(90)


def test_a_snapshot_tee_checks_a_tied_model_as_the_model_does(endpoint: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from weightstream.receiver.sinks import TorchModuleSink
    from weightstream.receiver.snapshot_writer import SnapshotWriter, Tee

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(32, 8)
            self.head = torch.nn.Linear(8, 32, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)

    trainer, rank_model = Tiny(), Tiny()
    with torch.no_grad():
        trainer.embed.weight.normal_()
    tee = Tee(TorchModuleSink(rank_model), SnapshotWriter(tmp_path, rank=0))
    with ReceiverDaemon(endpoint, tee, rank=0, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=30, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        # named_parameters() lists the tied matrix once and no buffer: the model has both covered
        report = sender.push(trainer.named_parameters(), version="step_1")
        assert report.committed and daemon.status.model_intact
    assert torch.equal(rank_model.head.weight, trainer.embed.weight) and rank_model.head.weight is rank_model.embed.weight


def test_a_rank_restarted_between_pushes_gets_the_push_timeout_to_come_back(endpoint: str) -> None:
    with BucketSender(endpoint, timeout=30, **HB) as sender:
        rank = ReceiverProc(endpoint, 0)
        try:
            assert rank.wait_connected()
            sender.push(make_weights(1, "v1"), version="v1")
        finally:
            rank.kill()  # kill -9 between pushes; the sender still holds its connection
        rank = ReceiverProc(endpoint, 0)  # the orchestrator restarts it at once
        try:
            sender.push(make_weights(2, "v2"), version="v2")  # waits for it instead of failing on the dead one
            assert wait_until(lambda: rank.status()["committed"] == "v2", 10)
            assert rank.request(cmd="status", digests=True)["digests"] == digests(make_weights(2, "v2"))
        finally:
            rank.stop()


def test_a_staged_load_weights_failure_names_the_tensor_it_was_given(endpoint: str) -> None:
    def load_weights(weights: Any) -> None:
        for name, _ in weights:
            if name == "b":
                raise KeyError(f"engine has no {name}")

    named = [(n, np.full(8, i, np.float32)) for i, n in enumerate("abc")]
    with ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, staged=True, **HB), BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(RemoteError) as info:
            sender.push(named, version="v1")
    assert "while loading tensor 'b'" in str(info.value) and "after COMMIT" in str(info.value), str(info.value)


@pytest.mark.timeout(60)
def test_an_iterator_kept_from_a_failed_version_ends_at_once_when_asked_again(endpoint: str) -> None:
    """load_weights keeps its iterator and raises mid-version; the next version's load_weights asks
    that old iterator first: it raises at once (not after apply_timeout, with the apply thread
    stuck and every later push timing out), and the next version commits."""
    kept: list[Any] = []
    asked: list[str] = []

    def load_weights(weights: Any) -> None:
        if kept:
            try:
                for _ in kept.pop():
                    pass
            except WeightstreamError as exc:
                asked.append(type(exc).__name__)
        it = iter(weights)
        for name, _ in it:
            if name == "t5" and not asked:
                kept.append(it)
                raise RuntimeError("the engine gave up")

    named = [(f"t{i}", np.full(256, i, np.float32)) for i in range(40)]
    with ReceiverDaemon(endpoint, load_weights, framework="numpy", rank=0, apply_timeout=120, **HB), BucketSender(
        endpoint, bucket_bytes=4096, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(RemoteError, match="the engine gave up"):
            sender.push(named, version="v1")
        t0 = time.perf_counter()
        sender.push(named, version="v2")  # the old iterator raised at once: v2 went through
        assert time.perf_counter() - t0 < 10
    assert asked == ["VersionAborted"]


def test_a_trainer_side_exception_mid_push_is_typed_and_carries_the_report(endpoint: str) -> None:
    specs = {"a": ("float32", (8,)), "b": ("float32", (8,))}

    def tensors() -> Any:
        yield "a", np.zeros(8, np.float32)
        raise RuntimeError("the gather of shard 3 failed")

    seen: list[str] = []
    with ReceiverDaemon(endpoint, lambda w: seen.extend(n for n, _ in w), framework="numpy", rank=0, **HB), BucketSender(
        endpoint, bucket_bytes=1 << 16, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(VersionAborted) as info:
            sender.push(tensors(), version="v1", specs=specs)
    err = info.value
    assert isinstance(err.__cause__, RuntimeError) and "gather of shard 3" in str(err)
    assert err.report is not None and not err.report.committed and err.report.receivers[0].outcome == "aborted"


def test_a_rank_that_unties_two_tensors_between_pushes_gets_both_written(endpoint: str) -> None:
    """Both tensors are chunked (bigger than a bucket), so chunk-only buckets come first: the
    rank's ties must be those of its model now, not of the last version."""
    n = 3 * (1 << 20) // 2 // 4  # 1.5 MiB of float32 each, 1 MiB buckets
    shared = np.zeros(n, np.float32)
    state = {"a": shared, "b": shared, "c": np.zeros(16, np.float32)}  # a and b tied on the rank

    def version(x: float) -> list[tuple[str, np.ndarray]]:
        return [("a", np.full(n, x, np.float32)), ("b", np.full(n, x, np.float32)), ("c", np.full(16, x, np.float32))]

    with ReceiverDaemon(endpoint, NumpySink(state), rank=0, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=1 << 20, timeout=20, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=10)
        assert sender.push(version(1.0), version="step_1").committed
        state["b"] = state["b"].copy()  # untied: b has its own memory now
        assert sender.push(version(2.0), version="step_2").committed
        assert (state["a"] == 2.0).all() and (state["b"] == 2.0).all() and daemon.status.model_intact
        state["b"] = state["a"]  # tied again, and the trainer sends different values
        with pytest.raises(WeightstreamError, match="'a' and 'b' are one tensor"):
            sender.push([("a", np.full(n, 3.0, np.float32)), ("b", np.full(n, 4.0, np.float32)),
                         ("c", np.full(16, 3.0, np.float32))], version="step_3")


def test_a_torn_rank_says_so_in_every_later_report(endpoint: str) -> None:
    state = {"w": np.zeros(1000, np.float32)}
    fail = {"on": True}
    ranks: dict[int, ReceiverDaemon] = {}

    def refusing(weights: Any) -> None:
        for _ in weights:
            pass
        if fail["on"]:
            # only once rank 0 holds step_1 in its model (PREPARED, applied in place) is it torn
            # by the abort this causes; otherwise the abort may overtake its apply
            wait_until(lambda: 0 in ranks and ranks[0].status.state == "prepared", 10)
            raise RuntimeError("rank 1's engine refused the version")

    def raising() -> Any:
        raise RuntimeError("the trainer's gather failed")
        yield

    with BucketSender(endpoint, receivers=2, timeout=20, **HB) as sender, ReceiverDaemon(
        endpoint, NumpySink(state), rank=0, **HB
    ) as rank0, ReceiverDaemon(endpoint, refusing, framework="numpy", rank=1, **HB):
        ranks[0] = rank0
        sender.wait_for_receivers(timeout=10)
        with pytest.raises(RemoteError) as first:
            sender.push([("w", np.full(1000, 1.0, np.float32))], version="step_1")  # rank 0 applied in place
        assert first.value.report.receivers[0].model_intact is False
        assert wait_until(lambda: rank0.status.model_intact is False, 5)
        with pytest.raises(VersionAborted) as second:
            sender.push(raising(), version="step_2", specs={"w": ("float32", (1000,))})
        assert second.value.report.receivers[0].model_intact is False  # still torn from step_1
        with pytest.raises(WeightstreamError) as third:
            sender.push([("w", np.zeros(7, np.float32))], version="step_3")  # rank 0 rejects the shape
        assert third.value.report.receivers[0].outcome == "rejected"
        assert third.value.report.receivers[0].model_intact is False


def test_a_welcome_with_a_bad_ring_leaves_no_fd_open(endpoint: str) -> None:
    import os

    from weightstream.protocol.transports.shm import ShmImportedSlot, ShmTransport

    (slot,) = ShmTransport().create_slots(1, 1 << 20, session="s1")  # a real segment the rank can open
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(WeightstreamError, match="'ring'"):
                ShmImportedSlot({**slot.descriptor(), "ring": 123})
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        slot.close()
