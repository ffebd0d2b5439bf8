"""Observing pushes from outside: pause vs prepare in the PushReport, the rank's status endpoint,
Prometheus metrics on both sides, and one structured log line per version per side.

Ranks run in spawned processes over real sockets; no timing bound is asserted, only what the
clocks must satisfy (a rank's model is changing at least while its load_weights sleeps inside it;
a staged rank swaps after it prepared).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import typer
from observe_workers import SPECS, RankProc, weights

from weightstream import BucketSender, ConfigError, PeerTimeout, ProtocolError, ReceiverDaemon, WeightstreamError
from weightstream.receiver.status_endpoint import query_status
from weightstream.sender.bucket_sender import _close_open_senders

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
            # a hostile or confused client: garbage, a wrong type, an oversized length; each gets an ERROR
            path = status_at[len("ipc://"):]
            for payload in (b"\xc1not msgpack", msgpack.packb({"type": "PING", "v": 1}), msgpack.packb([1, 2]),
                            msgpack.packb({"type": "STATUS", "v": 99}), b"x" * 1000):
                answer = raw_request(path, struct.pack(">I", len(payload)) + payload)
                assert answer is not None and answer["type"] == "ERROR" and answer["error"], (payload[:20], answer)
            assert raw_request(path, struct.pack(">I", 1 << 31)) == {  # a length over the limit: refused unread
                "type": "ERROR", "v": 1, "error": "status request: expected at most 256 bytes, got a length of 2147483648"}
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


def test_status_text_that_looks_like_markup_prints_verbatim() -> None:
    """Versions and errors come from the wire: "[/bold]" in them is text, never rich markup."""
    import io

    from rich.console import Console

    from weightstream.cli.status import render

    status = {
        "rank": 0, "pid": 1, "weightstream": "x", "state": "aborted", "committed_version": "step_5[/x]",
        "receiving_version": "step_6\\", "model_intact": False, "connected": True, "reconnects": 0,
        "heartbeat_misses": 0, "last_reconnect": None, "last_error": "ValueError: expected [/bold] shape [red]x :smile:",
        "endpoint": "ipc:///e[/]",
        "versions": [{"version": "step_5\x1b[31mRED\x07", "outcome": "failed", "tensors": 3, "bytes": "many",
                      "seconds": 0.5, "prepare_seconds": None, "change_seconds": 2.0, "ended": "not a time"}, "junk"],
    }
    out = io.StringIO()
    render(status, Console(file=out, width=200, no_color=True, emoji=False))
    text = out.getvalue()
    for shown in ("step_5[/x]", "ValueError: expected [/bold] shape [red]x :smile:", "ipc:///e[/]",
                  "step_5\\x1b[31mRED\\x07", "step_6\\ "):
        assert shown in text, (shown, text)
    assert "\x1b" not in text and "\x07" not in text and "step_6\\\\" not in text, text


def test_asking_a_socket_that_is_not_a_status_socket_is_a_typed_error(endpoint: str) -> None:
    """The sender's own ipc endpoint (a ZeroMQ socket) answers nothing a status client reads: a typed
    error every time, never a raw OSError."""
    with BucketSender(endpoint, bucket_bytes=BUCKET):
        for _ in range(5):
            with pytest.raises(WeightstreamError):
                query_status(endpoint, timeout=2)


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
    # something listening there that never answers: a bounded wait, then PeerTimeout
    (endpoint_dir / "mute").mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as liar:
        mute.bind(str(endpoint_dir / "mute" / "x.sock"))
        mute.listen(4)
        with pytest.raises(PeerTimeout, match="no answer"):
            query_status(f"ipc://{endpoint_dir}/mute/x.sock", timeout=0.5)
        # an answer that is not a status, and one that announces more than the limit
        liar.bind(str(endpoint_dir / "mute" / "y.sock"))
        liar.listen(4)
        for reply, error in ((msgpack.packb({"type": "STATUS", "v": 1, "status": 3}), "'status' map"),
                             (b"", "more than the 1048576 allowed")):
            framed = struct.pack(">I", len(reply) if reply else 1 << 30) + reply

            def answer(framed: bytes = framed) -> None:
                conn, _ = liar.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(framed)

            t = threading.Thread(target=answer)
            t.start()
            try:
                with pytest.raises(ProtocolError, match=error):
                    query_status(f"ipc://{endpoint_dir}/mute/y.sock", timeout=10)
            finally:
                t.join(15)
    # a regular file at the path is nobody's socket: refused, and never replaced
    precious = endpoint_dir / "mute" / "precious.txt"
    precious.write_text("precious data")
    with pytest.raises(WeightstreamError, match="not a socket"):
        query_status(f"ipc://{precious}", timeout=1)
    daemon = ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, status_endpoint=f"ipc://{precious}")
    with pytest.raises(ConfigError, match="not a socket"):
        daemon.start()
    with pytest.raises(ConfigError, match="not a socket"):
        BucketSender(f"ipc://{precious}")  # libzmq's bind would have deleted it
    assert precious.read_text() == "precious data"


def raw_request(path: str, data: bytes, timeout: float = 10.0) -> dict[str, Any] | None:
    """One request as raw bytes on the status socket; the decoded answer, or None if it closed unanswered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (length,) = struct.unpack(">I", head)
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
    got: dict[str, Any] = msgpack.unpackb(body)
    return got


