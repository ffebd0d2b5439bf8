"""Observing pushes from outside: pause vs prepare in the PushReport, the rank's status endpoint,
Prometheus metrics on both sides, and one structured log line per version per side.

Ranks run in spawned processes over real sockets; no timing bound is asserted, only what the
clocks must satisfy (a rank's model is changing at least while its load_weights sleeps inside it;
a staged rank swaps after it prepared).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
import typer
import zmq
from observe_workers import SPECS, RankProc, weights

from weightstream import BucketSender, ConfigError, PeerTimeout, ProtocolError, ReceiverDaemon, WeightstreamError
from weightstream.receiver.status_endpoint import query_status

prometheus_client = pytest.importorskip("prometheus_client")

BUCKET = 128 << 10  # two tensors a bucket: a push spans several buckets
PAUSE = 0.3


def sample(registry: object, name: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value if registry is None else registry.get_sample_value  # type: ignore[attr-defined]
    got = value(name, labels)
    return 0.0 if got is None else float(got)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def metric_line(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


@pytest.mark.timeout(120)
def test_report_separates_preparing_from_changing_the_served_model(endpoint: str) -> None:
    registry = prometheus_client.CollectorRegistry()
    in_place = RankProc(endpoint, 0, pause=PAUSE)
    staged = RankProc(endpoint, 1, pause=PAUSE, staged=True)
    try:
        with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, heartbeat_interval=0.2, metrics=registry) as sender:
            report = sender.push(weights(1), version="step_1")
            for proc in (in_place, staged):
                assert proc.wait("step_1")["ok"]
    finally:
        in_place.close()
        staged.close()
    first, second = report.receivers[0], report.receivers[1]
    for r in (first, second):
        assert r.outcome == "committed" and r.prepare_seconds is not None and r.change_seconds is not None, r
        assert 0 <= r.prepare_seconds <= r.seconds and 0 <= r.change_seconds <= r.seconds, r
    # in place: the model changes from the first tensor, and load_weights sleeps after it
    assert first.change_seconds >= PAUSE, first
    # staged: nothing changes until COMMIT, which comes after PREPARED; the swap holds the sleep
    assert second.change_seconds >= PAUSE and second.prepare_seconds + second.change_seconds <= second.seconds, second
    assert report.prepare_seconds == max(first.prepare_seconds, second.prepare_seconds)
    assert report.change_seconds == max(first.change_seconds, second.change_seconds)
    # the sender's histograms got each rank's two timings
    for rank in ("0", "1"):
        for name in ("weightstream_apply_seconds_count", "weightstream_model_change_seconds_count"):
            assert sample(registry, name, side="sender", rank=rank) == 1, (name, rank)


@pytest.mark.timeout(150)
def test_metrics_and_log_lines_on_both_sides(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    registry = prometheus_client.CollectorRegistry()
    rank = RankProc(endpoint, 0, pause=PAUSE, fail_step=2, metrics=True)
    caplog.set_level(logging.INFO, logger="weightstream.sender")
    try:
        # one slot: bucket 1 waits for the rank's ack of bucket 0, which sleeps in load_weights first
        with BucketSender(endpoint, bucket_bytes=BUCKET, num_buffers=1, heartbeat_interval=0.2, metrics=registry) as sender:
            report = sender.push(weights(1), version="step_1")
            assert rank.wait("step_1")["ok"]
            with pytest.raises(WeightstreamError) as failed:
                sender.push(weights(2), version="step_2")
            seen = rank.wait("step_2")
            assert not seen["ok"] and "refuses step 2" in seen["error"], seen
            assert rank.port is not None
            text = scrape(rank.port)
    finally:
        rank.close()
    total = sum(n for _, (_, shape) in SPECS.items() for n in [4 * shape[0] * shape[1]])
    # the sender's registry
    assert sample(registry, "weightstream_push_seconds_count", outcome="committed") == 1
    assert sample(registry, "weightstream_push_seconds_count", outcome="failed") == 1
    assert sample(registry, "weightstream_push_bytes_total", outcome="committed") == total
    assert sample(registry, "weightstream_versions_total", side="sender", outcome="committed", reason="") == 1
    reason = type(failed.value).__name__
    assert sample(registry, "weightstream_versions_total", side="sender", outcome="failed", reason=reason) == 1
    assert report.slot_wait_seconds > 0
    assert sample(registry, "weightstream_slot_wait_seconds_total") >= report.slot_wait_seconds
    # the rank's, over HTTP from its own process
    assert metric_line(text, "weightstream_versions_total", side="rank", outcome="committed", reason="") == 1, text
    assert metric_line(text, "weightstream_versions_total", side="rank", outcome="failed", reason="ValueError") == 1, text
    assert metric_line(text, "weightstream_apply_seconds_count", side="rank", rank="0") == 1, text
    assert metric_line(text, "weightstream_model_change_seconds_count", side="rank", rank="0") == 1, text
    # one line per version on the sender, with its fields on the record
    lines = [r for r in caplog.records if getattr(r, "weightstream", None) is not None and r.name == "weightstream.sender"]
    assert [r.weightstream["outcome"] for r in lines] == ["committed", "failed"], [r.getMessage() for r in lines]
    ok, bad = lines[0].weightstream, lines[1].weightstream
    assert ok["version"] == "step_1" and ok["bytes"] == total and ok["tensors"] == len(SPECS) and ok["side"] == "sender"
    assert bad["reason"] == reason and bad["outcomes"] == "0:failed", bad
    assert lines[0].levelno == logging.INFO and lines[1].levelno == logging.WARNING
    assert "version side=sender version=step_1 outcome=committed" in lines[0].getMessage()
    # and on the rank
    rank_lines = seen["lines"]
    assert [f["outcome"] for _, f in rank_lines] == ["committed", "failed"], rank_lines
    assert rank_lines[0][1]["change_s"] >= PAUSE and rank_lines[1][1]["reason"] == "ValueError", rank_lines
    assert all("=" in msg and "\n" not in msg for msg, _ in rank_lines)


@pytest.mark.timeout(120)
def test_a_silent_rank_counts_as_a_heartbeat_miss(endpoint: str) -> None:
    registry = prometheus_client.CollectorRegistry()
    rank = RankProc(endpoint, 0)
    try:
        with BucketSender(endpoint, heartbeat_interval=0.2, heartbeat_timeout=1.0, metrics=registry) as sender:
            sender.push(weights(1), version="step_1")
            os.kill(rank.proc.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 30
                while sample(registry, "weightstream_heartbeat_misses_total", side="sender", rank="0") < 1:
                    assert time.monotonic() < deadline, "the sender never dropped the stopped rank"
                    time.sleep(0.1)
            finally:
                os.kill(rank.proc.pid, signal.SIGCONT)
    finally:
        rank.close()


@pytest.mark.timeout(120)
def test_status_endpoint_answers_with_state_and_timings(endpoint: str, endpoint_dir: Path) -> None:
    status_at = f"ipc://{endpoint_dir}/st/rank0.sock"
    rank = RankProc(endpoint, 0, status_endpoint=status_at)
    try:
        before = query_status(status_at, timeout=10)
        assert before["rank"] == 0 and before["committed_version"] is None and before["versions"] == [], before
        with BucketSender(endpoint, bucket_bytes=BUCKET, heartbeat_interval=0.2) as sender:
            sender.push(weights(1), version="step_1")
            assert rank.wait("step_1")["ok"]
            # a hostile or confused client: garbage, a wrong type, an oversized frame; the endpoint keeps answering
            ctx = zmq.Context()
            try:
                for payload in (b"\xc1not msgpack", msgpack.packb({"type": "PING", "v": 1}), msgpack.packb([1, 2]),
                                msgpack.packb({"type": "STATUS", "v": 99})):
                    req = ctx.socket(zmq.REQ)
                    req.setsockopt(zmq.LINGER, 0)
                    req.connect(status_at)
                    req.send(payload)
                    assert req.poll(10_000), f"no answer to {payload!r}"
                    answer = msgpack.unpackb(req.recv())
                    assert answer["type"] == "ERROR" and answer["error"], answer
                    req.close()
                big = ctx.socket(zmq.DEALER)
                big.setsockopt(zmq.LINGER, 0)
                big.connect(status_at)
                big.send_multipart([b"", b"x" * 100_000])  # over the request limit: libzmq drops this peer
                big.close()
            finally:
                ctx.term()
            after = query_status(status_at, timeout=10)
            shown = status_cli(status_at)
    finally:
        rank.close()
    assert shown["json"]["committed_version"] == "step_1", shown
    assert "step_1" in shown["text"] and "committed" in shown["text"] and "model intact" in shown["text"], shown["text"]
    assert after["state"] == "idle" and after["committed_version"] == "step_1" and after["model_intact"], after
    assert after["connected"] and after["last_error"] is None and after["pid"] == rank.proc.pid, after
    (record,) = after["versions"]
    assert record["version"] == "step_1" and record["outcome"] == "committed", record
    assert record["tensors"] == len(SPECS) and record["prepare_seconds"] is not None and record["change_seconds"] is not None
    assert not Path(status_at[len("ipc://"):]).exists(), "the stopped daemon left its status socket file"


def status_cli(endpoint: str) -> dict[str, Any]:
    """``weightstream status`` as a user runs it: as JSON and as the rendered table."""
    import json

    from typer.testing import CliRunner

    from weightstream.cli.status import status_command

    app = typer.Typer()
    app.command()(status_command)
    runner = CliRunner()
    raw = runner.invoke(app, [endpoint, "--json", "--timeout", "10"])
    assert raw.exit_code == 0, raw.output
    text = runner.invoke(app, [endpoint], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert text.exit_code == 0, text.output
    return {"json": json.loads(raw.output), "text": text.output}


def test_status_cli_errors(endpoint_dir: Path) -> None:
    from typer.testing import CliRunner

    from weightstream.cli.status import status_command

    app = typer.Typer()
    app.command()(status_command)
    runner = CliRunner()
    gone = runner.invoke(app, [f"ipc://{endpoint_dir}/none/x.sock"])
    assert gone.exit_code == 1 and "socket file does not exist" in gone.output, gone.output
    bad = runner.invoke(app, [f"ipc://{endpoint_dir}/none/x.sock", "--timeout", "0"])
    assert bad.exit_code == 2 and "timeout" in bad.output, bad.output


def test_status_endpoint_bad_input(endpoint: str, endpoint_dir: Path) -> None:
    for bad in ("tcp://127.0.0.1:5555", "ipc://", endpoint, 7):
        with pytest.raises(ConfigError, match="status_endpoint"):
            ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, status_endpoint=bad)  # type: ignore[arg-type]
    with pytest.raises(WeightstreamError, match="socket file does not exist"):
        query_status(f"ipc://{endpoint_dir}/none/x.sock", timeout=1)
    with pytest.raises(ConfigError, match="ipc://"):
        query_status("tcp://127.0.0.1:1", timeout=1)
    # something bound there that never answers: a bounded wait, then PeerTimeout
    (endpoint_dir / "mute").mkdir(mode=0o700)
    mute_at = f"ipc://{endpoint_dir}/mute/x.sock"
    ctx = zmq.Context()
    mute = ctx.socket(zmq.ROUTER)
    try:
        mute.bind(mute_at)
        started = time.monotonic()
        with pytest.raises(PeerTimeout, match="no answer"):
            query_status(mute_at, timeout=0.5)
        assert time.monotonic() - started < 30
        # an answer that is not a status
        replier = ctx.socket(zmq.ROUTER)
        replier.bind(f"ipc://{endpoint_dir}/mute/y.sock")

        def answer() -> None:
            if replier.poll(10_000):
                ident, empty, _ = replier.recv_multipart()
                replier.send_multipart([ident, empty, msgpack.packb({"type": "STATUS", "v": 1, "status": 3})])

        t = threading.Thread(target=answer)
        t.start()
        try:
            with pytest.raises(ProtocolError, match="'status' map"):
                query_status(f"ipc://{endpoint_dir}/mute/y.sock", timeout=10)
        finally:
            t.join(15)
        replier.close(linger=0)
    finally:
        mute.close(linger=0)
        ctx.term()


def test_a_second_daemon_on_a_live_status_endpoint_is_refused(endpoint: str, endpoint_dir: Path) -> None:
    status_at = f"ipc://{endpoint_dir}/st/r.sock"
    first = ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, status_endpoint=status_at).start()
    try:
        second = ReceiverDaemon(endpoint, lambda named: None, rank=1, expected=SPECS, status_endpoint=status_at)
        with pytest.raises(WeightstreamError, match="status socket"):
            second.start()
        assert query_status(status_at, timeout=10)["rank"] == 0
    finally:
        first.stop()


def test_metrics_bad_input(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="metrics"):
        BucketSender(endpoint, metrics="yes")
    with pytest.raises(ConfigError, match="metrics"):
        ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, metrics=object())


@pytest.mark.timeout(60)
def test_status_request_decoder_fuzz() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from weightstream.receiver.status_endpoint import _check_request

    values = st.recursive(
        st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    )

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=300), values.map(lambda v: msgpack.packb(v))))
    def decode(payload: bytes) -> None:
        try:
            _check_request(payload)
        except ProtocolError:
            pass

    decode()
    _check_request(msgpack.packb({"type": "STATUS", "v": 1}))  # the one good request
