"""The snapshot directory as a whole (receiver/snapshot_store.py) and `weightstream snapshot`:
listing, the pure prune planner (hypothesis), verify catching corrupt and truncated parts,
and the typer sub-app driven through CliRunner on real snapshots."""

from __future__ import annotations

import json
import os
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from disk_faults import flip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from weightstream.cli.snapshot import app
from weightstream.protocol.errors import ConfigError, WeightstreamError
from weightstream.receiver.snapshot_format import META_FORMAT, META_PARTS, read_header
from weightstream.receiver.snapshot_loader import load_snapshot
from weightstream.receiver.snapshot_store import (
    PartInfo,
    SnapshotInfo,
    check_keep,
    execute_prune,
    list_snapshots,
    newest_first,
    plan_prune,
    prune_directory,
    verify_snapshot,
)
from weightstream.receiver.snapshot_writer import SnapshotWriter
from weightstream.versions import write_version

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()


def state_of(version: int, tensors: int = 6, elems: int = 1500) -> dict[str, np.ndarray]:
    return {f"t{i}": np.full(elems, version * 100 + i, np.float32) for i in range(tensors)}


def write(directory: Path, rank: int, version: str, state: dict[str, np.ndarray], max_part_bytes: int = 8192) -> list[Path]:
    with SnapshotWriter(directory, rank, max_part_bytes=max_part_bytes, keep=None) as writer:
        writer.begin()
        for name, t in state.items():
            writer.load_one(name, t)
        return writer.commit(version)


def one(directory: Path, rank: int, version: str) -> SnapshotInfo:
    (snap,) = [s for s in list_snapshots(directory, rank) if s.version == version]
    return snap


# --- listing --------------------------------------------------------------------------------


def test_list_snapshots_per_rank_and_version(tmp_path: Path) -> None:
    import safetensors.numpy

    for v in (10, 9, 2):  # listed by number, not by text or write order
        write(tmp_path, 0, f"step_{v}", state_of(v))
    write(tmp_path, 1, "1.5", state_of(1, tensors=2))  # a dotted version keeps its dots
    safetensors.numpy.save_file({"x": np.ones(3, np.int8)}, str(tmp_path / "model_state.tp0.99.safetensors"))
    safetensors.numpy.save_file({"x": np.ones(3, np.int8)}, str(tmp_path / "model_state.tp07.safetensors"))  # legacy
    (tmp_path / "notes.txt").write_text("not a snapshot")
    write_version(tmp_path, "step_9")
    snaps = list_snapshots(tmp_path)
    assert [(s.rank, s.version, s.kind) for s in snaps] == [
        (0, "step_2", "parts"), (0, "step_9", "parts"), (0, "step_10", "parts"), (0, "99", "full"), (1, "1.5", "parts"),
    ]  # fmt: skip
    s9 = one(tmp_path, 0, "step_9")
    assert s9.current and s9.complete and s9.ours and s9.tensors == 6 and s9.payload_bytes == 6 * 6000
    assert len(s9.parts) == 6 and s9.file_bytes == sum(p.stat().st_size for p in s9.paths)
    assert [p.index for p in s9.parts] == list(range(6))
    assert not one(tmp_path, 0, "99").ours and one(tmp_path, 0, "99").complete
    assert [s.version for s in list_snapshots(tmp_path, rank=1)] == ["1.5"]
    assert list_snapshots(tmp_path, rank=5) == []
    with pytest.raises(WeightstreamError, match="expected a directory, got nothing there"):
        list_snapshots(tmp_path / "nope")


def test_listing_marks_a_set_without_its_last_part_incomplete(tmp_path: Path) -> None:
    paths = write(tmp_path, 0, "4", state_of(4))
    paths[-1].unlink()
    snap = one(tmp_path, 0, "4")
    assert not snap.complete and "the last part is missing" in (snap.problem or "")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_snapshot(tmp_path, 0, "4")  # the loader agrees