def status_when_free(endpoint: str, within: float = 30.0) -> dict[str, Any]:
    """query_status, again while the daemon closes connections unanswered (all its places taken)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return query_status(endpoint, timeout=10)
        except WeightstreamError as exc:
            if "unanswered" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(120)
def test_clients_that_flood_or_stall_the_status_socket_never_stop_the_pushes(endpoint: str, endpoint_dir: Path) -> None:
    """Many clients at once asking in a loop, clients that never send or never read, and lengths over
    the limit: the rank keeps its heartbeats (a tight sender timeout) and commits every push."""
    status_at = f"ipc://{endpoint_dir}/st/rank0.sock"
    path = status_at[len("ipc://"):]
    rank = RankProc(endpoint, 0, status_endpoint=status_at)
    stop = threading.Event()
    answered = [0]

    def flood() -> None:
        request = msgpack.packb({"type": "STATUS", "v": 1})
        while not stop.is_set():
            try:
                if raw_request(path, struct.pack(">I", len(request)) + request, timeout=5) is not None:
                    answered[0] += 1
            except OSError:
                pass

    def stall() -> None:
        held = []
        while not stop.is_set():
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(path)
                s.sendall(struct.pack(">I", 200))  # promises 200 bytes, sends none
                held.append(s)
                if len(held) > 50:
                    held.pop(0).close()
            except OSError:
                time.sleep(0.01)
        for s in held:
            s.close()

    workers = [threading.Thread(target=flood) for _ in range(4)] + [threading.Thread(target=stall)]
    try:
        with BucketSender(endpoint, bucket_bytes=BUCKET, heartbeat_interval=0.1, heartbeat_timeout=1.0) as sender:
            sender.wait_for_receivers(timeout=30)
            for w in workers:
                w.start()
            for step in range(1, 9):
                sender.push(weights(step), version=f"step_{step}")
                time.sleep(0.2)
            stop.set()
            for w in workers:
                w.join(30)
            final = status_when_free(status_at)
    finally:
        stop.set()
        rank.close()
    assert answered[0] > 0 and final["committed_version"] == "step_8" and final["heartbeat_misses"] == 0, (answered, final)


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
    from weightstream.metrics import serve_metrics

    with pytest.raises(ConfigError, match="metrics"):
        BucketSender(endpoint, metrics="yes")
    with pytest.raises(ConfigError, match="metrics"):
        ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, metrics=object())
    taken = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("weightstream_versions", "someone else's", registry=taken)
    with pytest.raises(ConfigError, match="already has a metric of the same name"):
        ReceiverDaemon(endpoint, lambda named: None, expected=SPECS, metrics=taken)
    for port in (True, -1, 70000, "9400"):
        with pytest.raises(ConfigError, match="port"):
            serve_metrics(port)  # type: ignore[arg-type]


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


def test_waiting_for_a_version_a_newer_one_superseded_returns(endpoint: str) -> None:
    """A rank that waits late (or joined after the trainer moved on) never sees step_1 itself:
    step_2 committed has it; a version of another family still waits, and times out."""
    model: dict[str, Any] = {}
    with BucketSender(endpoint, bucket_bytes=BUCKET, heartbeat_interval=0.2) as sender, ReceiverDaemon(
        endpoint, lambda named: model.update((n, np.array(t)) for n, t in named), expected=SPECS
    ) as daemon:
        sender.push(weights(1), version="step_1")
        sender.push(weights(2), version="step_2")
        daemon.wait_for_version("step_1", timeout=10)
        daemon.wait_for_version("step_2", timeout=10)
        with pytest.raises(PeerTimeout, match="'ckpt_1' was not committed"):
            daemon.wait_for_version("ckpt_1", timeout=0.5)
        with pytest.raises(PeerTimeout, match="'step_3' was not committed"):
            daemon.wait_for_version("step_3", timeout=0.5)


@pytest.mark.timeout(120)
def test_outcomes_name_who_ended_a_version(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """Rank 1's load_weights raises: it "failed", rank 0 (fine, then aborted by the sender) says
    "aborted". A manifest refusal is "rejected" on the sender, with no bytes counted as pushed."""
    registry = prometheus_client.CollectorRegistry()
    fine, failing = RankProc(endpoint, 0), RankProc(endpoint, 1, fail_step=1)
    caplog.set_level(logging.INFO, logger="weightstream.sender")
    try:
        with BucketSender(endpoint, receivers=2, bucket_bytes=BUCKET, heartbeat_interval=0.2, metrics=registry) as sender:
            with pytest.raises(WeightstreamError):
                sender.push(weights(1), version="step_1")
            seen = {0: fine.wait("step_1"), 1: failing.wait("step_1")}
            bad = [(n, a) for n, a in weights(2)][:-1]  # one tensor short: both manifest checks refuse it
            with pytest.raises(WeightstreamError, match="rejected before any byte"):
                sender.push(bad, version="step_2")
    finally:
        fine.close()
        failing.close()
    outcomes = {rank: [f["outcome"] for _, f in got["lines"]] for rank, got in seen.items()}
    assert outcomes == {0: ["aborted"], 1: ["failed"]}, outcomes
    lines = [r.weightstream for r in caplog.records if getattr(r, "weightstream", None) is not None]
    assert [f["outcome"] for f in lines] == ["failed", "rejected"], lines
    assert lines[1]["reason"] == "ManifestMismatch", lines[1]
    assert sample(registry, "weightstream_push_bytes_total", outcome="rejected") == 0
    assert sample(registry, "weightstream_versions_total", side="sender", outcome="rejected", reason="ManifestMismatch") == 1


def test_log_fields_never_carry_raw_control_characters() -> None:
    """Versions and error texts come from the wire: quoted, escaped, one printable line."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from weightstream.version_log import _text

    assert _text("step_1") == "step_1" and _text("a b") == '"a b"' and _text('q"x') == '"q\\"x"'
    assert _text("x\r\x1b[2Kversion outcome=committed\u2028") == '"x\\r\\x1b[2Kversion outcome=committed\\u2028"'

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def check(text: str) -> None:
        shown = _text(text)
        assert shown.isprintable() and "\n" not in shown, repr(shown)
        assert shown == text or (shown.startswith('"') and shown.endswith('"') and len(shown) >= 2)

    check()


