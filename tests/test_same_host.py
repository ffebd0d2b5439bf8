"""Same-host safety, with real processes: a /dev/shm too small for the slots is a TransportError,
never a SIGBUS; another local user can neither feed a rank through an ipc directory or an
abstract socket nor hand it a segment of theirs; one sender per ipc endpoint; one push at a
time per sender; and checksum=True covers the bytes a rank applied, not only those that arrived.

Each test runs against real ZMQ sockets and real shm segments, with bit-exact digests."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import subprocess
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_workers import BUCKET_BYTES, HB, ReceiverProc, SenderProc, digests, expected_specs, make_weights
from hostile_workers import DaemonProc
from same_host_workers import (
    SHM_SIZE,
    GatedRank,
    HandSender,
    OtherUser,
    descriptor,
    random_segment_name,
    shm_namespace_cmd,
    umask_zero_dirs,
    unused_ids,
    wait_until,
)

from weightstream import BucketSender, ReceiverDaemon, WeightstreamError
from weightstream.protocol import messages as m

MiB = 1 << 20
SLOT = 4096


def committed(rank: ReceiverProc, version: str, weights: list[tuple[str, np.ndarray]]) -> None:
    """``rank`` committed ``version`` and holds exactly ``weights``."""
    assert wait_until(lambda: rank.status()["committed"] == version, 10), rank.status()
    status = rank.request(cmd="status", digests=True)
    assert status["model_intact"], status
    assert status["digests"] == digests(weights)


# --- 1. a small /dev/shm: TransportError, never SIGBUS ------------------------------------------


@lru_cache(maxsize=1)
def _namespace_problem() -> str | None:
    """Why a private mount namespace with its own /dev/shm cannot be made here (None: it can)."""
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare is not available ({exc})"
    if probe.returncode != 0:
        return f"unshare -m / mount tmpfs not permitted here (rc={probe.returncode}: {probe.stderr.strip()})"
    return None


def run_in_small_shm(scenario: str, endpoint: str) -> dict[str, Any]:
    """``same_host_workers.shm_scenario`` with a 64 MiB /dev/shm of its own; the process must exit normally."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(f"needs a private /dev/shm of 64 MiB: {problem}")
    proc = subprocess.run(shm_namespace_cmd(scenario, endpoint), capture_output=True, text=True, timeout=90)
    assert proc.returncode != -signal.SIGBUS, (
        f"{scenario}: the process was killed by SIGBUS (rc {proc.returncode}) in a {SHM_SIZE >> 20} MiB /dev/shm; "
        f"stdout={proc.stdout!r} stderr tail={proc.stderr[-1500:]!r}"
    )
    assert proc.returncode == 0, f"{scenario}: rc {proc.returncode}; stderr tail={proc.stderr[-3000:]!r}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{scenario}: no result line; stdout={proc.stdout!r} stderr={proc.stderr[-3000:]!r}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert out["shm_total"] == SHM_SIZE, out  # it did run on the small tmpfs
    return out


@pytest.mark.timeout(120)
def test_small_dev_shm_is_a_transport_error_not_sigbus(endpoint: str) -> None:
    """(a) the defaults (2 x 256 MiB) in 64 MiB: TransportError naming bytes needed, bytes free and
    the fix; (b) 2 x 16 MiB slots, each of which fits, with 40 MiB of /dev/shm taken by a file:
    TransportError too; (c) 2 x 4 MiB slots fit, and a 6 MiB push is bit-exact on a rank there."""
    out = run_in_small_shm("defaults", endpoint)
    assert out["raised"] == "TransportError", f"the default sender was made in a 64 MiB /dev/shm: {out}"
    text = out["message"]
    needed = re.search(r"needs (\d+) bytes", text)
    assert needed and int(needed.group(1)) >= 2 * 256 * MiB, text  # the bytes needed (2 slots, + ring pages)
    assert f"has {out['shm_free']} bytes" in text, text  # the bytes free
    assert "--shm-size" in text and "bucket_bytes" in text and "num_buffers" in text, text

    out = run_in_small_shm("crowded", endpoint)
    assert 16 * MiB < out["after_filler"] < 32 * MiB, out  # each 16 MiB slot fits, both do not
    assert out["raised"] == "TransportError", f"2 x 16 MiB slots were made with {out['after_filler']} bytes free: {out}"
    text = out["message"]
    assert str(out["after_filler"]) in text and "--shm-size" in text and "bucket_bytes" in text, text

    out = run_in_small_shm("fits", endpoint)
    assert out["raised"] is None, out
    assert out["committed"] == "v1" and out["model_intact"], out
    assert out["rank_digests"] == out["expected_digests"], "the push in a small /dev/shm was not bit-exact"
    assert out["buckets"] >= 2 and out["pushed_bytes"] > 6 * MiB, out  # both slots written


