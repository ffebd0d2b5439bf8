"""Who holds a rank (protocol v6): routing identities are per connection and the rank is
claimed in HELLO with the daemon's session token. A second claimant of a live rank is
refused with RankInUse and adopted only once the holder is dead (or with the holder's
token); allowed_clients can map CURVE keys to ranks; a daemon reconnects by itself after
the sender went silent. Real processes, real sockets, bit-exact checks."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import zmq
from fault_workers import BUCKET_BYTES, Collector, SenderProc, digests, make_weights
from hostile_workers import HB, DaemonProc, FakeRouter, hello, read_reply, wait_until

from weightstream import BucketSender, CurveKeys, ReceiverDaemon
from weightstream.protocol import messages as m

CLAIM_TIMEOUT = 15.0  # a refused claimant learns it, or a dead holder is replaced, well within this


def _names_rank(text: str, rank: int) -> bool:
    return re.search(rf"\brank\D{{0,3}}{rank}\b", text) is not None


@pytest.fixture
def sender(endpoint: str) -> Iterator[BucketSender]:
    s = BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB)
    try:
        yield s
    finally:
        s.close()


def _push(sender: BucketSender, seed: int, version: str) -> object:
    report = sender.push(make_weights(seed, version), version)
    assert set(report.receivers) == {0}, report.receivers
    # v6 reports say so explicitly (PushReport.committed, ReceiverResult.outcome)
    assert getattr(report, "committed", True) is True, report
    assert getattr(report.receivers[0], "outcome", "committed") == "committed", report
    return report


# --- 1. a duplicate daemon ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_duplicate_daemon_is_refused_until_the_holder_dies(endpoint: str, sender: BucketSender) -> None:
    first = DaemonProc(endpoint, rank=0)
    second = None
    try:
        assert sender.wait_for_receivers(1, timeout=20) == [0]
        _push(sender, 1, "v1")
        assert first.status(digests=True)["digests"] == digests(make_weights(1, "v1"))

        second = DaemonProc(endpoint, rank=0)  # another process claiming the same rank
        s2 = second.wait_status(lambda s: (s["last_error"] or "").startswith("RankInUse:"), CLAIM_TIMEOUT)
        err = s2["last_error"] or ""
        assert err.startswith("RankInUse:"), f"the duplicate claimant was not refused with RankInUse: {s2}"
        assert _names_rank(err, 0) and re.search(r"held|holds|in use", err.split(":", 1)[1], re.I), err
        assert not s2["connected"], s2
        print(f"duplicate claimant: {err}")

        # the holder keeps the rank: a push reaches only it, bit-exact
        _push(sender, 1, "v2")
        s1 = first.status(digests=True)
        assert s1["digests"] == digests(make_weights(1, "v2"))
        assert s1["committed_version"] == "v2" and s1["connected"] and s1["last_error"] is None, s1
        s2 = second.status()
        assert s2["handed"] == 0 and s2["committed_version"] is None and not s2["connected"], s2

        # kill -9 the holder: after the sender's heartbeat timeout the claimant is adopted
        first.kill()
        killed = time.monotonic()
        s2 = second.wait_status(lambda s: s["connected"], CLAIM_TIMEOUT + HB["heartbeat_timeout"])
        assert s2["connected"], f"the claimant was not adopted after the holder died: {s2}"
        print(f"kill -9 of the holder -> claimant connected: {time.monotonic() - killed:.2f}s")
        assert sender.wait_for_receivers(1, timeout=10) == [0]
        _push(sender, 1, "v3")
        s2 = second.status(digests=True)
        assert s2["digests"] == digests(make_weights(1, "v3")) and s2["committed_version"] == "v3", s2
    finally:
        first.kill()
        if second is not None:
            second.stop()


# --- 2. a rogue DEALER --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("routing_id", [b"0", None], ids=["old-identity-b0", "random-identity"])
def test_rogue_hello_for_a_held_rank_gets_rank_in_use(
    endpoint: str, sender: BucketSender, routing_id: bytes | None
) -> None:
    collector = Collector()
    with ReceiverDaemon(endpoint, collector, rank=0, **HB) as daemon:
        assert sender.wait_for_receivers(1, timeout=10) == [0]
        _push(sender, 2, "v1")
        reconnects = getattr(daemon.status, "reconnects", None)

        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            rogue.setsockopt(zmq.ROUTING_ID, routing_id)  # the identity v5 ranks used for rank 0
        try:
            rogue.connect(endpoint)
            rogue.send(m.encode(hello(0, secrets.token_hex(8))))  # another session token
            reply = read_reply(rogue, 10.0)
            assert isinstance(reply, m.Error), f"expected ERROR RankInUse for a claim on a held rank, got {reply!r}"
            assert reply.error == "RankInUse", reply
            print(f"rogue ({routing_id!r}) got ERROR {reply.error}: {reply.message}")
            # nothing else: no WELCOME follows
            more = read_reply(rogue, 0.5)
            assert not isinstance(more, m.Welcome), more

            # the real rank keeps committing, on the connection it had
            for v in ("v2", "v3"):
                _push(sender, 2, v)
                assert collector.digests() == digests(make_weights(2, v))
        finally:
            rogue.close(linger=0)
            ctx.term()
        status = daemon.status
        assert status.connected and status.committed_version == "v3" and status.last_error is None, status
        assert getattr(status, "reconnects", None) == reconnects, "the holder was made to reconnect by a rogue claim"


# --- 3. a claim with the holder's session token ---------------------------------------------


@pytest.mark.timeout(60)
def test_claim_with_the_holders_token_is_adopted_at_once(endpoint: str) -> None:
    """The daemon's session token is read off the wire (a fake sender takes its HELLO first).
    A claim carrying it is adopted at once although the holder is alive; the displaced daemon
    learns (PONG known=False), reconnects with its token and takes its rank back."""
    collector = Collector()
    fake = FakeRouter(endpoint)
    with ReceiverDaemon(endpoint, collector, rank=0, **HB) as daemon:
        try:
            token = fake.wait_for(m.Hello).session
        finally:
            fake.close()
        with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB) as sender:
            assert sender.wait_for_receivers(1, timeout=10) == [0]
            _push(sender, 3, "v1")
            assert collector.digests() == digests(make_weights(3, "v1"))
            before = getattr(daemon.status, "reconnects", 0)

            ctx = zmq.Context()
            rogue = ctx.socket(zmq.DEALER)  # a random routing identity, as every v6 connection has
            rogue.setsockopt(zmq.LINGER, 0)
            try:
                rogue.connect(endpoint)
                rogue.send(m.encode(hello(0, token)))
                reply = read_reply(rogue, 10.0)
                assert isinstance(reply, m.Welcome), f"the holder's token was not adopted at once: {reply!r}"
            finally:
                rogue.close(linger=0)
                ctx.term()

            assert wait_until(lambda: daemon.status.reconnects > before and daemon.status.connected, CLAIM_TIMEOUT), (
                f"the displaced daemon did not reconnect: {daemon.status}"
            )
            assert sender.wait_for_receivers(1, timeout=10) == [0]
            _push(sender, 3, "v2")
            assert collector.digests() == digests(make_weights(3, "v2"))
            assert daemon.committed_version == "v2"


# --- 4. CURVE keys mapped to ranks -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_curve_key_may_claim_only_its_rank() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    server, key0, key1 = CurveKeys.generate(), CurveKeys.generate(), CurveKeys.generate()
    impostor, good = Collector(), Collector()
    allowed = {0: key0.public, 1: key1.public}
    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, curve_keys=server, allowed_clients=allowed, timeout=30.0,
                      **HB) as sender:
        with ReceiverDaemon(endpoint, impostor, rank=0, curve_keys=key1, server_key=server.public, **HB) as wrong:
            assert wait_until(lambda: (wrong.status.last_error or "").startswith("IdentityRefused:"), CLAIM_TIMEOUT), (
                f"rank 0 claimed with rank 1's key was not refused with IdentityRefused: {wrong.status}"
            )
            err = wrong.status.last_error or ""
            assert _names_rank(err, 0) and _names_rank(err, 1), f"expected both ranks named: {err}"
            print(f"key of rank 1 claiming rank 0: {err}")
            with ReceiverDaemon(endpoint, good, rank=0, curve_keys=key0, server_key=server.public, **HB) as right:
                assert sender.wait_for_receivers(1, timeout=15) == [0]
                _push(sender, 4, "v1")
                assert good.digests() == digests(make_weights(4, "v1"))
                assert right.committed_version == "v1" and right.status.connected
            assert not wrong.status.connected and wrong.committed_version is None and impostor.handed == 0


# --- 5. the sender went silent ---------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_rank_reconnects_after_a_stopped_sender(endpoint: str) -> None:
    collector = Collector()
    proc = SenderProc(endpoint)
    try:
        with ReceiverDaemon(endpoint, collector, rank=0, **HB) as daemon:
            assert proc.request(cmd="wait", count=1, timeout=20)["ranks"] == [0]
            reply = proc.request(cmd="push", seed=5, version="v1")
            assert reply["ok"] and reply["ranks"] == [0], reply
            assert collector.digests() == digests(make_weights(5, "v1"))
            before = daemon.status.reconnects

            os.kill(proc.pid, signal.SIGSTOP)
            try:
                # silent past the heartbeat timeout (1 s): the rank gives up the session and reconnects
                reconnected = wait_until(lambda: daemon.status.reconnects > before, 15.0)
                silent = daemon.status
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            assert reconnected, f"the rank did not reconnect while the sender was stopped: {silent}"
            assert wait_until(lambda: daemon.status.connected, 20.0, interval=0.005), daemon.status
            took = time.monotonic() - resumed
            print(f"SIGCONT -> rank connected again: {took:.3f}s (reconnects {before} -> {daemon.status.reconnects}, "
                  f"last_reconnect={daemon.status.last_reconnect!r})")

            reply = proc.request(cmd="push", seed=5, version="v2")
            assert reply["ok"] and reply["ranks"] == [0], reply
            assert collector.digests() == digests(make_weights(5, "v2"))
            assert daemon.committed_version == "v2"
    finally:
        proc.close()
