"""Code that runs inside spawned receiver processes (importable, so "spawn" can find it).

A worker builds a model from a seed, runs a ReceiverDaemon against it and reports to the
test through a multiprocessing Queue, as plain data only: per version, an xxh3 digest of
the bytes, dtype and shape of every tensor it received and of every tensor of its model
afterwards. Tensors never cross the queue.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import frame_transport  # noqa: F401 - registers the tests' own transport in every rank process
import numpy as np
import xxhash

from weightstream import ReceiverDaemon, WeightstreamError
from weightstream import native as speedups
from weightstream.frameworks import dtype_of, host_bytes, view_as
from weightstream.protocol.dtypes import by_name

Digest = tuple[str, tuple[int, ...], str]  # (dtype name, shape, xxh3_64 hex of the bytes)
Specs = dict[str, tuple[str, tuple[int, ...]]]

# Models. Bucket size in the tests is 4096 bytes: every model spans several buckets, and
# each holds one tensor bigger than a bucket (chunked) and one that is not 256-aligned.
NUMPY_SPECS: Specs = {
    "embed.weight": ("bfloat16", (33, 16)),
    "layers.0.attn.qkv.weight": ("float32", (48, 16)),
    "layers.0.attn.qkv.bias": ("float32", (48,)),
    "layers.0.mlp.up": ("float16", (16, 40)),
    "layers.0.mlp.big": ("float32", (40, 64)),  # 10240 bytes: chunked over 3 buckets
    "layers.1.norm.scale": ("float64", ()),
    "layers.1.q8": ("float8_e4m3fn", (7, 13)),
    "layers.1.k8": ("float8_e5m2", (5,)),
    "stats.count": ("int64", (3,)),
    "stats.mask": ("bool", (17,)),
    "stats.ids": ("int32", (9,)),
    "stats.small": ("int16", (0, 4)),
    "stats.bytes": ("uint8", (1000,)),
    "stats.signed": ("int8", (255,)),
}

TORCH_SPECS: Specs = {
    "embed.weight": ("bfloat16", (33, 16)),
    "layers.0.attn.qkv.weight": ("float32", (48, 16)),
    "layers.0.attn.qkv.bias": ("float32", (48,)),
    "layers.0.mlp.up": ("float16", (16, 40)),
    "layers.0.mlp.big": ("float32", (40, 64)),  # chunked, written in place into the module
    "layers.1.norm.scale": ("float32", ()),
    "layers.1.q8": ("float8_e4m3fn", (7, 13)),
    "state.step": ("int64", ()),
    "state.mask": ("bool", (17,)),
    "state.empty": ("float32", (0,)),
}

PADDLE_SPECS: Specs = {
    "embed.weight": ("float32", (33, 16)),
    "layers.0.attn.qkv.weight": ("float32", (48, 16)),
    "layers.0.attn.qkv.bias": ("float32", (48,)),
    "layers.0.mlp.up": ("float16", (16, 40)),
    "layers.0.mlp.big": ("float32", (40, 64)),  # chunked
    "layers.1.bf": ("bfloat16", (5, 3)),
    "state.step": ("int64", (1,)),
    "state.mask": ("bool", (17,)),
}

SPECS = {"numpy": NUMPY_SPECS, "torch": TORCH_SPECS, "paddle": PADDLE_SPECS}

_PARAM_DTYPES = {"float32", "float16", "bfloat16"}


def make_weights(specs: Specs, seed: int) -> dict[str, np.ndarray]:
    """Deterministic NumPy tensors for ``specs``: random bytes (NaN payloads included), bools 0/1."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (dtype_name, shape) in specs.items():
        dt = by_name(dtype_name)
        n = int(np.prod(shape, dtype=np.int64))
        if dtype_name == "bool":
            raw = rng.integers(0, 2, size=n, dtype=np.uint8)
        else:
            raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
        out[name] = raw.view(dt.numpy).reshape(shape)
    return out


def digest(tensor: Any) -> Digest:
    """Bit-exact fingerprint of a NumPy/torch/paddle tensor (NaN-safe: bytes, not values)."""
    data = np.ascontiguousarray(host_bytes(tensor))
    shape = tuple(int(d) for d in tensor.shape)
    return (dtype_of(tensor).name, shape, xxhash.xxh3_64_hexdigest(data.tobytes()))


def digests(named: Iterable[tuple[str, Any]]) -> dict[str, Digest]:
    return {name: digest(t) for name, t in named}


def as_framework(framework: str, arr: np.ndarray) -> Any:
    """An owning tensor of ``framework`` with ``arr``'s exact bytes."""
    if framework == "numpy":
        return arr.copy()
    t = view_as(framework, host_bytes(arr).copy(), dtype_of(arr), arr.shape)  # type: ignore[arg-type]
    return t.clone()


# --- models ----------------------------------------------------------------------------