@pytest.mark.timeout(60)
def test_segment_shorter_than_announced_is_a_transport_error(endpoint: str) -> None:
    """(d) a WELCOME announcing 1 MiB slots whose segments hold 4096 bytes: the rank answers ERROR
    TransportError with both sizes, says so in status.last_error, and lives on (no SIGBUS)."""
    hand = HandSender(endpoint)
    rank = DaemonProc(endpoint, 0)
    try:
        assert hand.wait_for(m.Hello) is not None
        session = "short001"
        short = [descriptor(s.name, 1 * MiB) for s in hand.slots(2, SLOT, session)]
        hand.send(hand.welcome(session, short, 1 * MiB))
        err = hand.wait_for(m.Error, 10)
        assert err is not None, f"no ERROR for a segment shorter than announced: {rank.status()}"
        assert err.error == "TransportError", err
        assert str(1 * MiB) in err.message and str(SLOT) in err.message, err.message
        status = rank.wait_status(lambda s: (s["last_error"] or "").startswith("TransportError"), 10)
        assert str(1 * MiB) in status["last_error"] and not status["connected"], status
        assert rank.proc.is_alive() and rank.proc.exitcode is None

        good = [s.descriptor() for s in hand.slots(2, SLOT, "good0001")]  # still serving
        hand.send(hand.welcome("good0001", good, SLOT))
        assert wait_until(lambda: (hand.recv(0.02), rank.status()["connected"])[1], 10), rank.status()
    finally:
        rank.stop()
        hand.close()
    assert rank.proc.exitcode == 0, f"the rank exited with {rank.proc.exitcode} (-7 is SIGBUS)"


# --- 2. another local user cannot feed a rank -------------------------------------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root (setuid)")


@needs_root
@pytest.mark.timeout(60)
def test_ipc_directory_of_another_user_is_refused_unless_insecure() -> None:
    """(a) a sender of another uid in its own directory: a root ReceiverDaemon there is refused at
    construction (owned by that uid, with the fix); with insecure=True it takes that sender's push."""
    uid, gid = unused_ids()
    other = OtherUser(uid, gid, "sender")
    endpoint, directory = other.started["endpoint"], other.started["dir"]
    try:
        assert other.started["euid"] == uid and other.started["dir_uid"] == uid
        with pytest.raises(WeightstreamError) as info:
            ReceiverDaemon(endpoint, lambda weights: None, framework="numpy", rank=0, **HB)
        text = str(info.value)
        assert f"owned by uid {uid}" in text and directory in text, text
        assert "insecure=True" in text and "chmod 700" in text, text

        rank = ReceiverProc(endpoint, 0, insecure=True)  # a host whose users are trusted: allowed
        try:
            reply = other.request(cmd="push", seed=11, version="v1")
            assert reply["ok"] and reply["ranks"] == [0], reply
            committed(rank, "v1", make_weights(11, "v1"))
        finally:
            rank.stop()
    finally:
        other.finish()
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


@needs_root
@pytest.mark.timeout(30)
def test_endpoint_under_a_directory_another_user_controls_is_refused(endpoint_dir: Path) -> None:
    """A directory of another uid above the endpoint's: that user could swap the endpoint's own
    (0700, ours) directory for one of theirs after the check, so both sides refuse it."""
    uid, gid = unused_ids()
    theirs = endpoint_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, uid, gid)
    endpoint = f"ipc://{theirs}/ws/x.sock"
    for make in (
        lambda: ReceiverDaemon(endpoint, lambda weights: None, framework="numpy", rank=0, **HB),
        lambda: BucketSender(endpoint, bucket_bytes=1 << 16, **HB),
    ):
        with pytest.raises(WeightstreamError) as info:
            make()
        text = str(info.value)
        assert str(theirs) in text and f"owner uid {uid}" in text and "insecure=True" in text, text
    assert not (theirs / "ws").exists()  # refused before anything was created under it


