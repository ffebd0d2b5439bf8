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
