"""Configuration mistakes raise ConfigError (a WeightstreamError and a ValueError) at the call that
made them, naming the argument; a transport this host cannot run stays a TransportError; an
argument that does nothing says so."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weightstream import BucketSender, ConfigError, CurveKeys, ReceiverDaemon, TransportError, WeightstreamError
from weightstream.protocol.errors import from_wire, wire_name
from weightstream.receiver.prefetch import PrefetchQueue
from weightstream.receiver.sinks import NumpySink, PrefixRouter, as_sink
from weightstream.receiver.snapshot import SnapshotWriter, Tee

pytestmark = pytest.mark.timeout(60)


def _never(weights: Any) -> None:
    for _ in weights:
        pass


# (what is wrong, how to make the mistake, text the error must name)
CASES: list[tuple[str, Callable[[str], Any], str]] = [
    ("receivers", lambda e: BucketSender(e, receivers=0), "receivers"),
    ("num_buffers", lambda e: BucketSender(e, num_buffers=0), "num_buffers"),
    ("num_buffers_high", lambda e: BucketSender(e, num_buffers=65), "num_buffers"),
    ("timeout", lambda e: BucketSender(e, timeout=0), "timeout"),
    ("heartbeats", lambda e: BucketSender(e, heartbeat_interval=2.0, heartbeat_timeout=1.0), "heartbeat_timeout"),
    ("bucket_bytes", lambda e: BucketSender(e, bucket_bytes=1000), "bucket_bytes"),
    ("alignment", lambda e: BucketSender(e, alignment=100, bucket_bytes=1000), "alignment"),
    ("transport", lambda e: BucketSender(e, transport="tcp"), "transport='tcp'"),
    ("sender_endpoint", lambda e: BucketSender("localhost:5555"), "has no scheme"),
    ("sender_tcp_plain", lambda e: BucketSender("tcp://127.0.0.1:1"), "insecure=True"),
    ("sender_abstract", lambda e: BucketSender("ipc://@ws-config-test"), "abstract unix socket"),
    ("rank", lambda e: ReceiverDaemon(e, _never, rank=-1), "rank"),
    ("prefetch", lambda e: ReceiverDaemon(e, _never, prefetch=0), "prefetch"),
    ("framework", lambda e: ReceiverDaemon(e, _never, framework="jax"), "framework='jax'"),  # type: ignore[arg-type]
    ("curve_half", lambda e: ReceiverDaemon(e, _never, curve_keys=CurveKeys.generate()), "server_key"),
    ("server_key", lambda e: ReceiverDaemon(e, _never, curve_keys=CurveKeys.generate(), server_key=b"x" * 8), "server_key"),
    ("daemon_endpoint", lambda e: ReceiverDaemon("/tmp/x.sock", _never), "has no scheme"),
    ("load_weights", lambda e: ReceiverDaemon(e, 42), "sink"),
    ("curve_public", lambda e: CurveKeys(b"short", CurveKeys.generate().secret), "CurveKeys.public"),
    ("curve_secret", lambda e: CurveKeys(CurveKeys.generate().public, "a str of forty characters, not bytes...."), "CurveKeys.secret"),  # type: ignore[arg-type]
    ("curve_not_z85", lambda e: CurveKeys(b"\x00" * 40, CurveKeys.generate().secret), "CurveKeys.public"),
    ("router_empty", lambda e: PrefixRouter({}), "PrefixRouter"),
    ("router_no_load_one", lambda e: PrefixRouter({"a.": _Specs()}), "load_one"),
    ("as_sink", lambda e: as_sink(object()), "sink"),
    ("tee_empty", lambda e: Tee(), "Tee"),
    ("snapshot_rank", lambda e: SnapshotWriter(Path(e), rank=-1), "rank"),
    ("snapshot_part", lambda e: SnapshotWriter(Path(e), rank=0, max_part_bytes=10), "max_part_bytes"),
    ("prefetch_queue", lambda e: PrefetchQueue(0, None), "prefetch"),  # type: ignore[arg-type]
]


class _Specs:
    framework = "numpy"

    def param_specs(self) -> dict[str, Any]:
        return {}

    def load_weights(self, weights: Any) -> None:
        _never(weights)


@pytest.mark.parametrize(("make", "names"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_a_configuration_mistake_is_a_config_error(make: Callable[[str], Any], names: str, endpoint: str) -> None:
    with pytest.raises(ConfigError) as info:  # noqa: PT012 - the close runs only if the mistake went unnoticed
        made = make(endpoint)
        getattr(made, "close", lambda: None)()  # only if the mistake went unnoticed
    error = info.value
    assert isinstance(error, WeightstreamError) and isinstance(error, ValueError)
    assert names in str(error), str(error)
    assert not os.path.exists(endpoint[len("ipc://"):])  # refused before anything was bound


def test_config_errors_are_caught_as_value_errors_and_travel_by_name() -> None:
    with pytest.raises(ValueError, match="receivers must be >= 1"):
        BucketSender("ipc:///tmp/never-bound.sock", receivers=0)
    error = from_wire("ConfigError", "a bad argument", rank=3)
    assert type(error) is ConfigError and error.rank == 3 and wire_name(ConfigError("x")) == "ConfigError"


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_a_sink_given_something_else_than_its_model_is_a_config_error(framework: str) -> None:
    pytest.importorskip(framework)
    from weightstream.receiver.sinks import PaddleLayerSink, TorchModuleSink

    make = TorchModuleSink if framework == "torch" else PaddleLayerSink
    with pytest.raises(ConfigError, match="expected a"):
        make({"w": np.zeros(2)})  # type: ignore[arg-type]


def test_a_router_of_two_frameworks_is_a_config_error() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="one framework"):
        PrefixRouter({"a.": NumpySink({"w": np.zeros(2)}), "b.": torch.nn.Linear(2, 2)})


def test_a_transport_this_host_cannot_run_stays_a_transport_error(endpoint: str) -> None:
    from weightstream.protocol.transports import available_transports

    if "cuda_ipc" in available_transports():
        pytest.skip("cuda_ipc runs here")
    with pytest.raises(TransportError) as info:
        BucketSender(endpoint, transport="cuda_ipc")
    assert not isinstance(info.value, ConfigError)


def test_the_daemons_heartbeat_timeout_must_be_positive(endpoint: str) -> None:
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match=r"heartbeat_timeout must be > 0 seconds"):
            ReceiverDaemon(endpoint, _never, heartbeat_interval=1.0, heartbeat_timeout=bad)
    ReceiverDaemon(endpoint, _never, heartbeat_interval=1.0, heartbeat_timeout=1.0)  # at its interval: fine


@pytest.mark.timeout(30)
def test_the_daemons_own_heartbeat_timeout_ends_a_silent_session_sooner(endpoint: str) -> None:
    """A rank reconnects after its own heartbeat_timeout of silence when it sets one, not after
    the (much longer) one its sender's WELCOME allows."""
    from test_malformed import FakeSender

    from weightstream.protocol import messages as m

    fake = FakeSender(endpoint)
    patient = ReceiverDaemon(endpoint, _never, rank=0, heartbeat_interval=0.1).start()
    try:
        fake.wait_for(m.Hello)
        fake.send(fake.welcome())  # heartbeat_timeout=30.0; then the fake answers nothing
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            fake.recv(0.05)
        assert patient.status.reconnects == 0  # the sender's 30 s have not passed
    finally:
        patient.stop()
        fake.close()
    fake = FakeSender(endpoint)
    eager = ReceiverDaemon(endpoint, _never, rank=0, heartbeat_interval=0.1, heartbeat_timeout=0.5).start()
    try:
        fake.wait_for(m.Hello)
        fake.send(fake.welcome())
        deadline = time.monotonic() + 10.0
        while eager.status.reconnects == 0 and time.monotonic() < deadline:
            fake.recv(0.05)
        assert eager.status.reconnects >= 1, eager.status
    finally:
        eager.stop()
        fake.close()