@pytest.mark.timeout(60)
def test_abstract_ipc_endpoint_needs_insecure() -> None:
    """(b) ipc://@name: no directory protects it, so both sides refuse it without insecure=True."""
    endpoint = f"ipc://@ws-test-{os.getpid()}-{secrets.token_hex(4)}"
    with pytest.raises(WeightstreamError) as info:
        BucketSender(endpoint, bucket_bytes=BUCKET_BYTES).close()
    assert "abstract" in str(info.value) and "insecure=True" in str(info.value), info.value
    with pytest.raises(WeightstreamError) as info:
        ReceiverDaemon(endpoint, lambda weights: None, framework="numpy", rank=0)
    assert "abstract" in str(info.value) and "insecure=True" in str(info.value), info.value

    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, insecure=True, timeout=30.0, **HB) as sender:
        rank = ReceiverProc(endpoint, 0, insecure=True)
        try:
            sender.wait_for_receivers(1, timeout=20)
            sender.push(make_weights(12, "v1"), "v1")
            committed(rank, "v1", make_weights(12, "v1"))
        finally:
            rank.stop()


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["other_uid", "mode_644"])
def test_segment_not_private_to_the_rank_is_refused(endpoint: str, case: str) -> None:
    """(c) a WELCOME naming a segment of the right session that another uid created (0600), or
    (d) one of ours with mode 0644: ERROR TransportError naming owner uid / mode and the fix; the
    rank does not connect, and then connects to a proper WELCOME."""
    hand = HandSender(endpoint)
    rank = DaemonProc(endpoint, 0)
    session = "evil0001"
    try:
        assert hand.wait_for(m.Hello) is not None
        if case == "other_uid":
            uid, gid = unused_ids()
            name = random_segment_name(session)
            hand.extra.append(name)  # unlinked by hand.close()
            made = OtherUser(uid, gid, "segment", name=name, size=SLOT)
            made.kill()  # it did its work and returned
            assert (made.started["uid"], made.started["mode"]) == (uid, 0o600), made.started
            slots = [descriptor(name, SLOT), descriptor(name, SLOT)]
            mentions = [f"owned by uid {uid}", "insecure=True", "same user"]
        else:
            ours = hand.slots(2, SLOT, session)
            os.chmod(f"/dev/shm/{ours[1].name}", 0o644)
            slots = [s.descriptor() for s in ours]
            mentions = ["mode 644", "600", "insecure=True"]
        hand.send(hand.welcome(session, slots, SLOT))
        err = hand.wait_for(m.Error, 8)
        if err is None:
            pytest.fail(f"the rank mapped a segment that is not private to it ({case}), no ERROR: {rank.status()}")
        assert err.error == "TransportError", err
        assert all(what in err.message for what in mentions), err.message
        status = rank.wait_status(lambda s: (s["last_error"] or "").startswith("TransportError"), 10)
        assert all(what in status["last_error"] for what in mentions[:1]) and not status["connected"], status

        good = [s.descriptor() for s in hand.slots(2, SLOT, "good0001")]
        hand.send(hand.welcome("good0001", good, SLOT))
        assert wait_until(lambda: (hand.recv(0.02), rank.status()["connected"])[1], 10), rank.status()
    finally:
        rank.stop()
        hand.close()


@pytest.mark.timeout(60)
def test_endpoint_directories_are_0700_under_umask_0(endpoint_dir: Path) -> None:
    """(e) with umask 0, a sender and a rank on nested ipc paths create every missing directory 0700."""
    out = umask_zero_dirs(str(endpoint_dir))
    assert out["ok"], out
    assert out["modes"] == dict.fromkeys(out["modes"], 448), (
        f"directories created under umask 0 (None: not created): {out['modes']} {out['notes']}"
    )