@pytest.mark.timeout(120)
def test_a_sender_that_closes_says_bye_every_time(endpoint: str) -> None:
    """A clean close reaches the rank (BYE), so it never waits out a heartbeat timeout nor counts a
    miss: over several senders in turn on one endpoint."""
    model: dict[str, Any] = {}
    with ReceiverDaemon(
        endpoint, lambda named: model.update((n, np.array(t)) for n, t in named), expected=SPECS,
        heartbeat_interval=0.2, heartbeat_timeout=30.0,
    ) as daemon:
        for step in range(1, 7):
            with BucketSender(endpoint, bucket_bytes=BUCKET, heartbeat_interval=0.2) as sender:
                sender.push(weights(step), version=f"step_{step}")
            deadline = time.monotonic() + 10  # a third of the heartbeat timeout: only a BYE gets it there
            while daemon.status.connected:
                assert time.monotonic() < deadline, f"step {step}: the rank never heard the sender's BYE"
                time.sleep(0.02)
        assert daemon.status.heartbeat_misses == 0, daemon.status


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["returns", "raises SystemExit", "spawned child", "forked child"])
def test_a_trainer_that_exits_without_closing_still_says_bye(endpoint: str, how: str, tmp_path: Path) -> None:
    """No close(), no `with`: at exit the sender still says BYE (the rank never waits out its 30 s
    heartbeat timeout) and removes its socket file."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from weightstream import BucketSender\n"
        f"s = BucketSender({endpoint!r}, bucket_bytes=1 << 20, heartbeat_interval=0.2)\n"
        "s.push([('w', np.ones(1000, np.float32))], version='step_1')\n"
        + ("raise SystemExit(3)\n" if how == "raises SystemExit" else "")
    )
    if how.endswith("child"):  # a forked child leaves through os._exit: no atexit, multiprocessing's finalizers
        code = (
            "import multiprocessing as mp\nimport sys\n"
            "def main():\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
            "if __name__ == '__main__':\n"
            f"    p = mp.get_context({how.split()[0][:-2]!r}).Process(target=main)\n"
            "    p.start(); p.join(60); sys.exit(p.exitcode)\n"
        )
    with ReceiverDaemon(
        endpoint, lambda named: [None for _ in named], expected={"w": ("float32", (1000,))},
        heartbeat_interval=0.2, heartbeat_timeout=30.0,
    ) as daemon:
        script = tmp_path / "trainer.py"  # a file: a spawned child imports its __main__ from it
        script.write_text(code)
        import weightstream

        root = str(Path(weightstream.__file__).resolve().parent.parent)  # this test's weightstream, not another install
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env)
        assert done.returncode == (3 if how == "raises SystemExit" else 0), done.stderr
        assert daemon.committed_version == "step_1"
        deadline = time.monotonic() + 10
        while daemon.status.connected:
            assert time.monotonic() < deadline, "the rank never heard a BYE from the exiting trainer"
            time.sleep(0.05)
        assert daemon.status.heartbeat_misses == 0
    assert not Path(endpoint[len("ipc://"):]).exists(), "the exited sender left its socket file"
    assert "leaked shared_memory" not in done.stderr, done.stderr


def _forked_child_exits() -> None:
    """A data-loader worker, say: forked from the trainer, it ends without touching the sender."""


@pytest.mark.timeout(60)
def test_a_forked_child_leaves_its_parents_sender_alone(endpoint: str) -> None:
    """The exit-time close is the creating process's only: a forked child that exits (through
    multiprocessing's finalizers) neither unlinks the parent's slots nor says BYE for it."""
    before = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"ws_{os.getpid()}_")}
    with ReceiverDaemon(endpoint, lambda named: [None for _ in named], expected=SPECS, heartbeat_interval=0.2) as daemon, \
            BucketSender(endpoint, bucket_bytes=BUCKET, heartbeat_interval=0.2) as sender:
        sender.push(weights(1), version="step_1")
        slots = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"ws_{os.getpid()}_")} - before
        assert slots, "expected the sender's shm slots"
        for how in ("multiprocessing", "os.fork"):
            if how == "multiprocessing":  # its finalizers run at the child's exit
                child = mp.get_context("fork").Process(target=_forked_child_exits)
                child.start()
                child.join(30)
                assert child.exitcode == 0
                continue
            pid = os.fork()  # a plain fork that exits normally runs the atexit handler it inherited: that one
            if pid == 0:
                try:
                    _close_open_senders()
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
        left = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"ws_{os.getpid()}_")}
        assert slots <= left, f"the forked child unlinked its parent's slots: {sorted(slots - left)}"
        time.sleep(0.5)
        assert daemon.status.connected, "the forked child said BYE for its parent's sender"
        sender.push(weights(2), version="step_2")
        daemon.wait_for_version("step_2", timeout=10)
