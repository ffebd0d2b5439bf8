"""The transport seam: sender and receiver code reach transports only through the interface in
protocol/transports/base.py, and every registered transport declares what it can do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from weightstream.protocol.transports import TRANSPORTS, Capabilities, available_transports, get_transport, refusal

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against its package directory."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = path.parent
            for _ in range(max(node.level - 1, 0)):
                base = base.parent
            where = (base.relative_to(ROOT).as_posix().replace("/", ".") + "." if node.level else "") + (node.module or "")
            found.extend([where] + [f"{where}.{alias.name}" for alias in node.names])
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_sender_and_receiver_never_import_a_transport_module(side: str) -> None:
    names = set(TRANSPORTS) | {"ring", "streaming", "slots", "wire"}
    offenders = []
    for path in sorted((ROOT / side).rglob("*.py")):
        for module in _imports(path):
            parts = module.replace("weightstream.protocol", "protocol").split(".")
            if "transports" in parts and any(p in names for p in parts[parts.index("transports") + 1 :]):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, "import the interface (protocol.transports), not a transport: " + "; ".join(offenders)


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_sender_and_receiver_never_name_a_transport(side: str) -> None:
    """No branch on a transport's name: the only literal is BucketSender's public default."""
    found = []
    for path in sorted((ROOT / side).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in TRANSPORTS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    allowed = [f for f in found if side == "sender" and f.startswith("sender/bucket_sender.py:")][:1]
    assert found == allowed, found


def test_every_transport_declares_its_capabilities() -> None:
    for name in available_transports():
        transport = get_transport(name)
        assert transport.name == name
        assert isinstance(transport.capabilities, Capabilities)
        assert transport.capabilities.device in ("host", "cuda")


def test_a_same_host_transport_refuses_a_rank_on_another_host_by_capability() -> None:
    shm = get_transport("shm")
    assert refusal(shm, 3, ["shm"], "elsewhere/boot") is not None
    assert "rank 3 offers transports ['cuda_ipc']" in (refusal(shm, 3, ["cuda_ipc"], "x") or "")
    import frame_transport  # noqa: F401 - registers it

    frames = get_transport("frames")
    assert not frames.capabilities.same_host and frames.capabilities.data_frames
    assert refusal(frames, 0, ["frames"], "elsewhere/boot") is None  # bytes travel in frames: any host


@pytest.mark.timeout(60)
def test_begin_carries_a_transports_per_push_fields_to_every_rank(endpoint: str) -> None:
    """A transport's ``begin_fields`` reach each rank's ``join`` in BEGIN, on a full manifest and
    on a reused layout alike (the seam a collective's store address will travel through)."""
    import numpy as np
    from frame_fields_transport import TRANSPORT

    from weightstream import BucketSender, ReceiverDaemon
    from weightstream.receiver.sinks import NumpySink

    state = {"w": np.zeros(1000, np.float32)}
    TRANSPORT.joined.clear()
    with BucketSender(endpoint, transport=TRANSPORT.name, bucket_bytes=1 << 12, timeout=20) as sender, \
            ReceiverDaemon(endpoint, NumpySink(state), rank=0, heartbeat_interval=0.1):
        for step in range(2):  # the second BEGIN reuses the layout
            weights = np.arange(1000, dtype=np.float32) + step
            sender.push([("w", weights)], version=f"step_{step}")
            assert np.array_equal(state["w"], weights)
    assert TRANSPORT.joined == [(0, {"world": 1, "group": "push-0-0"})] * 2


def test_a_transports_fields_that_no_rank_could_decode_are_refused_at_the_sender() -> None:
    from weightstream.protocol.errors import TransportError
    from weightstream.protocol.transports import check_begin_fields

    with pytest.raises(TransportError, match=r"transport 'shm': begin_fields\(\) returned dict with 1 keys, non-scalar"):
        check_begin_fields(get_transport("shm"), {"ranks": [0, 1]})
    check_begin_fields(get_transport("shm"), {"store": "10.0.0.1:29500", "world": 2})


def test_a_transport_that_takes_no_fields_refuses_them() -> None:
    from weightstream.protocol.errors import ProtocolError

    with pytest.raises(ProtocolError, match="field 'transport': expected none for transport 'shm'"):
        get_transport("shm").join([], {"store": "10.0.0.1:29500"}, 0)
    get_transport("shm").join([], None, 0)


@pytest.mark.timeout(60)
def test_a_rank_with_its_own_host_id_is_refused_shm_by_capability(endpoint: str) -> None:
    """``ReceiverDaemon(host_id=...)`` (containers on one node that share no /dev/shm): the
    sender sees a rank on another host and refuses it a same-host transport, naming both hosts;
    the push waiting for it says so. Without host_id the same rank is served."""
    import numpy as np

    from weightstream import BucketSender, PeerTimeout, ReceiverDaemon
    from weightstream.protocol.transports import host_identity
    from weightstream.receiver.sinks import NumpySink

    state = {"w": np.zeros(16, np.float32)}
    with BucketSender(endpoint, timeout=2.0, heartbeat_interval=0.1) as sender:
        with ReceiverDaemon(endpoint, NumpySink(state), rank=0, heartbeat_interval=0.1, host_id="node-b/container-3"):
            with pytest.raises(PeerTimeout) as info:
                sender.push([("w", np.ones(16, np.float32))], version="v1")
        text = str(info.value)
        assert "runs on host 'node-b/container-3'" in text and repr(host_identity()) in text, text
        assert "shm needs both on one node" in text, text
        with ReceiverDaemon(endpoint, NumpySink(state), rank=0, heartbeat_interval=0.1):
            sender.push([("w", np.ones(16, np.float32))], version="v1", timeout=20)
    assert np.array_equal(state["w"], np.ones(16, np.float32))