# --- 3. one sender per endpoint --------------------------------------------------------------------


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return st.st_dev, st.st_ino


@pytest.mark.timeout(60)
def test_second_sender_on_a_live_endpoint_is_refused_and_the_first_serves(endpoint: str) -> None:
    path = endpoint[len("ipc://"):]
    first = SenderProc(endpoint)
    rank = ReceiverProc(endpoint, 0)
    try:
        assert first.request(cmd="wait", count=1, timeout=20)["ok"]
        assert first.request(cmd="push", seed=21, version="v1")["ok"]
        committed(rank, "v1", make_weights(21, "v1"))
        socket_file = _inode(path)

        with pytest.raises(WeightstreamError) as info:
            BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, **HB).close()
        assert "another sender is bound" in str(info.value), info.value
        assert os.path.exists(path) and _inode(path) == socket_file, "the refused sender touched the first's socket file"

        reply = first.request(cmd="push", seed=21, version="v2")
        assert reply["ok"] and reply["ranks"] == [0], reply
        committed(rank, "v2", make_weights(21, "v2"))
        assert _inode(path) == socket_file
    finally:
        rank.stop()
        first.close()


@pytest.mark.timeout(60)
def test_sender_killed_then_successor_binds_and_serves(endpoint: str) -> None:
    """kill -9 leaves a stale socket file: a new sender binds over it, and the rank moves to it."""
    path = endpoint[len("ipc://"):]
    first = SenderProc(endpoint)
    rank = ReceiverProc(endpoint, 0)
    try:
        assert first.request(cmd="wait", count=1, timeout=20)["ok"]
        assert first.request(cmd="push", seed=22, version="v1")["ok"]
        committed(rank, "v1", make_weights(22, "v1"))
        first.kill()
        assert os.path.exists(path), "expected the killed sender's socket file to stay behind"
        with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB) as second:
            second.wait_for_receivers(1, timeout=20)
            second.push(make_weights(22, "v2"), "v2")
            committed(rank, "v2", make_weights(22, "v2"))
    finally:
        rank.stop()
        first.close()


@pytest.mark.timeout(60)
def test_closing_sender_leaves_a_successors_socket_file(endpoint: str) -> None:
    """A's socket file is moved away and B binds the path: A.close() must not unlink B's file, and
    a rank that starts after that reaches B."""
    path = endpoint[len("ipc://"):]
    a = BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, **HB)
    b = None
    try:
        os.rename(path, path + ".a")
        b = BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB)
        b_file = _inode(path)
        a.close()
        assert os.path.exists(path) and _inode(path) == b_file, "closing A removed B's socket file"
        rank = ReceiverProc(endpoint, 0)
        try:
            b.wait_for_receivers(1, timeout=20)
            b.push(make_weights(23, "v1"), "v1")
            committed(rank, "v1", make_weights(23, "v1"))
        finally:
            rank.stop()
    finally:
        a.close()
        if b is not None:
            b.close()


# --- 4. one push at a time ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_push_fails_at_once_and_the_first_commits(endpoint: str) -> None:
    """While a lazy push is held inside its generator, a second thread's push raises naming the
    push in progress (the first is still held, so it did not wait for it); the first then commits
    bit-exact, and a later push works."""
    first_weights = make_weights(31, "v1")
    pulled, release = threading.Event(), threading.Event()

    def lazy() -> Any:
        for i, item in enumerate(first_weights):
            if i == 1:
                pulled.set()
                release.wait(30)
            yield item

    results: dict[str, Any] = {}

    def run(key: str, fn: Any) -> None:
        try:
            results[key] = fn()
        except BaseException as exc:
            results[key] = exc

    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=20.0, **HB) as sender:
        rank = ReceiverProc(endpoint, 0)
        try:
            sender.wait_for_receivers(1, timeout=20)
            t1 = threading.Thread(target=run, args=("first", lambda: sender.push(lazy(), "v1", specs=expected_specs())))
            t1.start()
            assert pulled.wait(20), f"the first push never pulled its second tensor: {results}"
            t2 = threading.Thread(target=run, args=("second", lambda: sender.push(make_weights(31, "v9"), "v9")))
            t2.start()
            t2.join(25)
            held = not release.is_set()
            release.set()
            t1.join(30)
            assert not t1.is_alive() and not t2.is_alive(), f"a push hung: {results}"
            second = results.get("second")
            assert held and isinstance(second, WeightstreamError), f"second push: {second!r}"
            assert "another thread's push is in progress" in str(second), second
            assert not isinstance(results.get("first"), BaseException), f"first push: {results.get('first')!r}"
            assert set(results["first"].receivers) == {0}
            committed(rank, "v1", first_weights)

            sender.push(make_weights(31, "v2"), "v2")  # the refused push left nothing locked
            committed(rank, "v2", make_weights(31, "v2"))
        finally:
            release.set()
            rank.stop()


