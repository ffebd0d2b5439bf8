"""Version strings: version.yaml, ordering, and ranks refusing an older version unless forced."""

from __future__ import annotations

import numpy as np
import pytest

from weightstream import BucketSender, ReceiverDaemon, VersionAborted
from weightstream.receiver.sinks import NumpySink
from weightstream.versions import check_version_order, is_older, read_version, version_key, write_version

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("version", "key"),
    [("234", ("", 234)), ("step_100", ("", 100)), ("v2", ("", 2)), ("ckpt_7", ("ckpt", 7)), ("final", None), ("", None)],
)
def test_version_key(version: str, key: tuple[str, int] | None) -> None:
    assert version_key(version) == key


def test_is_older_compares_numbers_not_strings() -> None:
    assert is_older("step_9", "step_10")
    assert not is_older("step_10", "step_9")
    assert not is_older("step_10", "step_10")
    assert is_older("99", "100")
    assert is_older("step_9", "10")  # "step_N", "vN" and "N" are one family
    assert not is_older("a_1", "b_2")  # different families: no order
    assert not is_older("final", "step_2")


@pytest.mark.parametrize(
    ("new", "committed", "live", "restore"),
    [
        ("step_10", None, "ok", "ok"),  # nothing committed yet
        ("step_10", "step_10", "ok", "ok"),  # the same version: a repair
        ("step_11", "10", "ok", "ok"),
        ("step_9", "step_10", "older", "older"),
        ("final", "step_2", "ok", "unknown"),  # no order known: a live push goes on, a restore needs force
        ("a_1", "b_2", "ok", "unknown"),
    ],
)
def test_one_rule_orders_live_pushes_and_restores(new: str, committed: str | None, live: str, restore: str) -> None:
    """The daemon's BEGIN check (unordered=True) and a snapshot restore call the same rule."""
    for unordered, want in ((True, live), (False, restore)):
        if want == "ok":
            check_version_order(new, committed, unordered=unordered)
            continue
        says = "is older than the committed" if want == "older" else "cannot tell which is newer"
        with pytest.raises(VersionAborted, match=f"{says}.*fix: push with force=True"):
            check_version_order(new, committed, unordered=unordered, fix="push with force=True")
        check_version_order(new, committed, unordered=unordered, force=True)  # force always goes through


def test_version_yaml_round_trip(tmp_path) -> None:
    write_version(tmp_path, "step_7")
    assert read_version(tmp_path) == "step_7"
    assert not list(tmp_path.glob(".version.*"))  # the temp file was renamed away


def test_rank_refuses_older_version_unless_forced(endpoint: str) -> None:
    state = {"w": np.zeros(64, np.float32)}
    daemon = ReceiverDaemon(endpoint, NumpySink(state), rank=0).start()
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=4096, timeout=20) as sender:
            sender.push([("w", np.full(64, 10, np.float32))], version="step_10")
            with pytest.raises(VersionAborted, match=r"older than the committed 'step_10'.*force=True"):
                sender.push([("w", np.full(64, 9, np.float32))], version="step_9")
            assert daemon.committed_version == "step_10"
            np.testing.assert_array_equal(state["w"], np.full(64, 10, np.float32))  # untouched
            sender.push([("w", np.full(64, 9, np.float32))], version="step_9", force=True)
            assert daemon.committed_version == "step_9"
            np.testing.assert_array_equal(state["w"], np.full(64, 9, np.float32))
    finally:
        daemon.stop()


def test_a_retried_version_is_waited_for_afresh(endpoint: str) -> None:
    calls = {"n": 0}
    state = {"w": np.zeros(8, np.float32)}
    sink = NumpySink(state)

    def flaky(weights):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient")
        sink.load_weights(weights)

    daemon = ReceiverDaemon(endpoint, flaky, rank=0, expected=sink.param_specs()).start()
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=4096, timeout=20) as sender:
            with pytest.raises(Exception, match="transient"):
                sender.push([("w", np.ones(8, np.float32))], version="v1")
            with pytest.raises(Exception, match="transient"):
                daemon.wait_for_version("v1", timeout=5)
            sender.push([("w", np.ones(8, np.float32))], version="v1")
            daemon.wait_for_version("v1", timeout=5)
        np.testing.assert_array_equal(state["w"], np.ones(8, np.float32))
    finally:
        daemon.stop()