def build_torch(specs: Specs, seed: int) -> Any:
    import torch

    root = torch.nn.Module()
    for name, arr in make_weights(specs, seed).items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        t = as_framework("torch", arr)
        if arr.dtype.name in _PARAM_DTYPES or str(arr.dtype) in _PARAM_DTYPES:
            mod.register_parameter(leaf, torch.nn.Parameter(t))
        else:
            mod.register_buffer(leaf, t)
    return root


def build_paddle(specs: Specs, seed: int) -> Any:
    import paddle

    root = paddle.nn.Layer()
    for name, arr in make_weights(specs, seed).items():
        *path, leaf = name.split(".")
        layer = root
        for part in path:
            if part not in layer._sub_layers:
                layer.add_sublayer(part, paddle.nn.Layer())
            layer = layer._sub_layers[part]
        t = as_framework("paddle", arr)
        dtype_name = dtype_of(t).name
        if dtype_name in ("float32", "float16"):
            param = layer.create_parameter(shape=list(arr.shape), dtype=dtype_name)
            param.set_value(t)
            layer.add_parameter(leaf, param)
        else:
            layer.register_buffer(leaf, t, persistable=True)
    return root


def model_state(kind: str, model: Any) -> dict[str, Digest]:
    """Fingerprints of everything the model holds (torch/paddle: its state_dict)."""
    return digests(model.items() if isinstance(model, dict) else model.state_dict().items())


class Recorder:
    """A sink wrapper that fingerprints every tensor load_weights yields, then forwards it.

    It has the inner sink's ``framework``, ``param_specs`` and ``destination`` (so the
    daemon checks manifests and writes chunked tensors in place exactly as for the sink).
    A tensor named "poison" makes load_weights raise ValueError, like a real model's
    loader rejecting a weight.
    """

    def __init__(self, sink: Any, delay: float = 0.0) -> None:
        self.sink = sink
        self.delay = delay  # seconds per tensor: a slow loader, to be caught mid-version
        self.framework = sink.framework
        self.calls: list[dict[str, Digest]] = []

    def param_specs(self) -> Any:
        return self.sink.param_specs()

    def destination(self, name: str) -> Any:
        return self.sink.destination(name)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        seen: dict[str, Digest] = {}
        self.calls.append(seen)
        for name, tensor in weights:
            seen[name] = digest(tensor)
            if self.delay:
                time.sleep(self.delay)
            if name == "poison":
                raise ValueError(f"load_weights refuses tensor {name!r} of shape {list(seen[name][1])}")
            self.sink.load_one(name, tensor)


def build(kind: str, seed: int) -> tuple[Any, Any]:
    """(model, sink) for a model kind: numpy | torch | paddle (fixed models) | collector."""
    from weightstream.receiver.sinks import NumpySink, PaddleLayerSink, TorchModuleSink

    if kind == "numpy":
        model = make_weights(NUMPY_SPECS, seed)
        model = {k: v.copy() for k, v in model.items()}  # writable
        return model, NumpySink(model)
    if kind == "torch":
        model = build_torch(TORCH_SPECS, seed)
        return model, TorchModuleSink(model)
    if kind == "paddle":
        model = build_paddle(PADDLE_SPECS, seed)
        return model, PaddleLayerSink(model)
    if kind == "collector":
        model: dict[str, np.ndarray] = {}
        return model, NumpySink(model)
    raise ValueError(f"unknown model kind {kind!r}")


def receiver_main(
    endpoint: str,
    rank: int,
    kind: str,
    seed: int,
    versions: list[str],
    queue: Any,
    wait_timeout: float = 60.0,
    delay: float = 0.0,
    direct: bool = False,
    insecure: bool = False,
) -> None:
    """Run one rank: report "started", then per version "committed" or "failed", then "done".

    ``direct``: give the daemon the sink itself, so whole tensors are copied straight into
    the model (direct mode) and load_weights sees only what has no destination.
    """
    try:
        model, sink = build(kind, seed)
        recorder = Recorder(sink, delay)
        daemon = ReceiverDaemon(endpoint, sink if direct else recorder, rank=rank, prefetch=2,
                                heartbeat_interval=0.2, heartbeat_timeout=10.0, insecure=insecure)
        daemon.start()
        try:
            queue.put({"event": "started", "rank": rank, "model": model_state(kind, model), "native": speedups.NATIVE})
            for version in versions:
                calls_before = len(recorder.calls)
                try:
                    daemon.wait_for_version(version, timeout=wait_timeout)
                except WeightstreamError as exc:
                    queue.put({
                        "event": "failed", "rank": rank, "version": version,
                        "error": type(exc).__name__, "message": str(exc),
                        "model": model_state(kind, model), "status": asdict(daemon.status),
                    })
                    continue
                received = recorder.calls[-1] if len(recorder.calls) > calls_before else {}
                queue.put({
                    "event": "committed", "rank": rank, "version": version,
                    "received": received, "model": model_state(kind, model), "status": asdict(daemon.status),
                })
        finally:
            daemon.stop()
        queue.put({"event": "done", "rank": rank, "status": asdict(daemon.status)})
    except BaseException as exc:  # report, never hang the test
        queue.put({"event": "crashed", "rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})