def test_newest_first_by_number_then_by_commit_time() -> None:
    def snap(version: str, mtime: float) -> SnapshotInfo:
        return SnapshotInfo(0, version, "parts", (PartInfo(Path(version), 0, 1, mtime),), False, None)

    numbered = [snap("step_9", 3.0), snap("step_10", 1.0), snap("v8", 2.0), snap("11", 0.0)]
    assert [s.version for s in newest_first(numbered)] == ["11", "step_10", "step_9", "v8"]  # by number, not text or time
    opaque = [snap("alpha", 2.0), snap("gamma", 1.0), snap("beta", 3.0)]
    assert [s.version for s in newest_first(opaque)] == ["beta", "alpha", "gamma"]  # by commit time
    mixed = [snap("alpha", 9.0), snap("step_4", 4.0), snap("step_2", 2.0)]  # an unnumbered one: by commit time
    assert [s.version for s in newest_first(mixed)] == ["alpha", "step_4", "step_2"]
    assert [s.version for s in newest_first([snap("12", 1.0), snap("step_12", 2.0)])] == ["step_12", "12"]  # tie: mtime
    families = [snap("v1.9", 1.0), snap("v2.0", 2.0), snap("v2.3", 3.0), snap("ckpt_500", 0.5), snap("step_1", 4.0)]
    assert [s.version for s in newest_first(families)] == ["step_1", "v2.3", "v2.0", "v1.9", "ckpt_500"]
    # a rollback: step_3 committed again after step_5. Within the family step_5 is still the
    # newer, so it counts as committed no earlier than step_3: ckpt_9 (between the two) is older
    rollback = [snap("step_3", 30.0), snap("step_5", 10.0), snap("ckpt_9", 20.0)]
    assert [s.version for s in newest_first(rollback)] == ["step_5", "step_3", "ckpt_9"]


def test_prune_the_dotted_and_prefixed_families_of_the_trial() -> None:
    def plan(names: list[str], keep: int) -> tuple[list[str], list[str]]:
        snaps = [
            SnapshotInfo(0, v, "parts", (PartInfo(Path(v), 0, 1, float(i), 1, 4, {META_FORMAT: "snapshot-v1"}),), False, None)
            for i, v in enumerate(names)  # committed in list order
        ]
        p = plan_prune(snaps, keep, now=NOW)
        return [s.version for s, _ in p.keep], [s.version for s in p.remove]

    assert plan(["v1.9", "v2.0", "v2.1", "v2.2", "v2.3"], 2) == (["v2.3", "v2.2"], ["v2.1", "v2.0", "v1.9"])
    assert plan(["ckpt_500", "step_1", "step_2", "step_3"], 2) == (["step_3", "step_2"], ["step_1", "ckpt_500"])


def test_a_rollback_that_ranks_a_kept_version_stays_while_families_mix() -> None:
    """step_2 ranks by step_1's later commit (a rollback). Pruning step_1 would drop step_2
    below the protected ckpt_5, and a second prune would then delete step_2: so step_1 stays."""

    def snap(version: str, mtime: float) -> SnapshotInfo:
        return SnapshotInfo(0, version, "parts", (PartInfo(Path(version), 0, 1, mtime, 1, 4, {META_FORMAT: "x"}),), False, None)

    snaps = [snap("step_1", 100.0), snap("step_2", 0.0), snap("ckpt_5", 50.0)]
    plan = plan_prune(snaps, 1, now=NOW, protect=["ckpt_5"])
    assert plan.remove == ()
    reasons = {s.version: why for s, why in plan.keep}
    assert reasons["step_2"] == "one of the newest 1" and reasons["ckpt_5"] == "protected"
    assert "committed after the kept version 'step_2' of its family (a rollback)" in reasons["step_1"]
    # one family only: the order is by number whatever is pruned, so the rollback can go
    single = plan_prune([snap("step_1", 100.0), snap("step_2", 0.0)], 1, now=NOW)
    assert [s.version for s in single.remove] == ["step_1"]


