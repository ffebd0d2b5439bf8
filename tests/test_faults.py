"""Faults with real processes: kill -9 of a sender or a receiver, failing load_weights,
corrupt buckets, and long runs of mixed faults checked for leaks.

Every randomised test prints its seed; rerun one with the same seed to reproduce.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
from fault_workers import (
    BUCKET_BYTES,
    HB,
    Collector,
    FakeSender,
    ReceiverProc,
    SenderProc,
    digests,
    make_weights,
    proc_stats,
    shm_segments,
    wait_until,
)

from weightstream import (
    BucketSender,
    PeerLost,
    ReceiverDaemon,
    RemoteError,
    VersionAborted,
)
from weightstream.protocol import messages as m

HB_TIMEOUT = HB["heartbeat_timeout"]
LOSS_BOUND = 2 * HB_TIMEOUT + 1.0  # generous: detection takes about one heartbeat_timeout


# --- kill -9 the sender ------------------------------------------------------------------


def _sender_kill_rounds(endpoint: str, seeds: list[int]) -> None:
    collector = Collector()
    collector.sleep = 0.02  # ~0.4 s per version: widens the window a kill can land in
    daemon = ReceiverDaemon(endpoint, collector, rank=0, **HB).start()
    sender = SenderProc(endpoint)
    outcomes = {"committed": 0, "aborted_touched": 0, "aborted_untouched": 0}
    try:
        assert sender.request(cmd="wait", count=1, timeout=15)["ok"]
        assert sender.request(cmd="push", seed=0, version="base")["ok"]
        daemon.wait_for_version("base", 10)
        prev = "base"
        prev_digests = digests(make_weights(0, "base"))
        assert collector.digests() == prev_digests
        for seed in seeds:
            rng = random.Random(seed)
            # before BEGIN, while tensors are being handed over, or after the commit
            delay = rng.choice([0.0, rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.3), 0.8])
            print(f"seed={seed} kill delay={delay:.3f}s")
            version = f"k{seed}"
            handed_before = collector.handed
            sender.send(cmd="push", seed=seed, version=version)
            time.sleep(delay)
            dead_pid = sender.pid
            assert shm_segments(dead_pid), "the sender's slots should exist while it lives"
            killed_at = time.monotonic()
            sender.kill()

            assert wait_until(lambda: not daemon.status.connected, LOSS_BOUND), (
                f"seed {seed}: receiver still connected {LOSS_BOUND}s after the sender died: {daemon.status}"
            )
            lost_after = time.monotonic() - killed_at
            st = daemon.status
            touched = collector.handed > handed_before
            assert st.state != "receiving", f"seed {seed}: {st}"
            if st.committed_version == version:  # the kill landed after the commit
                outcomes["committed"] += 1
                assert st.model_intact and st.state == "idle", st
                prev, prev_digests = version, digests(make_weights(seed, version))
                assert collector.digests() == prev_digests
            else:
                outcomes["aborted_touched" if touched else "aborted_untouched"] += 1
                assert st.committed_version == prev, st
                assert st.model_intact == (not touched), (
                    f"seed {seed}: load_weights was {'' if touched else 'not '}handed tensors of {version}, "
                    f"but status says model_intact={st.model_intact}: {st}"
                )
                if not touched:
                    assert collector.digests() == prev_digests
            print(f"  receiver saw the loss after {lost_after:.2f}s; state={st.state} intact={st.model_intact}")

            # The dead sender's resource tracker unlinks its segments.
            assert wait_until(lambda pid=dead_pid: not shm_segments(pid), 10.0), (
                f"seed {seed}: segments of dead sender {dead_pid} left: {sorted(shm_segments(dead_pid))}"
            )

            sender = SenderProc(endpoint)
            print(f"  new sender pid {sender.pid}")
            assert sender.request(cmd="wait", count=1, timeout=15)["ok"]
            nxt = f"n{seed}"
            reply = sender.request(cmd="push", seed=seed, version=nxt)
            assert reply["ok"], reply
            daemon.wait_for_version(nxt, 10)
            prev, prev_digests = nxt, digests(make_weights(seed, nxt))
            assert collector.digests() == prev_digests
            st = daemon.status
            assert st.model_intact and st.state == "idle" and st.committed_version == nxt, st
        print(f"sender kills: {len(seeds)} seeds, outcomes {outcomes}")
    finally:
        sender.close()
        print(f"closed sender {sender.pid}: segments left {sorted(shm_segments(sender.pid))}")
        daemon.stop()


@pytest.mark.timeout(90)
def test_kill_sender_mid_version(endpoint: str) -> None:
    _sender_kill_rounds(endpoint, [1, 3, 4])  # a kill before BEGIN, mid-version, after the commit


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_sender_mid_version_many(endpoint: str) -> None:
    _sender_kill_rounds(endpoint, list(range(100, 120)))


# --- kill -9 a receiver --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_kill_receiver_mid_version(endpoint: str) -> None:
    seed = 7
    rng = random.Random(seed)
    delay = rng.uniform(0.15, 0.4)
    print(f"seed={seed} kill delay={delay:.3f}s")
    ranks = {r: ReceiverProc(endpoint, r, sleep=0.05) for r in (0, 1)}  # ~0.9 s per version
    try:
        with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB) as sender:
            sender.wait_for_receivers(timeout=15)
            sender.push(make_weights(seed, "v1"), "v1")
            killed_at: list[float] = []

            def kill() -> None:
                killed_at.append(time.monotonic())
                ranks[1].kill()

            timer = threading.Timer(delay, kill)
            timer.start()
            with pytest.raises(PeerLost) as info:
                sender.push(make_weights(seed, "v2"), "v2")
            raised_at = time.monotonic()
            timer.join()
            assert info.value.rank == 1, info.value
            assert "rank 1" in str(info.value)
            assert killed_at and raised_at - killed_at[0] < LOSS_BOUND
            print(f"push raised PeerLost {raised_at - killed_at[0]:.2f}s after the kill: {info.value}")

            ranks[1] = ReceiverProc(endpoint, 1, sleep=0.05)
            assert ranks[1].wait_connected(15)
            sender.push(make_weights(seed, "v3"), "v3")
            want = digests(make_weights(seed, "v3"))
            for r, proc in ranks.items():
                st = proc.request(cmd="status", digests=True)
                assert st["committed"] == "v3" and st["model_intact"], (r, st)
                assert st["digests"] == want, f"rank {r} is not bit-exact"
    finally:
        for proc in ranks.values():
            proc.stop()


# --- load_weights raising -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_remote_error_is_typed(endpoint: str) -> None:
    collector = Collector()
    with ReceiverDaemon(endpoint, collector, rank=3, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=15)
        sender.push(make_weights(1, "v1"), "v1")
        collector.fail = ("KeyError", 2)
        with pytest.raises(RemoteError) as info:
            sender.push(make_weights(1, "v2"), "v2")
        err = info.value
        assert err.rank == 3 and err.remote_type == "KeyError", (err.rank, err.remote_type, err)
        assert "KeyError" in str(err) and "'x'" in str(err), str(err)
        st = daemon.status
        assert st.committed_version == "v1" and not st.model_intact and st.state == "aborted", st

        sender.push(make_weights(1, "v3"), "v3")
        assert collector.digests() == digests(make_weights(1, "v3"))
        st = daemon.status
        assert st.committed_version == "v3" and st.model_intact and st.state == "idle", st


@pytest.mark.timeout(60)
def test_status_last_error_names_the_remote_type(endpoint: str) -> None:
    """An operator reading status must see what load_weights raised, not just 'RemoteError'."""
    collector = Collector()
    with ReceiverDaemon(endpoint, collector, **HB) as daemon, BucketSender(
        endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=15)
        collector.fail = ("KeyError", 0)
        with pytest.raises(RemoteError):
            sender.push(make_weights(1, "v1"), "v1")
        last = daemon.status.last_error
        assert last is not None and "KeyError" in last, last


@pytest.mark.timeout(60)
def test_checksum_push_end_to_end(endpoint: str) -> None:
    collector = Collector()
    with ReceiverDaemon(endpoint, collector, **HB), BucketSender(
        endpoint, bucket_bytes=BUCKET_BYTES, checksum=True, timeout=30.0, **HB
    ) as sender:
        sender.wait_for_receivers(timeout=15)
        for v in ("v1", "v2"):
            sender.push(make_weights(5, v), v)
            assert collector.digests() == digests(make_weights(5, v))


# --- corrupt or partial buckets from a hand-written sender -----------------------------------------


def _small(version: str) -> list[tuple[str, np.ndarray]]:
    return [(n, a) for n, a in make_weights(3, version)[:4]]


def _good_version(fake: FakeSender, ident: bytes, version: str, checksum: bool = True) -> None:
    named = _small(version)
    fake.send_msg(ident, fake.begin(version, named))
    fake.expect((m.Ready,), 5, lambda x: x.version == version)
    fake.send_msg(ident, fake.bucket_messages(version, named, checksum=checksum))
    fake.expect((m.Prepared,), 5, lambda x: x.version == version)  # two-phase: COMMIT only after PREPARED
    fake.send_msg(ident, m.Commit(version=version))
    fake.expect((m.Committed,), 5, lambda x: x.version == version)


@contextmanager
def _after_v1(endpoint: str) -> Iterator[tuple[Collector, FakeSender, ReceiverDaemon, bytes]]:
    """A daemon on a Collector, served by a fake sender that committed v1 to it."""
    collector = Collector()
    fake = FakeSender(endpoint)
    try:
        with ReceiverDaemon(endpoint, collector, rank=0, **HB) as daemon:
            ident = fake.wait_hello()
            assert wait_until(lambda: daemon.status.connected, 5)
            _good_version(fake, ident, "v1")
            yield collector, fake, daemon, ident
    finally:
        fake.close()


@pytest.mark.timeout(60)
def test_corrupt_bucket_fails_checksum(endpoint: str) -> None:
    with _after_v1(endpoint) as (collector, fake, daemon, ident):
        good = collector.digests()
        assert good == digests(_small("v1"))
        handed = collector.handed

        named = _small("v2")
        fake.send_msg(ident, fake.begin("v2", named))
        fake.expect((m.Ready,), 5, lambda x: x.version == "v2")
        bucket = fake.bucket_messages("v2", named, checksum=True)
        fake.slots[0].host_view()[bucket.arrays()[0][1] + 5] ^= 0xFF  # corrupted between pack and apply
        fake.send_msg(ident, bucket)
        failed = fake.expect((m.Failed,), 5, lambda x: x.version == "v2")
        assert failed.error == "VersionAborted" and "bucket 0" in failed.message, failed
        assert failed.model_intact
        with pytest.raises(VersionAborted, match="bucket 0"):
            daemon.wait_for_version("v2", 5)
        st = daemon.status
        assert st.committed_version == "v1" and st.model_intact and st.state == "idle", st
        assert collector.handed == handed and collector.digests() == good

        _good_version(fake, ident, "v3")  # the daemon goes on
        assert collector.digests() == digests(_small("v3"))


@pytest.mark.timeout(60)
def test_staged_chunk_alone_keeps_model_intact(endpoint: str) -> None:
    """Only the first piece of a chunked tensor arrived (staged in scratch, nothing handed
    to load_weights) when the sender aborted: the model is intact and must say so."""
    with _after_v1(endpoint) as (collector, fake, daemon, ident):
        big = np.arange(2 * BUCKET_BYTES // 4, dtype=np.float32).reshape(2, -1)
        fake.send_msg(ident, fake.begin("v2", [("big", big)], buckets=2))
        fake.expect((m.Ready,), 5, lambda x: x.version == "v2")
        half = big.nbytes // 2
        fake.slots[0].host_view()[:half] = big.view(np.uint8).reshape(-1)[:half]
        fake.send_msg(ident, m.Bucket.build(version="v2", seq=0, slot=0, first=0, offsets=[0], nbytes=[half], chunks=[0]))
        fake.expect((m.Ack,), 5, lambda x: x.version == "v2")  # the piece was staged
        fake.send_msg(ident, m.Abort(version="v2", reason="test"))
        assert wait_until(lambda: daemon.status.state != "receiving", 5)
        st = daemon.status
        assert collector.handed == 4, "nothing of v2 reached load_weights"
        assert st.committed_version == "v1"
        assert st.model_intact, f"nothing of v2 was handed to load_weights, yet {st}"


@pytest.mark.timeout(60)
def test_late_bucket_of_a_failed_version_is_not_an_error(endpoint: str) -> None:
    """A sender streams the buckets it already queued after a rank failed the version.
    The rank must drop them quietly: an ERROR carries no version, so the sender would
    charge it to whatever round runs when it arrives (the next push fails spuriously)."""
    with _after_v1(endpoint) as (collector, fake, _daemon, ident):
        named = _small("v2")
        collector.fail = ("KeyError", 0)  # read when load_weights starts, at BEGIN
        fake.send_msg(ident, fake.begin("v2", named, buckets=2))
        fake.expect((m.Ready,), 5, lambda x: x.version == "v2")
        first = fake.bucket_messages("v2", named[:2], slot=0)
        fake.send_msg(ident, first)
        fake.expect((m.Failed,), 5, lambda x: x.version == "v2")
        second = fake.bucket_messages("v2", named[2:], slot=1, first=2)
        fake.send_msg(ident, replace(second, seq=1))
        with pytest.raises(TimeoutError):  # noqa: PT012 - an answer is the failure, reported as such
            err = fake.expect((m.Error,), 1.0)
            pytest.fail(f"the rank answered a late BUCKET of the version it failed with {err}")


# --- many cycles with faults: leaks ------------------------------------------------------------------


def _cycles(endpoint: str, cycles: int, seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed={seed} cycles={cycles}")
    sender = SenderProc(endpoint, receivers=2, checksum=True)
    ranks = {r: ReceiverProc(endpoint, r, expected_layout="base") for r in (0, 1)}
    counts = {"pushes": 0, "rejected_manifests": 0, "load_errors": 0, "receiver_restarts": 0}
    recovered = 0
    base: dict[str, dict[str, int]] = {}
    base_segments: set[str] = set()
    warmup = max(5, cycles // 10)
    step = 0

    def push_ok() -> None:
        nonlocal step
        step += 1
        version = f"c{step}"
        reply = sender.request(cmd="push", seed=seed, version=version)
        assert reply["ok"], (version, reply)
        want = digests(make_weights(seed, version))
        for r, proc in ranks.items():
            st = proc.request(cmd="status", digests=True)
            assert st["committed"] == version and st["model_intact"] and st["digests"] == want, (r, version, st)
        counts["pushes"] += 1

    try:
        assert sender.request(cmd="wait", count=2, timeout=15)["ok"]
        push_ok()
        for i in range(cycles):
            if i == warmup:
                base = {"sender": proc_stats(sender.pid), "rank0": proc_stats(ranks[0].pid)}
                base_segments = shm_segments(sender.pid)  # other processes on the host may use ws_* too
            fault = rng.choices(["none", "reject", "load_error", "restart"], [55, 15, 15, 15])[0]
            if fault == "reject":
                before = {r: p.status() for r, p in ranks.items()}
                reply = sender.request(cmd="push", seed=seed, version=f"bad{i}", layout="bad")
                assert not reply["ok"] and reply["type"] == "ManifestMismatch", reply
                for r, p in ranks.items():
                    st = p.status()
                    assert st["committed"] == before[r]["committed"] and st["model_intact"], (r, st)
                    assert st["handed"] == before[r]["handed"]
                counts["rejected_manifests"] += 1
            elif fault == "load_error":
                r = rng.choice([0, 1])
                ranks[r].request(cmd="fail_next", exc=rng.choice(["KeyError", "ValueError"]), after=rng.randrange(6))
                reply = sender.request(cmd="push", seed=seed, version=f"err{i}")
                assert not reply["ok"] and reply["type"] == "RemoteError" and reply["rank"] == r, reply
                assert reply["remote_type"] in ("KeyError", "ValueError"), reply
                assert not ranks[r].status()["model_intact"]
                counts["load_errors"] += 1
            elif fault == "restart":
                old = ranks[1]
                old.kill() if rng.random() < 0.5 else old.stop()
                ranks[1] = ReceiverProc(endpoint, 1, expected_layout="base")
                assert ranks[1].wait_connected(15)
                counts["receiver_restarts"] += 1
            push_ok()
            if fault != "none":
                recovered += 1

        # Settle: connections of restarted ranks close asynchronously.
        leaks: list[str] = []
        now: dict[str, dict[str, int]] = {}
        for who, pid in (("sender", sender.pid), ("rank0", ranks[0].pid)):
            wait_until(
                lambda pid=pid, b=base[who]: (s := proc_stats(pid))["fds"] <= b["fds"] and s["threads"] <= b["threads"],
                5.0,
                0.1,
            )
            now[who] = proc_stats(pid)
            b, n = base[who], now[who]
            if n["fds"] > b["fds"]:
                leaks.append(f"{who} fds {b['fds']} -> {n['fds']}")
            if n["threads"] > b["threads"]:
                leaks.append(f"{who} threads {b['threads']} -> {n['threads']}")
            if n["rss"] - b["rss"] > 50 << 20:
                leaks.append(f"{who} rss +{(n['rss'] - b['rss']) >> 20} MiB")
        segments_now = shm_segments(sender.pid)
        assert base_segments == set(sender.segments)
        if segments_now != base_segments:
            leaks.append(f"/dev/shm {sorted(base_segments)} -> {sorted(segments_now)}")
        injected = counts["rejected_manifests"] + counts["load_errors"] + counts["receiver_restarts"]
        print(f"cycles={cycles} {counts} faults_injected={injected} recovered={recovered} leaks_found={len(leaks)}")
        for who in now:
            b, n = base[who], now[who]
            print(
                f"  {who}: fds {b['fds']}->{n['fds']} threads {b['threads']}->{n['threads']} "
                f"rss {b['rss'] / 2**20:.1f}->{n['rss'] / 2**20:.1f} MiB"
            )
        print(f"  /dev/shm ws_* segments: {len(base_segments)} -> {len(segments_now)}")
        assert recovered == injected
        assert not leaks, leaks
    finally:
        for proc in ranks.values():
            proc.stop()
        sender.close()


@pytest.mark.timeout(120)
def test_fault_cycles_no_leaks(endpoint: str) -> None:
    _cycles(endpoint, 30, seed=2024)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fault_cycles_no_leaks_long(endpoint: str) -> None:
    _cycles(endpoint, 200, seed=4242)
