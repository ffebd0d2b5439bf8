"""Spawned processes for the ring tests (importable, so "spawn" can find them).

A rank holds a NumPy model and either hands its ``NumpySink`` to the daemon (direct mode: it
copies every tensor itself and says READY streamed, so buckets go through the slots' rings) or
a plain ``load_weights`` (views reach it: never through a ring). A sender process pushes on
command, so a test can kill it mid-version. Only digests and statuses cross the queues.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict
from typing import Any

import numpy as np
import xxhash

# Many small tensors of odd sizes (several per ring piece, some across the ring's wrap), a few
# bigger than a piece of an 8 KiB ring, and one bigger than a 64 KiB bucket (chunked).
LAYOUT: list[tuple[str, str, tuple[int, ...]]] = [
    *[(f"small.{i}", ("float32", "float16", "int32", "uint8")[i % 4], (3 + i % 7, 5 + i % 11)) for i in range(120)],
    *[(f"mid.{i}", "float32", (17, 40 + 31 * i)) for i in range(6)],
    ("embed.big", "float32", (160, 257)),  # ~160 KiB: three buckets' worth
    ("tail.bias", "int64", (33,)),
]
# A torch module's parameters (float) and a buffer (int): the TorchModuleSink copies into them directly.
TORCH_LAYOUT: list[tuple[str, str, tuple[int, ...]]] = [
    *[(f"w{i}", ("float32", "float16", "bfloat16")[i % 3], (5 + i % 6, 33)) for i in range(40)],
    ("embed.big", "float32", (160, 257)),
    ("steps", "int64", (3,)),
]
RING_BYTES = 8192
BUCKET_BYTES = 64 << 10
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}


def make_model(seed: int, scale: int = 1, layout: list[tuple[str, str, tuple[int, ...]]] = LAYOUT) -> dict[str, np.ndarray]:
    """A layout's tensors from a seed (``scale`` multiplies the big tensor's rows)."""
    from weightstream.protocol.dtypes import by_name

    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, shape in layout:
        if name == "embed.big":
            shape = (shape[0] * scale, shape[1])
        dt = by_name(dtype).numpy
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        out[name] = raw.view(dt).reshape(shape)
    return out


def specs_of(model: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (str(t.dtype), tuple(t.shape)) for name, t in model.items()}


def digests(model: dict[str, Any]) -> dict[str, str]:
    """Per tensor: shape and xxh3 of its bytes (NumPy arrays, or torch tensors by their bytes)."""
    out = {}
    for name, t in model.items():
        raw = np.ascontiguousarray(t).view(np.uint8) if isinstance(t, np.ndarray) else _torch_bytes(t)
        out[name] = f"{list(t.shape)}:{xxhash.xxh3_64_hexdigest(raw)}"
    return out


def _torch_bytes(tensor: Any) -> np.ndarray:
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def torch_module(layout: list[tuple[str, str, tuple[int, ...]]]) -> Any:
    import torch

    module = torch.nn.Module()
    for name, dtype, shape in layout:
        tensor = torch.zeros(shape, dtype=getattr(torch, dtype))
        if tensor.is_floating_point():
            module.register_parameter(name.replace(".", "_"), torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(name.replace(".", "_"), tensor)
    return module


class PlainLoad:
    """A load_weights that takes views and copies them, as an engine's would: no direct mode."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state

    def __call__(self, items: Any) -> None:
        for name, tensor in items:
            np.copyto(self.state[name], tensor)


def rank_main(endpoint: str, rank: int, kind: str, versions: list[str], queue: Any, scale: int = 1) -> None:
    """Report "started", then per version "committed" or "failed" (with the model's digests), then "done".
    ``kind``: "direct" (a NumpySink), "plain" (a load_weights taking views) or "torch" (a TorchModuleSink
    over a module of TORCH_LAYOUT, whose names use "_" for ".")."""
    from weightstream import ReceiverDaemon, WeightstreamError
    from weightstream.receiver.sinks import NumpySink, TorchModuleSink

    try:
        sink: Any
        if kind == "torch":
            module = torch_module(TORCH_LAYOUT)
            state: dict[str, Any] = dict(module.state_dict())
            sink = TorchModuleSink(module)
        else:
            state = {name: np.zeros_like(t) for name, t in make_model(0, scale).items()}
            sink = NumpySink(state) if kind == "direct" else PlainLoad(state)
        daemon = ReceiverDaemon(endpoint, sink, rank=rank, framework="numpy", prefetch=2,
                                expected=specs_of(state) if kind == "plain" else None, **HB)
        daemon.start()
        try:
            queue.put({"event": "started", "rank": rank})
            for version in versions:
                try:
                    daemon.wait_for_version(version, timeout=60)
                    event = "committed"
                except WeightstreamError as exc:
                    event = f"failed: {type(exc).__name__}: {exc}"
                queue.put({"event": event, "rank": rank, "version": version, "digests": digests(state),
                           "status": asdict(daemon.status)})
        finally:
            daemon.stop()
        queue.put({"event": "done", "rank": rank})
    except BaseException as exc:  # report, never hang the test
        queue.put({"event": "crashed", "rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


def sender_main(endpoint: str, conn: Any, scale: int) -> None:
    """Push ``make_model(seed, scale)`` as asked over ``conn``; reply with what happened."""
    from weightstream import BucketSender

    with BucketSender(endpoint, receivers=1, bucket_bytes=BUCKET_BYTES, timeout=30.0, **HB) as sender:
        conn.send({"ready": True, "rings": [slot.ring is not None for slot in sender._slots]})
        while True:
            cmd = conn.recv()
            if cmd is None:
                return
            try:
                sender.wait_for_receivers(timeout=15)
                sender.push(make_model(cmd["seed"], scale).items(), version=cmd["version"])
                conn.send({"ok": True})
            except Exception as exc:
                conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
