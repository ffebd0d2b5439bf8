"""Security: nothing that can run code from the wire, CURVE on tcp, owner-only ipc
directories, and peers that never said HELLO are ignored."""

from __future__ import annotations

import ast
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq
from fault_workers import BUCKET_BYTES, HB, Collector, digests, make_weights

from weightstream import (
    BucketSender,
    CurveKeys,
    PeerTimeout,
    ReceiverDaemon,
    WeightstreamError,
)
from weightstream.protocol import messages as m

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "sender", "receiver", "weightstream")
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


# --- static scan ---------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan_source(source: str, where: str) -> list[str]:
    """Every construct that could turn peer bytes into code or objects."""
    found: list[str] = []
    lines = source.splitlines()

    def justified(node: ast.AST) -> bool:
        """Framework loaders unpickle; allowed only on local files, with the reason on the line."""
        return "# pickle:" in lines[node.lineno - 1]  # type: ignore[attr-defined]

    for node in ast.walk(ast.parse(source, where)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile", "__import__"):
                found.append(f"{line}: call to {name}")
            elif name.endswith(("send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized")):
                found.append(f"{line}: {name} (pickles on the wire)")
            elif name in ("np.load", "numpy.load") and "allow_pickle" in kw:
                value = kw["allow_pickle"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{line}: {name}(allow_pickle=...)")
            elif name == "torch.load":
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True) and not justified(node):
                    found.append(f"{line}: torch.load without weights_only=True")
            elif name == "paddle.load" and not justified(node):
                found.append(f"{line}: paddle.load (pickle based) without a '# pickle:' comment saying why it is safe")
        elif isinstance(node, ast.Attribute) and node.attr in ("send_pyobj", "recv_pyobj"):
            found.append(f"{line}: reference to {node.attr}")
    return sorted(set(found))


def test_scanner_catches_each_pattern() -> None:
    bad = """
import pickle
import dill as d
from marshal import loads
from shelve import open as so
import numpy as np
eval("1")
exec("x = 1")
sock.send_pyobj(obj)
f = sock.recv_pyobj
np.load(path, allow_pickle=True)
torch.load(path)
paddle.load(path)
"""
    found = scan_source(bad, "bad.py")
    for what in ("import pickle", "import dill", "from marshal", "from shelve", "call to eval", "call to exec",
                 "send_pyobj", "recv_pyobj", "allow_pickle", "torch.load", "paddle.load"):
        assert any(what in f for f in found), (what, found)
    ok = "import numpy as np\nnp.load(p, allow_pickle=False)\ntorch.load(p, weights_only=True)\nx = paddle.load(p)  # pickle: local file\n"
    assert scan_source(ok, "ok.py") == []


def test_no_pickle_eval_or_pyobj_in_the_package() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) >= 15, f"expected the package sources under {ROOT}, found {len(files)} files"
    found = [f for p in files for f in scan_source(p.read_text(), str(p.relative_to(ROOT)))]
    print(f"scanned {len(files)} files")
    assert found == [], "constructs that can run code from peer bytes:\n" + "\n".join(found)


# --- tcp needs CURVE ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_without_curve_is_refused() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(WeightstreamError) as info:
        BucketSender(endpoint, bucket_bytes=BUCKET_BYTES)
    text = str(info.value)
    assert "curve_keys=" in text and "insecure=True" in text, text
    with pytest.raises(WeightstreamError) as info:
        ReceiverDaemon(endpoint, Collector())
    text = str(info.value)
    assert "curve_keys=" in text and "insecure=True" in text, text


def test_tcp_insecure_is_accepted() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    collector = Collector()
    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, insecure=True, timeout=20.0, **HB) as sender, ReceiverDaemon(
        endpoint, collector, insecure=True, **HB
    ):
        sender.wait_for_receivers(timeout=10)
        sender.push(make_weights(1, "v1"), "v1")
        assert collector.digests() == digests(make_weights(1, "v1"))


def test_curve_push_end_to_end_and_unlisted_key_refused() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    server, allowed, stranger = CurveKeys.generate(), CurveKeys.generate(), CurveKeys.generate()
    good, bad = Collector(), Collector()
    with BucketSender(
        endpoint, bucket_bytes=BUCKET_BYTES, curve_keys=server, allowed_clients=[allowed.public], timeout=20.0, **HB
    ) as sender, ReceiverDaemon(endpoint, good, rank=0, curve_keys=allowed, server_key=server.public, **HB) as ok_rank, \
            ReceiverDaemon(endpoint, bad, rank=1, curve_keys=stranger, server_key=server.public, **HB) as bad_rank:
        assert sender.wait_for_receivers(1, timeout=10) == [0]
        with pytest.raises(PeerTimeout):
            sender.wait_for_receivers(2, timeout=2.0)
        report = sender.push(make_weights(2, "v1"), "v1")
        assert set(report.receivers) == {0}
        assert good.digests() == digests(make_weights(2, "v1"))
        assert ok_rank.status.connected and ok_rank.committed_version == "v1"
        assert not bad_rank.status.connected and bad_rank.committed_version is None and bad.handed == 0