# --- the prune planner ----------------------------------------------------------------------

NOW = 10_000.0


@st.composite
def listings(draw: Any) -> tuple[list[SnapshotInfo], str | None]:
    names = st.one_of(
        st.integers(0, 12).map(str),
        st.integers(0, 12).map(lambda n: f"step_{n}"),
        st.sampled_from(["alpha", "beta", "gamma", "ckpt_3", "ckpt_5", "ckpt_500", "1.5", "v1.9", "v2.0", "v2.3"]),
    )
    entries = draw(st.lists(st.tuples(st.integers(0, 1), names), min_size=0, max_size=14, unique=True))
    snaps = []
    for rank, version in entries:
        # a few shared times too: ties, and rollbacks (a lower number committed later) across families
        mtime = draw(st.sampled_from([NOW - 400, NOW - 300, NOW - 30]) | st.floats(NOW - 500, NOW + 5, allow_nan=False))
        complete = draw(st.booleans() | st.just(True))
        ours = draw(st.booleans() | st.just(True))
        meta = {META_FORMAT: "snapshot-v1"} if ours else {}
        problem = None if complete else "parts [0] are there but none says how many the version has"
        part = PartInfo(Path(f"/x/model_state.tp{rank}.{version}.part0.safetensors"), 0, 10, mtime, 1, 4, meta)
        snaps.append(SnapshotInfo(rank, version, "parts", (part,), False, problem))
    current = draw(st.none() | st.sampled_from([v for _, v in entries] or ["none"]))
    return [SnapshotInfo(s.rank, s.version, s.kind, s.parts, s.version == current, s.problem) for s in snaps], current


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    listing=listings(),
    keep=st.integers(1, 3),
    rank=st.none() | st.integers(0, 1),
    grace=st.sampled_from([0.0, 0.0, 60.0, 1000.0]),
    protect=st.lists(st.sampled_from(["alpha", "7", "step_3", "ckpt_5"]), max_size=2),
)
def test_prune_plan_invariants(
    listing: tuple[list[SnapshotInfo], str | None], keep: int, rank: int | None, grace: float, protect: list[str]
) -> None:
    snaps, current = listing
    plan = plan_prune(snaps, keep, rank=rank, grace_s=grace, now=NOW, protect=protect)
    removed = {(s.rank, s.version) for s in plan.remove}
    considered = [s for s in snaps if rank is None or s.rank == rank]
    # a partition of what was considered: each snapshot is removed, kept or skipped, once
    seen = [(s.rank, s.version) for s in plan.remove] + [(s.rank, s.version) for s, _ in (*plan.keep, *plan.skipped)]
    assert sorted(seen) == sorted((s.rank, s.version) for s in considered)
    for snap in plan.remove:
        assert rank is None or snap.rank == rank, "another rank's files"
        assert snap.ours, "files SnapshotWriter did not write"
        assert not snap.current and snap.version != current, "the version version.yaml names"
        assert snap.version not in protect
        assert snap.mtime <= NOW - grace, "a file younger than the grace period"
    for r in {s.rank for s in considered}:
        ours = newest_first([s for s in considered if s.rank == r and s.ours])
        newest_whole = [s for s in ours if s.complete][:keep]
        assert not removed & {(s.rank, s.version) for s in newest_whole}, "one of the newest keep"
        # nothing newer than the oldest kept whole version goes either (a commit in progress)
        if len(newest_whole) == keep:
            cut = ours.index(newest_whole[-1])
            assert not removed & {(s.rank, s.version) for s in ours[:cut]}
        else:
            assert not removed & {(s.rank, s.version) for s in ours}
    # planning again over what is left removes nothing more
    left = [s for s in snaps if (s.rank, s.version) not in removed]
    assert plan_prune(left, keep, rank=rank, grace_s=grace, now=NOW, protect=protect).remove == ()