# --- 5. checksum=True covers what was applied ---------------------------------------------------


@pytest.mark.timeout(60)
def test_checksum_covers_bytes_changed_while_applied(endpoint: str) -> None:
    """A bucket with a correct checksum arrives; while the rank's load_weights holds the first view,
    the slot's bytes change. The version fails with VersionAborted ("changed while it was being
    applied"), is not committed, and model_intact is False. A clean version then commits."""
    hand = HandSender(endpoint)
    rank = GatedRank(endpoint)
    try:
        assert hand.wait_for(m.Hello) is not None
        session = "sum00001"
        slots = hand.slots(2, SLOT, session)
        hand.send(hand.welcome(session, [s.descriptor() for s in slots], SLOT))
        assert rank.wait_status(lambda s: s["connected"], 10)["connected"]

        named = [("a.weight", np.arange(600, dtype=np.float32) * 0.25), ("b", np.array([3, -4, 1 << 41], np.int64))]
        hand.send(hand.begin("v1", named))
        assert hand.wait_for(m.Ready) is not None
        bucket, offsets = hand.bucket("v1", named, slots[0], 0)
        hand.send(bucket)
        assert rank.first_seen.wait(20), "load_weights never got its first view"
        view = slots[0].host_view()
        view[offsets[0]:offsets[0] + 64] ^= 0xFF  # another writer, while the view is being applied
        del view  # the slot is closed later: no numpy view may pin its mapping
        rank.go.set()

        reply = hand.wait_for((m.Prepared, m.Failed), 10)
        if isinstance(reply, m.Prepared):  # the old behaviour: say what a COMMIT then does
            hand.send(m.Commit(version="v1"))
            hand.wait_for(m.Committed, 10)
            status = rank.status()
            pytest.fail(
                "the rank PREPARED a bucket whose bytes changed while it was applied; after COMMIT: "
                f"committed={status['committed_version']} model_intact={status['model_intact']} "
                f"a.weight bit-exact={status['digests'].get('a.weight') == digests(named)['a.weight']}"
            )
        assert isinstance(reply, m.Failed), f"neither PREPARED nor FAILED: {reply!r} {rank.status()}"
        assert reply.version == "v1" and reply.error == "VersionAborted", reply
        assert "changed while it was being applied" in reply.message and "bucket 0" in reply.message, reply.message
        assert reply.model_intact is False, reply
        status = rank.wait_status(lambda s: "changed while it was being applied" in (s["last_error"] or ""), 10)
        assert "changed while it was being applied" in (status["last_error"] or ""), status
        assert status["committed_version"] is None and status["model_intact"] is False, status

        clean = [(n, a + 1) for n, a in named]  # the next version, nothing interferes: commits bit-exact
        hand.send(hand.begin("v2", clean))
        assert hand.wait_for(m.Ready) is not None
        hand.send(hand.bucket("v2", clean, slots[0], 0)[0])
        assert isinstance(hand.wait_for((m.Prepared, m.Failed), 10), m.Prepared), rank.status()
        hand.send(m.Commit(version="v2"))
        assert hand.wait_for(m.Committed, 10) is not None
        status = rank.status()
        assert status["committed_version"] == "v2" and status["model_intact"], status
        assert status["digests"] == digests(clean)
    finally:
        rank.stop()
        hand.close()