def test_curve_wrong_server_key_never_connects() -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    server, client, impostor = CurveKeys.generate(), CurveKeys.generate(), CurveKeys.generate()
    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, curve_keys=server, allowed_clients=[client.public], **HB) as sender, \
            ReceiverDaemon(endpoint, Collector(), curve_keys=client, server_key=impostor.public, **HB) as daemon:
        with pytest.raises(PeerTimeout):
            sender.wait_for_receivers(1, timeout=1.5)
        assert not daemon.status.connected


# --- ipc directories --------------------------------------------------------------------------------


def test_ipc_dir_open_to_others_is_refused_unless_insecure() -> None:
    base = Path(tempfile.mkdtemp(prefix="ws-sec-"))
    try:
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o755)
        endpoint = f"ipc://{shared}/x.sock"
        with pytest.raises(WeightstreamError) as info:
            BucketSender(endpoint, bucket_bytes=BUCKET_BYTES)
        text = str(info.value)
        assert "755" in text and "700" in text and "insecure=True" in text, text
        BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, insecure=True).close()

        fresh = base / "fresh" / "x.sock"  # created by the sender: owner-only
        BucketSender(f"ipc://{fresh}", bucket_bytes=BUCKET_BYTES).close()
        assert stat.S_IMODE(os.stat(fresh.parent).st_mode) == 0o700
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# --- peers that never said HELLO ------------------------------------------------------------------------


def _rogue(endpoint: str, identity: bytes, version: str, stop: threading.Event, got: list[object]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    frames = [
        m.encode(m.Ready(version=version)),
        *[m.encode(m.Ack(version=version, seq=s)) for s in range(8)],
        m.encode(m.Committed(version=version, tensors=1, bytes=1, seconds=0.1)),
        m.encode(m.Failed(version=version, error="KeyError", message="rogue", model_intact=False)),
        m.encode(m.Reject(version=version, error="ManifestMismatch", reason="rogue")),
        m.encode(m.Error(error="ProtocolError", message="rogue")),
        m.encode(m.Bye(reason="rogue")),
        m.encode(m.Ping(session="whatever")),
        b"\xc1garbage",
        b"",
    ]
    try:
        while not stop.is_set():
            for f in frames:
                sock.send(f)
            sock.send_multipart([b"a", b"b"])
            while sock.poll(0):
                raw = sock.recv_multipart()
                try:
                    got.append(m.decode(raw[-1]))
                except Exception as exc:
                    got.append(exc)
            time.sleep(0.005)
    finally:
        sock.close(linger=0)
        ctx.term()


def test_messages_without_hello_are_ignored(endpoint: str) -> None:
    collector = Collector()
    collector.sleep = 0.01  # a push long enough for the rogues to interfere
    with BucketSender(endpoint, bucket_bytes=BUCKET_BYTES, timeout=20.0, **HB) as sender, ReceiverDaemon(
        endpoint, collector, rank=0, **HB
    ) as daemon:
        sender.wait_for_receivers(timeout=10)
        stop = threading.Event()
        got: list[object] = []
        # an unconnected rank's identity, a non-numeric one and a huge one
        rogues = [threading.Thread(target=_rogue, args=(endpoint, ident, f"v{i}", stop, got))
                  for i, ident in enumerate((b"1", b"rogue", b"99999999999"), start=1)]
        for t in rogues:
            t.start()
        try:
            time.sleep(0.2)
            for v in ("v1", "v2", "v3"):
                report = sender.push(make_weights(3, v), v)
                assert set(report.receivers) == {0}
                assert collector.digests() == digests(make_weights(3, v))
        finally:
            stop.set()
            for t in rogues:
                t.join(10)
        assert daemon.status.committed_version == "v3" and daemon.status.model_intact
        assert sorted(sender.wait_for_receivers(1, timeout=1)) == [0]
        kinds = {type(x).__name__ for x in got}
        print(f"rogue peers received {len(got)} frames of kinds {sorted(kinds)}")
        assert kinds <= {"Pong"}, f"a peer that never said HELLO got more than PONGs: {kinds}"