def test_plan_prune_rejects_bad_keep_and_grace() -> None:
    for bad in (0, -1, 2.5, "3", True, None):
        with pytest.raises(ConfigError, match=rf"keep must be an int >= 1 .*got {bad!r}.*fix:"):
            plan_prune([], bad)  # type: ignore[arg-type]
    for grace in (-1.0, float("nan"), float("inf"), "5"):
        with pytest.raises(ConfigError, match="grace period must be a number of seconds >= 0"):
            plan_prune([], 1, grace_s=grace)  # type: ignore[arg-type]
    assert check_keep(4, "x") == 4


def test_prune_directory_keeps_current_and_counts_a_vanished_file_as_gone(tmp_path: Path) -> None:
    for v in range(1, 7):
        write(tmp_path, 0, str(v), state_of(v))
    write(tmp_path, 1, "1", state_of(1))
    write_version(tmp_path, "2")
    plan, result = prune_directory(tmp_path, 2, rank=0, dry_run=True)
    assert [s.version for s in plan.remove] == ["4", "3", "1"] and result.removed == []
    assert len(list(tmp_path.glob("model_state.tp0.*"))) == 6 * 6  # a dry run deletes nothing
    plan.remove[0].paths[2].unlink()  # another pruner got there first
    result = execute_prune(plan)
    assert result.ok and [s.version for s in result.versions] == ["4", "3", "1"]
    assert [s.version for s in list_snapshots(tmp_path, 0)] == ["2", "5", "6"]
    assert [s.version for s in list_snapshots(tmp_path, 1)] == ["1"]


def test_prune_with_a_grace_period_keeps_recent_files(tmp_path: Path) -> None:
    for v in range(1, 5):
        write(tmp_path, 0, str(v), state_of(v))
    old = time.time() - 3600
    for p in tmp_path.glob("model_state.tp0.1.*"):
        os.utime(p, (old, old))
    plan, result = prune_directory(tmp_path, 1, grace_s=600)
    assert [s.version for s in plan.remove] == ["1"] and result.ok
    assert {why for s, why in plan.keep if s.version in ("2", "3")} == {"modified less than 600s ago"}


# --- verify ---------------------------------------------------------------------------------


def test_verify_names_the_corrupt_block_and_its_tensors(tmp_path: Path) -> None:
    mib = 1 << 20
    state = {name: np.full(3 * mib, i + 1, np.float32) for i, name in enumerate(("a", "b", "c"))}  # 12 MiB each
    (path,) = write(tmp_path, 0, "1", state, max_part_bytes=1 << 30)
    header = read_header(path)
    snap = one(tmp_path, 0, "1")
    seen: list[tuple[int, int]] = []
    good = verify_snapshot(snap, lambda done, total: seen.append((done, total)))
    assert good.ok and good.digests == "checked" and good.bytes_read == path.stat().st_size
    assert seen[0] == (0, path.stat().st_size) and seen[-1] == (path.stat().st_size,) * 2
    assert all(a[0] <= b[0] for a, b in pairwise(seen))

    flip(path, header.data_start + 34 * mib, 0x40)  # the third 16 MiB block: inside 'c' only
    bad = verify_snapshot(one(tmp_path, 0, "1"))
    (problem,) = bad.problems
    assert str(path) in problem and "part 0" in problem and f"data bytes [{32 * mib}, {36 * mib})" in problem
    assert "tensor 'c' is corrupt" in problem
    flip(path, header.data_start + 34 * mib, 0x40)
    flip(path, header.data_start + 5 * mib, 0x40)  # the first block: 'a' and the start of 'b'
    (problem,) = verify_snapshot(one(tmp_path, 0, "1")).problems
    assert "data bytes [0, 16777216)" in problem and "tensors 'a' .. 'b' (2) are corrupt" in problem


