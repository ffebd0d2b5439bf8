"""Two-phase commit (protocol v6) with real processes, real ZeroMQ and bit-exact digests.

A version is committed on no rank unless every rank of the push said PREPARED: a rank
whose load_weights raises, a rank that is lost, a rank that rejects, or a sender killed
with SIGKILL mid-push leaves every rank on its previous committed version (a non-staged
rank whose model was written says model_intact=False; a staged rank's served model is
never touched before COMMIT). ``push`` returns a PushReport with committed=True, or raises
an error carrying ``exc.report`` (committed=False, every rank's outcome).

Ranks run in spawned processes (commit_workers.RankProc); the sender that is killed runs
in its own subprocess (commit_workers.SenderProc) so that its own resource tracker unlinks
its slots. Every randomised test prints its seed; rerun one seed to reproduce it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import pytest
from commit_workers import (
    BUCKET_BYTES,
    HB,
    LAYOUT,
    NUM_BUFFERS,
    RankProc,
    SenderProc,
    digests,
    make_weights,
    shm_segments,
    version_digests,
    wait_until,
)

from weightstream import BucketSender, ManifestMismatch, PeerLost, RemoteError

NOTICE_BOUND = 15.0  # generous bound for a rank to see its sender gone (heartbeat timeout 1.0 s)
SLOW = 0.012  # seconds per tensor on the slow rank: a version takes it ~0.35 s


def _sender(endpoint: str) -> BucketSender:
    return BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET_BYTES, num_buffers=NUM_BUFFERS, timeout=30.0, **HB)


def _stop(ranks: dict[int, RankProc]) -> None:
    for proc in ranks.values():
        proc.stop()


def _report_of(exc: BaseException) -> Any:
    from weightstream import PushReport

    report = getattr(exc, "report", None)
    assert isinstance(report, PushReport), (
        f"{type(exc).__name__} raised by push carries no PushReport in exc.report (got {report!r}): {exc}"
    )
    return report


def _assert_committed_everywhere(ranks: dict[int, RankProc], version: str) -> None:
    want = version_digests(version)
    for r, proc in ranks.items():
        q = proc.settled()
        st = q["status"]
        assert st["committed_version"] == version and st["model_intact"] and st["state"] == "idle", (r, version, st)
        assert q["model"] == want, f"rank {r}: model is not bit-exact {version}"
        assert q["last_full"] == version and q["last_full_call"]["digests"] == want, (
            f"rank {r}: load_weights did not receive {version} bit-exact: {q['last_full']}"
        )


def _assert_success_report(report: Any, version: str, ranks: set[int]) -> None:
    from weightstream import PushReport

    assert isinstance(report, PushReport), report
    assert report.version == version, report
    assert getattr(report, "committed", None) is True, f"a successful push must report committed=True: {report}"
    assert set(report.receivers) == ranks, report
    total = sum(a.nbytes for _, a in make_weights(0))
    assert report.tensors == len(LAYOUT) and report.bytes == total, report
    for r, res in report.receivers.items():
        assert getattr(res, "outcome", None) == "committed", f"rank {r}: {res}"
        assert getattr(res, "error", "<missing>") is None, f"rank {r}: {res}"
        assert getattr(res, "model_intact", "<missing>") in (None, True), f"rank {r}: {res}"
        assert res.rank == r and res.tensors == len(LAYOUT) and res.bytes == total, res


# --- 3. success ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_success_report_says_committed_on_every_rank(endpoint: str) -> None:
    ranks = {0: RankProc(endpoint, 0, staged=True), 1: RankProc(endpoint, 1)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            for step in (1, 2):  # the second push names the layout instead of resending it
                version = f"v{step}"
                report = sender.push(make_weights(step), version)
                _assert_success_report(report, version, {0, 1})
                _assert_committed_everywhere(ranks, version)
                assert sender.committed_version == version
    finally:
        _stop(ranks)


# --- 1. a rank's load_weights raises -------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("staged0", [False, True], ids=["rank0_direct", "rank0_staged"])
def test_failed_rank_aborts_the_version_on_every_rank(endpoint: str, staged0: bool) -> None:
    """Rank 1 (slow) refuses the very last tensor of v2 long after rank 0 received all of v2.
    No rank may commit v2; rank 0 is "aborted", rank 1 "failed"; v3 then commits on both."""
    ranks = {0: RankProc(endpoint, 0, staged=staged0), 1: RankProc(endpoint, 1, delay=SLOW)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            sender.push(make_weights(1), "v1")
            _assert_committed_everywhere(ranks, "v1")
            before0 = ranks[0].query()

            with pytest.raises(RemoteError) as info:
                sender.push(make_weights(2, refuse=1 << 1), "v2")
            exc = info.value
            print(f"push raised {type(exc).__name__}: {exc}")
            assert exc.rank == 1 and exc.remote_type == "ValueError", (exc.rank, exc.remote_type, exc)

            q0, q1 = ranks[0].settled(), ranks[1].settled()
            s0, s1 = q0["status"], q1["status"]
            assert s0["committed_version"] == "v1", f"rank 0 committed v2, which rank 1 failed: {s0}"
            assert s1["committed_version"] == "v1", s1
            assert not s1["model_intact"] and s1["state"] == "aborted", s1
            touched0 = q0["handed"] > before0["handed"]
            if staged0:
                assert q0["ncalls"] == before0["ncalls"], (
                    f"staged rank 0 called load_weights for v2, which was never committed: {q0['calls'][-1]}"
                )
                assert s0["model_intact"] and s0["state"] == "idle", s0
                assert q0["model"] == version_digests("v1"), "staged rank 0's served model changed on an abort"
            else:
                assert touched0, "rank 0 should have received v2 (it is fast, rank 1 fails at the last tensor)"
                assert not s0["model_intact"] and s0["state"] == "aborted", (
                    f"rank 0's load_weights got bytes of the aborted v2, yet status says {s0}"
                )

            report = _report_of(exc)
            print(f"report: {report}")
            assert report.committed is False and report.version == "v2", report
            assert set(report.receivers) == {0, 1}, report
            r0, r1 = report.receivers[0], report.receivers[1]
            assert r1.outcome == "failed", r1
            assert r1.error and ("refuses" in r1.error or "ValueError" in r1.error), f"rank 1's error must say why: {r1}"
            assert r0.outcome == "aborted", f"rank 0 was fine but rank 1 failed: expected 'aborted', got {r0}"
            assert r0.model_intact in (None, s0["model_intact"]), (r0, s0)
            assert r1.model_intact in (None, False), r1
            assert sender.committed_version == "v1"

            report = sender.push(make_weights(3), "v3")
            _assert_success_report(report, "v3", {0, 1})
            _assert_committed_everywhere(ranks, "v3")
    finally:
        _stop(ranks)


# --- 2. a staged rank's served model changes only at COMMIT ---------------------------------------


@pytest.mark.timeout(90)
def test_staged_rank_model_untouched_when_aborted_after_prepared(endpoint: str) -> None:
    """Staged rank 0 has all of v2 staged (PREPARED) long before slow rank 1 refuses v2's last
    tensor: rank 0's load_weights is never called for v2, its model stays v1 bit-exact."""
    ranks = {0: RankProc(endpoint, 0, staged=True), 1: RankProc(endpoint, 1, delay=SLOW)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            sender.push(make_weights(1), "v1")
            _assert_committed_everywhere(ranks, "v1")
            before = ranks[0].query()
            for step in (2, 3):  # twice: the second time the layout is named, not resent
                with pytest.raises(RemoteError):
                    sender.push(make_weights(step, refuse=1 << 1), f"v{step}")
                q0 = ranks[0].settled()
                st = q0["status"]
                assert q0["ncalls"] == before["ncalls"], (
                    f"staged rank 0 called load_weights for v{step}, which was never committed: {q0['calls'][-1]}"
                )
                assert q0["model"] == version_digests("v1"), f"staged rank 0's served model changed by aborted v{step}"
                assert st["committed_version"] == "v1" and st["model_intact"] and st["state"] == "idle", st
            sender.push(make_weights(4), "v4")
            _assert_committed_everywhere(ranks, "v4")
    finally:
        _stop(ranks)


@pytest.mark.timeout(90)
def test_staged_rank_loads_only_after_every_rank_prepared(endpoint: str) -> None:
    """Fast staged rank 0 and slow non-staged rank 1: rank 0's load_weights (the only thing
    that changes its served model) starts only after rank 1's load_weights consumed the
    whole version, because COMMIT needs rank 1's PREPARED, which follows it. Both are read
    from CLOCK_MONOTONIC, one clock for every process of the host: an order, not a duration."""
    ranks = {0: RankProc(endpoint, 0, staged=True), 1: RankProc(endpoint, 1, delay=SLOW)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            for step in (1, 2):
                version = f"v{step}"
                sender.push(make_weights(step), version)
                _assert_committed_everywhere(ranks, version)
                c0 = ranks[0].query()["last_full_call"]
                c1 = ranks[1].query()["last_full_call"]
                assert c0["step"] == c1["step"] == step, (c0["step"], c1["step"])
                assert c0["t0"] >= c1["t1"], (
                    f"{version}: staged rank 0 began changing its served model "
                    f"{c1['t1'] - c0['t0']:.3f}s before slow rank 1 had received the whole version, i.e. before "
                    "rank 1 could have said PREPARED and so before any COMMIT"
                )
    finally:
        _stop(ranks)


# --- other outcomes: rejected, lost ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_rejecting_rank_aborts_the_others(endpoint: str) -> None:
    """Rank 1 checks the manifest and rejects a version with an unknown tensor: "rejected";
    rank 0 said READY and is "aborted"; nothing was written anywhere."""
    ranks = {0: RankProc(endpoint, 0), 1: RankProc(endpoint, 1, strict=True)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            sender.push(make_weights(1), "v1")
            _assert_committed_everywhere(ranks, "v1")
            before = {r: p.query()["handed"] for r, p in ranks.items()}
            with pytest.raises(ManifestMismatch) as info:
                sender.push(make_weights(2, extra=True), "v2")
            report = _report_of(info.value)
            assert report.committed is False, report
            assert report.receivers[1].outcome == "rejected", report.receivers
            assert report.receivers[0].outcome == "aborted", report.receivers
            for r, proc in ranks.items():
                q = proc.settled()
                st = q["status"]
                assert st["committed_version"] == "v1" and st["model_intact"] and st["state"] == "idle", (r, st)
                assert q["handed"] == before[r], f"rank {r}: load_weights was handed tensors of the rejected v2"
                assert q["model"] == version_digests("v1"), f"rank {r}: model changed by the rejected v2"
            sender.push(make_weights(3), "v3")
            _assert_committed_everywhere(ranks, "v3")
    finally:
        _stop(ranks)


@pytest.mark.timeout(120)
def test_lost_rank_aborts_the_others(endpoint: str) -> None:
    """Rank 1 is killed (SIGKILL) while its load_weights is half way through v2: push raises
    PeerLost naming it, its outcome is "lost" and rank 0, which had all of v2, did not commit it."""
    ranks = {0: RankProc(endpoint, 0), 1: RankProc(endpoint, 1, delay=SLOW)}
    try:
        with _sender(endpoint) as sender:
            sender.wait_for_receivers(2, timeout=30)
            sender.push(make_weights(1), "v1")
            _assert_committed_everywhere(ranks, "v1")
            calls1 = ranks[1].query()["ncalls"]
            box: dict[str, BaseException] = {}

            def push() -> None:
                try:
                    sender.push(make_weights(2), "v2")
                except BaseException as exc:  # asserted below
                    box["exc"] = exc

            pusher = threading.Thread(target=push)
            pusher.start()

            def halfway() -> bool:
                q = ranks[1].query()
                return q["ncalls"] > calls1 and q["calls"][-1]["count"] >= len(LAYOUT) // 2

            assert wait_until(halfway, 30, 0.01), "rank 1 never got half way through v2"
            ranks[1].kill()
            pusher.join(60)
            assert not pusher.is_alive(), "push did not return after rank 1 was killed"
            exc = box.get("exc")
            assert isinstance(exc, PeerLost), f"expected PeerLost, got {exc!r}"
            assert exc.rank == 1 and "rank 1" in str(exc), exc
            q0 = ranks[0].settled()
            st = q0["status"]
            assert st["committed_version"] == "v1", f"rank 0 committed v2 although rank 1 was lost before PREPARED: {st}"
            assert not st["model_intact"] and st["state"] == "aborted", st  # its load_weights took all of v2
            report = _report_of(exc)
            assert report.committed is False, report
            assert report.receivers[1].outcome == "lost", report.receivers
            assert report.receivers[0].outcome == "aborted", report.receivers

            ranks[1] = RankProc(endpoint, 1, delay=SLOW)
            sender.wait_for_receivers(2, timeout=30)
            sender.push(make_weights(3), "v3")
            _assert_committed_everywhere(ranks, "v3")
    finally:
        _stop(ranks)


# --- a sender that comes up late ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_late_sender_is_not_taken_for_a_silent_one(endpoint: str) -> None:
    """A trainer that starts (or restarts, as after the kills below) more than heartbeat_timeout
    after the rank opened its socket: the WELCOME starts the session, so the rank must not count
    the wait before it as the sender's silence, drop the fresh connection and reconnect (the
    sender would send the next BEGIN to a closed connection: PeerLost "Host unreachable")."""
    rank = RankProc(endpoint, 0)
    try:
        time.sleep(2 * HB["heartbeat_timeout"])  # the rank waits for a sender longer than heartbeat_timeout
        with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, num_buffers=NUM_BUFFERS, timeout=30.0, **HB) as sender:
            sender.wait_for_receivers(1, timeout=30)
            assert wait_until(lambda: rank.query()["status"]["connected"], 10)
            time.sleep(5 * HB["heartbeat_interval"])  # a few heartbeats, well within heartbeat_timeout
            st = rank.query()["status"]
            assert st["connected"] and st.get("reconnects", 0) == 0, (
                f"the rank reconnected right after its sender's WELCOME, with no silence from the sender: {st}"
            )
            sender.push(make_weights(1), "v1")
            q = rank.settled()
            assert q["status"]["committed_version"] == "v1" and q["model"] == version_digests("v1"), q["status"]
    finally:
        rank.stop()


# --- 4. kill -9 the sender at a random point of a push -----------------------------------------------


def _check_after_kill(seed: int, q: dict[int, dict[str, Any]], va: str, vb: str, dead_by: float) -> str:
    """The invariants after a sender died during the push of ``vb`` (``va`` committed before);
    ``dead_by``: CLOCK_MONOTONIC when the sender was known dead (its wait() returned)."""
    for r in (0, 1):
        st = q[r]["status"]
        assert st["state"] in ("idle", "aborted"), f"seed {seed} rank {r}: {st}"
        assert st["committed_version"] in (va, vb), f"seed {seed} rank {r}: {st}"
        full = q[r]["last_full_call"]
        assert full is not None and full["digests"] == version_digests(q[r]["last_full"]), (
            f"seed {seed} rank {r}: load_weights last received {q[r]['last_full']} in full, but not bit-exact"
        )
        if st["model_intact"]:
            assert st["state"] == "idle", f"seed {seed} rank {r}: {st}"
            assert q[r]["last_full"] == st["committed_version"], (
                f"seed {seed} rank {r}: load_weights last received {q[r]['last_full']} in full, the rank says it "
                f"serves {st['committed_version']} and that its model is intact: {st}"
            )
            assert q[r]["model"] == version_digests(st["committed_version"]), (
                f"seed {seed} rank {r}: model_intact, yet its model is not {st['committed_version']} bit-exact"
            )
        else:
            assert st["committed_version"] == va and st["state"] == "aborted", f"seed {seed} rank {r}: {st}"

    s0 = q[0]["status"]
    # rank 0 is staged: load_weights only at COMMIT, so its served model never changes on an abort
    assert s0["model_intact"], f"seed {seed}: staged rank 0 says its model is not intact: {s0}"
    assert q[0]["model"] == version_digests(s0["committed_version"]), f"seed {seed}: staged rank 0 serves a torn model"
    # two-phase: a COMMIT of vb went out only after every rank PREPARED it, and slow non-staged
    # rank 1 can say PREPARED only once its load_weights took the whole of vb
    # (times: CLOCK_MONOTONIC, one clock for every process of the host; orders, not durations)
    full1 = q[1]["last_full_call"]
    for r in (0, 1):
        if q[r]["status"]["committed_version"] == vb:
            assert q[1]["last_full"] == vb, (
                f"seed {seed}: rank {r} committed {vb}, but rank 1's load_weights never received the whole of "
                f"{vb} (it last received {q[1]['last_full']} in full; its last call: "
                f"{ {k: v for k, v in q[1]['calls'][-1].items() if k != 'digests'} }), so rank 1 never PREPARED it: "
                f"rank 0 {q[0]['status']}, rank 1 {q[1]['status']}"
            )
            assert full1["t1"] < dead_by, (
                f"seed {seed}: rank {r} committed {vb}, but rank 1's load_weights finished taking {vb} "
                f"{full1['t1'] - dead_by:.3f}s after the sender was dead: rank 1 cannot have said PREPARED to it, "
                f"so no COMMIT of {vb} can have been sent: rank 0 {q[0]['status']}, rank 1 {q[1]['status']}"
            )
    if s0["committed_version"] == vb:
        full0 = q[0]["last_full_call"]
        assert full0["step"] == full1["step"] and full0["t0"] >= full1["t1"], (
            f"seed {seed}: staged rank 0 began loading {vb} into its served model "
            f"{full1['t1'] - full0['t0']:.3f}s before rank 1 had taken the whole of it (before any COMMIT could exist)"
        )
    c0, c1 = s0["committed_version"], q[1]["status"]["committed_version"]
    if c0 == vb and c1 == vb:
        return "committed"
    if c0 == va and c1 == va:
        return "aborted, rank 1 torn" if not q[1]["status"]["model_intact"] else "aborted, untouched"
    return f"split: rank 0 {c0}, rank 1 {c1}"


def _sender_kill_rounds(endpoint: str, seeds: list[int]) -> None:
    ranks = {0: RankProc(endpoint, 0, staged=True), 1: RankProc(endpoint, 1, delay=SLOW)}
    outcomes: Counter[str] = Counter()
    try:
        for seed in seeds:
            rng = random.Random(seed)
            frac = rng.uniform(0.0, 1.3)  # of push a's duration: before BEGIN .. after the commit
            va, vb, vc = (f"v{seed * 10 + k}" for k in (1, 2, 3))
            sender = SenderProc(endpoint)
            try:
                assert sender.request(cmd="wait", count=2, timeout=30)["ok"]
                ra = sender.request(cmd="push", step=int(va[1:]))
                assert ra["ok"], f"seed {seed}: the push of {va} failed: {ra}"
                _assert_committed_everywhere(ranks, va)
                delay = frac * ra["seconds"]
                print(f"seed={seed} kill {delay:.3f}s into the push of {vb} ({frac:.2f} of {ra['seconds']:.3f}s)")
                sender.send(cmd="push", step=int(vb[1:]), announce=True)
                assert sender.reply(30).get("pushing") == vb
                time.sleep(delay)
            finally:
                sender.kill()  # SIGKILL, and wait() for it
            dead, dead_by = sender.pid, time.monotonic()

            assert wait_until(lambda: not any(p.query()["status"]["connected"] for p in ranks.values()), NOTICE_BOUND), (
                f"seed {seed}: a rank still says connected {NOTICE_BOUND}s after its sender was killed: "
                f"{[p.query()['status'] for p in ranks.values()]}"
            )
            q = {r: p.settled() for r, p in ranks.items()}
            outcome = _check_after_kill(seed, q, va, vb, dead_by)
            outcomes[outcome] += 1
            print(
                f"  {outcome}: "
                + "; ".join(
                    f"rank {r} committed {q[r]['status']['committed_version']} intact={q[r]['status']['model_intact']} "
                    f"state={q[r]['status']['state']} last_full={q[r]['last_full']} "
                    f"last_call=({q[r]['calls'][-1]['step']}, {q[r]['calls'][-1]['count']}/{len(LAYOUT)})"
                    for r in (0, 1)
                )
            )
            # the dead sender's own resource tracker unlinks its slots
            assert wait_until(lambda dead=dead: not shm_segments(dead), 10.0), f"seed {seed}: slots of {dead} left: {shm_segments(dead)}"

            fresh = SenderProc(endpoint)
            try:
                assert fresh.request(cmd="wait", count=2, timeout=30)["ok"]
                rc = fresh.request(cmd="push", step=int(vc[1:]))
                assert rc["ok"], (
                    f"seed {seed}: the push of {vc} by a fresh sender failed: {rc}; ranks now: "
                    f"{[p.query()['status'] for p in ranks.values()]}"
                )
                assert rc["report"]["committed"] is True, f"seed {seed}: {rc['report']}"
                assert {v["outcome"] for v in rc["report"]["receivers"].values()} == {"committed"}, f"seed {seed}: {rc['report']}"
                _assert_committed_everywhere(ranks, vc)
            finally:
                fresh.close()
            assert not shm_segments(fresh.pid), f"seed {seed}: a closed sender left {shm_segments(fresh.pid)}"
        print(f"sender kills: {len(seeds)} seeds, outcomes {dict(outcomes)}")
    finally:
        _stop(ranks)


@pytest.mark.timeout(120)
def test_kill_sender_mid_push_two_phase(endpoint: str) -> None:
    # kills at 0.17, 0.31, 0.81 and 1.03 of a push: early, mid-bucket, late, around the commit
    # (the slow-marked run below takes 30 more)
    _sender_kill_rounds(endpoint, [1, 3, 5, 6])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_sender_mid_push_two_phase_many(endpoint: str) -> None:
    _sender_kill_rounds(endpoint, list(range(100, 130)))


def test_weights_are_distinct_per_version() -> None:
    """Self-check of the harness: every version's weights differ in every tensor."""
    a, b = digests(make_weights(11)), digests(make_weights(12))
    assert set(a) == set(b) == {n for n, _, _ in LAYOUT}
    assert all(a[n] != b[n] for n in a)