@pytest.mark.parametrize(
    ("specs", "mentions"),
    [
        ({"w": ("float99", (4,))}, "tensor 'w': expected a dtype name"),
        ({"w": (np.float32, (4,))}, "tensor 'w': expected a dtype name"),
        ({"w": ("float32", 4)}, "tensor 'w': expected a shape as a sequence of ints"),
        ({"w": ("float32", (4, -1))}, "tensor 'w': expected a shape as a sequence of ints"),
        ({"w": ("float32",)}, "tensor 'w': expected a (dtype, shape) pair"),
        ([("w", ("float32", (4,)))], "expected a mapping"),
    ],
)
def test_a_malformed_expected_is_refused_where_it_is_given(endpoint: str, specs: Any, mentions: str) -> None:
    """Not at the first push, from inside the rank: at construction, naming the tensor."""
    with pytest.raises(ConfigError, match="expected=: ") as info:
        ReceiverDaemon(endpoint, _never, expected=specs)
    assert mentions in str(info.value)
    if "mapping" not in mentions:
        assert "fix: e.g. expected={'w': ('float32', (4096, 4096))}" in str(info.value)


@pytest.mark.timeout(30)
def test_a_push_that_waits_for_a_refused_rank_says_why(endpoint: str) -> None:
    """A daemon refused at HELLO (here: its rank is held) is named with the refusal in the
    PeerTimeout of a push waiting for it, not told to start its daemon."""
    from weightstream import PeerTimeout

    with BucketSender(endpoint, receivers=2, timeout=3.0, heartbeat_interval=0.1) as sender, \
            ReceiverDaemon(endpoint, _never, rank=0, heartbeat_interval=0.1):
        sender.wait_for_receivers(count=1, timeout=10)
        with ReceiverDaemon(endpoint, _never, rank=0, heartbeat_interval=0.1):
            with pytest.raises(PeerTimeout) as info:
                sender.wait_for_receivers(timeout=3.0)
    text = str(info.value)
    assert "refused: rank 0" in text and "RankInUse" in text, text
    assert "fix the refusal" in text and "start (or restart)" not in text, text


@pytest.mark.parametrize("bad", ["", "x" * 257, 7])
def test_a_bad_host_id_is_a_config_error(endpoint: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match="host_id: expected a non-empty str"):
        ReceiverDaemon(endpoint, _never, host_id=bad)