def test_verify_catches_truncation_a_missing_part_and_a_bad_header(tmp_path: Path) -> None:
    paths = write(tmp_path, 0, "1", state_of(1))
    with open(paths[2], "r+b") as f:
        f.truncate(paths[2].stat().st_size - 7)
    (problem,) = verify_snapshot(one(tmp_path, 0, "1")).problems
    assert f"part 2 ({paths[2]})" in problem and "inside the file" in problem

    paths = write(tmp_path, 0, "2", state_of(2))
    paths[3].unlink()
    (problem,) = verify_snapshot(one(tmp_path, 0, "2")).problems
    assert "expected parts 0..5, found [0, 1, 2, 4, 5]" in problem

    paths = write(tmp_path, 0, "3", state_of(3))
    flip(paths[1], 12, 0x40)  # inside the JSON header
    (problem,) = verify_snapshot(one(tmp_path, 0, "3")).problems
    assert f"part 1 ({paths[1]})" in problem and "not a valid safetensors file" in problem


def test_verify_checks_the_structure_of_snapshots_without_digests(tmp_path: Path) -> None:
    import safetensors.numpy

    for i in range(3):  # an older or foreign writer: no weightstream metadata, no digests
        safetensors.numpy.save_file({f"t{i}": np.arange(10, dtype=np.int32)}, str(tmp_path / f"model_state.tp0.7.part{i}.safetensors"))
    result = verify_snapshot(one(tmp_path, 0, "7"))
    assert result.ok and result.digests == "absent"
    path = tmp_path / "model_state.tp0.7.part1.safetensors"
    with open(path, "ab") as f:
        f.write(b"\0" * 8)  # trailing bytes no tensor covers
    (problem,) = verify_snapshot(one(tmp_path, 0, "7")).problems
    assert "part 1" in problem and "the tensors end at byte" in problem


def test_only_the_last_part_carries_the_count(tmp_path: Path) -> None:
    paths = write(tmp_path, 0, "1", state_of(1))
    assert META_PARTS in read_header(paths[-1]).metadata and META_PARTS not in read_header(paths[0]).metadata


# --- the CLI --------------------------------------------------------------------------------


