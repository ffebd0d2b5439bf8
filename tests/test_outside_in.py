"""Regressions found by trying the README as a stranger would: a snapshot tee in front of a
tied model, a rank restarted between pushes, the tensor a staged load_weights failed on, and a
trainer-side exception in the middle of a push."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_workers import HB, ReceiverProc, digests, make_weights, wait_until

from weightstream import BucketSender, ReceiverDaemon, RemoteError, VersionAborted

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
