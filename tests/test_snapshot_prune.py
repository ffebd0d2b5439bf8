"""SnapshotWriter(keep=N): what each commit prunes and what it never touches, a prune killed
midway (SIGKILL, in a spawned process) never leaves a whole-looking partial version, a
restore reading a version survives a concurrent prune of it in another process, restore
progress, and a real daemon writing through a Tee with keep."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from weightstream import BucketSender, ReceiverDaemon
from weightstream.cli.snapshot import app
from weightstream.protocol.errors import ConfigError, WeightstreamError
from weightstream.receiver.sinks import NumpySink
from weightstream.receiver.snapshot_loader import load_snapshot
from weightstream.receiver.snapshot_store import execute_prune, list_snapshots, plan_prune, prune_directory
from weightstream.receiver.snapshot_writer import TEMP_PREFIX, SnapshotWriter, Tee
from weightstream.versions import read_version

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("spawn")


def state_of(version: int, tensors: int = 6, elems: int = 1500) -> dict[str, np.ndarray]:
    return {f"t{i}": np.full(elems, version * 100 + i, np.float32) for i in range(tensors)}


def commit(writer: SnapshotWriter, version: str, state: dict[str, np.ndarray]) -> list[Path]:
    writer.begin()
    for name, t in state.items():
        writer.load_one(name, t)
    return writer.commit(version)


def versions(directory: Path, rank: int) -> list[str]:
    return [s.version for s in list_snapshots(directory, rank)]


def loaded(directory: Path, rank: int, version: str) -> dict[str, bytes]:
    with load_snapshot(directory, rank, version) as src:
        return {n: a.tobytes() for part in src for n, a in part}


def as_bytes(state: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in state.items()}


def age(directory: Path, rank: int, version: str, seconds: float) -> None:
    """Make a version look committed ``seconds`` ago (commit-time order without sleeping)."""
    when = time.time() - seconds
    for p in directory.glob(f"model_state.tp{rank}.{version}.part*.safetensors"):
        os.utime(p, (when, when))


# --- the writer's keep ----------------------------------------------------------------------


def test_keep_n_over_many_commits_touches_nothing_else(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=2)
    other_rank = SnapshotWriter(tmp_path, 1, max_part_bytes=8192, keep=None)
    live = SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=2)  # a second writer of rank 0, mid-version
    live.begin()
    for i in range(4):
        live.load_one(f"x{i}", np.full(1500, i, np.float32))
    live._wait_pending()
    (live_tmp,) = tmp_path.glob(TEMP_PREFIX + "*")
    live_files = sorted(p.name for p in live_tmp.iterdir())
    assert live_files
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model_state.tp0.1.safetensors").write_bytes(b"a full file some other tool wrote")
    for v in range(8, 14):  # 8..13: step_9 < step_10 by number, not by text
        commit(writer, f"step_{v}", state_of(v))
        commit(other_rank, f"step_{v}", state_of(v + 50))
        assert versions(tmp_path, 0) == ["1", *(f"step_{w}" for w in range(max(8, v - 1), v + 1))]
    assert versions(tmp_path, 0) == ["1", "step_12", "step_13"]  # the full file is never pruned
    assert versions(tmp_path, 1) == [f"step_{v}" for v in range(8, 14)]  # another rank's files: untouched
    assert sorted(p.name for p in live_tmp.iterdir()) == live_files  # a live writer's temp dir: untouched
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for v in (12, 13):
        assert loaded(tmp_path, 0, f"step_{v}") == as_bytes(state_of(v))
    live.close()
    writer.close()
    other_rank.close()
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_keep_never_prunes_the_version_version_yaml_names(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=2) as writer:
        for v in range(1, 6):
            commit(writer, str(v), state_of(v))
        assert versions(tmp_path, 0) == ["4", "5"]
        commit(writer, "3", state_of(33))  # a rollback (restore force=True): version.yaml now says 3
        assert read_version(tmp_path) == "3" and versions(tmp_path, 0) == ["3", "4", "5"]
        assert loaded(tmp_path, 0, "3") == as_bytes(state_of(33))
        commit(writer, "6", state_of(6))
        assert versions(tmp_path, 0) == ["5", "6"]


def test_keep_orders_opaque_versions_by_commit_time(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=2) as writer:
        for i, name in enumerate(["alpha", "gamma", "beta"]):
            commit(writer, name, state_of(i))
            age(tmp_path, 0, name, 100 - 10 * i)  # committed in this order, 10 s apart
        assert versions(tmp_path, 0) == ["gamma", "beta"]


def test_keep_orders_each_family_by_number_and_families_by_commit_time(tmp_path: Path) -> None:
    """``v1.9`` and ``v2.x`` are two families (``v1``, ``v2``), as ranks see them: a trailing
    number is only compared within its family, so v1.9 is not "newer" than v2.3 (9 > 3), and a
    stale ``ckpt_500`` is not kept forever beside ``step_N`` (500 > N)."""
    for case, names, left in (
        ("dotted", ["v1.9", "v2.0", "v2.1", "v2.2", "v2.3"], ["v2.2", "v2.3"]),
        ("prefixes", ["ckpt_500", "step_1", "step_2", "step_3"], ["step_2", "step_3"]),
    ):
        directory = tmp_path / case
        with SnapshotWriter(directory, 0, max_part_bytes=8192, keep=2) as writer:
            for i, name in enumerate(names):
                commit(writer, name, state_of(i))
                age(directory, 0, name, 1000 - 10 * i)  # committed in this order, 10 s apart
        assert versions(directory, 0) == left, case
        for name in left:
            assert loaded(directory, 0, name) == as_bytes(state_of(names.index(name)))


def test_keep_none_keeps_every_version_and_bad_keep_is_refused(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=None) as writer:
        for v in range(1, 6):
            commit(writer, str(v), state_of(v))
    assert versions(tmp_path, 0) == ["1", "2", "3", "4", "5"]
    assert SnapshotWriter(tmp_path / "d", 0).keep == 3  # the default
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ConfigError, match=rf"SnapshotWriter: keep must be an int >= 1 .*got {bad!r}.*fix: e\.g\. keep=3"):
            SnapshotWriter(tmp_path, 0, keep=bad)  # type: ignore[arg-type]


def test_a_prune_failure_is_logged_and_never_fails_the_commit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=1) as writer:
        commit(writer, "1", state_of(1))
        with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=None) as keep_all:
            paths = commit(keep_all, "2", state_of(2))
        stuck = paths[-1]  # version 2's last part: replaced by a non-empty directory, which unlink cannot delete
        stuck.unlink()
        stuck.mkdir()
        (stuck / "x").write_text("x")
        with caplog.at_level(logging.INFO, "weightstream.snapshot"):
            commit(writer, "3", state_of(3))
    assert f"could not delete {stuck} (Is a directory)" in caplog.text
    assert versions(tmp_path, 0) == ["2", "3"] and loaded(tmp_path, 0, "3") == as_bytes(state_of(3))
    assert all(p.exists() for p in paths)  # stopped at the failure: the rest of version 2 stays


# --- atomicity --------------------------------------------------------------------------------


def _prune_and_die(directory: str, keep: int, after: int) -> None:
    """Prune, and SIGKILL this process right after the ``after``-th file is deleted."""
    deleted = 0

    def on_removed(path: Path) -> None:
        nonlocal deleted
        deleted += 1
        if deleted == after:
            os.kill(os.getpid(), signal.SIGKILL)

    execute_prune(plan_prune(list_snapshots(directory, 0), keep), on_removed)
    os._exit(0)


@pytest.mark.timeout(180)
def test_a_prune_killed_midway_never_leaves_a_whole_looking_version(tmp_path: Path) -> None:
    for after in (1, 3, 5):  # of the 6 parts of version 1
        directory = tmp_path / f"d{after}"
        with SnapshotWriter(directory, 0, max_part_bytes=8192, keep=None) as writer:
            commit(writer, "1", state_of(1))
            commit(writer, "2", state_of(2))
        proc = CTX.Process(target=_prune_and_die, args=(str(directory), 1, after))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        left = sorted(directory.glob("model_state.tp0.1.part*.safetensors"))
        assert len(left) == 6 - after and not (directory / "model_state.tp0.1.part5.safetensors").exists()
        with pytest.raises(FileNotFoundError, match="incomplete"):
            load_snapshot(directory, 0, "1")  # refused, never half-loaded
        (snap1, snap2) = list_snapshots(directory, 0)
        assert (snap1.version, snap1.complete, snap2.version, snap2.complete) == ("1", False, "2", True)
        assert loaded(directory, 0, "2") == as_bytes(state_of(2))
        _, result = prune_directory(directory, 1)  # the next prune removes what the killed one left
        assert result.ok and versions(directory, 0) == ["2"]


# --- restore against a concurrent prune -----------------------------------------------------


def _prune_when_told(directory: str, reading: Any, pruned: Any) -> None:
    if not reading.wait(60):
        os._exit(2)
    _, result = prune_directory(directory, 1, rank=0)
    pruned.set()
    os._exit(0 if result.ok and result.versions else 3)


class PausingSink(NumpySink):
    """Holds the restore after its first tensor until the other process has pruned."""

    def __init__(self, target: dict[str, np.ndarray], reading: Any, pruned: Any) -> None:
        super().__init__(target)
        self.reading, self.pruned = reading, pruned

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        def gated() -> Iterable[tuple[str, Any]]:
            for i, item in enumerate(weights):
                yield item
                if i == 0:
                    self.reading.set()
                    if not self.pruned.wait(60):
                        raise WeightstreamError("test: the pruning process never finished")

        super().load_weights(gated())


def test_a_restore_survives_a_concurrent_prune_of_its_version(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192, keep=None) as writer:
        for v in range(1, 5):
            commit(writer, str(v), state_of(v))
    reading, pruned = CTX.Event(), CTX.Event()
    proc = CTX.Process(target=_prune_when_told, args=(str(tmp_path), reading, pruned))
    proc.start()
    try:
        target = {k: np.zeros_like(v) for k, v in state_of(1).items()}
        daemon = ReceiverDaemon("ipc:///nonexistent/ws-prune.sock", PausingSink(target, reading, pruned), rank=0, prefetch=1)
        assert daemon.restore(tmp_path, "1") == "1"  # six parts, most of them mapped after the prune
    finally:
        proc.join(60)
    assert proc.exitcode == 0
    assert versions(tmp_path, 0) == ["4"]  # version 1 was really deleted while it was being read
    assert as_bytes(target) == as_bytes(state_of(1))


def test_restore_reports_progress_in_bytes(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path, 0, max_part_bytes=8192) as writer:
        commit(writer, "1", state_of(1))
    target = {k: np.zeros_like(v) for k, v in state_of(1).items()}
    daemon = ReceiverDaemon("ipc:///nonexistent/ws-progress.sock", NumpySink(target), rank=0)
    seen: list[tuple[int, int]] = []
    version = daemon.restore(tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert version == "1" and as_bytes(target) == as_bytes(state_of(1))
    assert seen[0] == (0, 36000) and seen[-1] == (36000, 36000) and len(seen) == 7  # start + one per part
    assert all(a[0] < b[0] for a, b in pairwise(seen))

    def broken(done: int, total: int) -> None:
        raise RuntimeError("the bar broke")

    assert daemon.restore(tmp_path, progress=broken, force=True) == "1"  # logged, not raised


# --- a real daemon through a Tee --------------------------------------------------------------


def test_a_daemon_tee_with_keep_leaves_the_newest_versions(tmp_path: Path, endpoint: str) -> None:
    rng = np.random.default_rng(3)
    named = {"big": rng.standard_normal(3000).astype(np.float32), "small": np.arange(5, dtype=np.int64)}
    model = {k: np.zeros_like(v) for k, v in named.items()}
    snap = tmp_path / "snap"
    writer = SnapshotWriter(snap, 0, max_part_bytes=8192, keep=2)
    pushed = {}
    with BucketSender(endpoint, receivers=1, bucket_bytes=4096) as sender, ReceiverDaemon(
        endpoint, Tee(NumpySink(model), writer), rank=0
    ) as daemon:
        for v in range(1, 5):
            pushed[v] = {k: t + v for k, t in named.items()}
            sender.push(pushed[v].items(), version=f"step_{v}")
            daemon.wait_for_version(f"step_{v}", 30)
    writer.close()
    assert versions(snap, 0) == ["step_3", "step_4"]
    for v in (3, 4):
        assert loaded(snap, 0, f"step_{v}") == as_bytes(pushed[v])
    res = CliRunner().invoke(app, ["verify", str(snap)])
    assert res.exit_code == 0 and res.stdout.count("ok  ") == 2, res.output