def cli(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_cli_ls_verify_prune_on_real_snapshots(tmp_path: Path) -> None:
    for v in range(1, 6):
        write(tmp_path, 0, f"step_{v}", state_of(v))
    write(tmp_path, 1, "step_5", state_of(5))
    res = cli("ls", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert [(d["rank"], d["version"], d["current"], d["complete"]) for d in listed] == [
        *((0, f"step_{v}", v == 5, True) for v in range(1, 6)), (1, "step_5", True, True),
    ]
    assert listed[0]["parts"] == 6 and listed[0]["tensors"] == 6 and listed[0]["payload_bytes"] == 36000
    table = cli("ls", tmp_path, "--rank", "0")
    assert table.exit_code == 0 and "step_3" in table.stdout and "whole" in table.stdout and "tp1" not in table.stdout

    res = cli("verify", tmp_path)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("ok  ") == 6 and "xxh3 digests checked" in res.stdout

    dry = cli("prune", tmp_path, "--keep", "2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would remove rank 0 version 'step_3'" in dry.stdout and "nothing deleted" in dry.stdout
    assert len(list_snapshots(tmp_path)) == 6
    res = cli("prune", tmp_path, "--keep", "2", "--rank", "0")
    assert res.exit_code == 0, res.output
    assert "removed 3 version(s)" in res.stdout
    assert [(s.rank, s.version) for s in list_snapshots(tmp_path)] == [(0, "step_4"), (0, "step_5"), (1, "step_5")]
    assert collect(tmp_path, 0, "step_4") == ("parts", {k: v.tobytes() for k, v in state_of(4).items()})


def collect(directory: Path, rank: int, version: str) -> tuple[str, dict[str, bytes]]:
    with load_snapshot(directory, rank, version) as src:
        return src.kind, {n: a.tobytes() for part in src for n, a in part}


def test_cli_verify_exits_1_naming_the_bad_part(tmp_path: Path) -> None:
    write(tmp_path, 0, "1", state_of(1))
    paths = write(tmp_path, 0, "2", state_of(2))
    flip(paths[4], paths[4].stat().st_size - 1, 0x40)
    res = cli("verify", tmp_path, "--version", "2")
    assert res.exit_code == 1
    assert "BAD rank 0 version '2'" in res.stdout and str(paths[4]) in res.stdout and "tensor 't4' is corrupt" in res.stdout
    assert "1 of 1 snapshot(s) failed" in res.stderr and str(paths[4]) in res.stderr
    assert cli("verify", tmp_path, "--version", "1").exit_code == 0
    none = cli("verify", tmp_path, "--rank", "3")
    assert none.exit_code == 1 and "no snapshot of rank 3" in none.stderr


def test_cli_bad_input_exits_2_with_the_fix(tmp_path: Path) -> None:
    res = cli("prune", tmp_path, "--keep", "0")
    assert res.exit_code == 2 and "keep must be an int >= 1" in res.stderr and "got 0" in res.stderr and "--keep 3" in res.stderr
    res = cli("prune", tmp_path, "--keep", "1", "--grace-seconds", "-5")
    assert res.exit_code == 2 and "grace period" in res.stderr
    res = cli("ls", tmp_path / "missing")
    assert res.exit_code == 2 and "expected a directory, got nothing there" in res.stderr
    res = cli("prune", tmp_path)
    assert res.exit_code == 2 and "--keep" in res.output  # click's own usage error: a required option


@pytest.mark.parametrize("command", [[], ["ls"], ["verify"], ["prune"]])
def test_cli_help_renders(command: list[str]) -> None:
    res = runner.invoke(app, [*command, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "[/" not in res.output and "Usage:" in res.output
    expected = {"": ["ls", "verify", "prune"], "ls": ["--rank", "--json"], "verify": ["--rank", "--version"],
                "prune": ["--keep", "--rank", "--dry-run", "--grace-seconds"]}[command[0] if command else ""]  # fmt: skip
    for word in expected:
        assert word in res.output


def test_cli_usage_errors_and_reasons_say_it_once_and_truly(tmp_path: Path) -> None:
    res = cli("prune", tmp_path, "--keep", "0")
    assert res.exit_code == 2 and res.stderr.startswith("snapshot prune --keep: keep must be") and res.stderr.count("snapshot prune") == 1
    for command in ("ls", "verify", "prune"):
        res = runner.invoke(app, [command, str(tmp_path), "--rank", "-1", *(["--keep", "1"] if command == "prune" else [])])
        assert res.exit_code == 2 and "--rank" in res.output, (command, res.output)
        usage = runner.invoke(app, [command, "--help"], terminal_width=100).output
        assert f"{command} [OPTIONS] DIR" in usage and "{DIR}" not in usage
    paths = write(tmp_path, 0, "1", state_of(1))
    write(tmp_path, 0, "2", state_of(2))[-1].unlink()  # no version of rank 0 is whole
    paths[-1].unlink()
    res = cli("prune", tmp_path, "--keep", "1")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("rank 0 has no whole version to keep") == 2 and "newer than a kept" not in res.stdout
    assert "removed 0 version(s)" in res.stdout


def test_cli_prints_names_verbatim_through_rich(tmp_path: Path) -> None:
    """Versions and directories are file names: rich markup and :emoji: codes in them are text."""
    where = tmp_path / "a[" / "x]" / "[bold]"  # its path reads .../a[/x]/[bold]: a closing tag rich would choke on
    names = ["[red]v1", "v:fire:2", "step_5[x]", "[bold]v3"]
    for i, name in enumerate(names):
        write(where, 0, name, state_of(i))
    for args in (["ls", where], ["verify", where], ["prune", where, "--keep", "1", "--dry-run"]):
        res = cli(*args)
        assert res.exit_code == 0, res.output
        for name in names:
            assert name in res.stdout, (args[0], name, res.stdout)
        assert "🔥" not in res.output
    assert f"snapshots in {where}" in cli("ls", where).stdout
    res = cli("ls", where / "no[/x]")
    assert res.exit_code == 2 and f"{where / 'no[/x]'}" in res.stderr
