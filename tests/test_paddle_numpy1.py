"""Paddle on every NumPy that pyproject allows (issue 23): NumPy 1.x imports DLPack arrays
read-only, so weightstream builds a Paddle tensor's byte view over its ``data_ptr()`` there.

CI runs this file twice: in the default environment (NumPy 2, where the pointer path is
forced here to test it too) and in a second one with the oldest NumPy pyproject allows and no
torch (``.ci/run``). A transformer-ish Paddle block travels from a BucketSender to a
ReceiverDaemon(PaddleLayerSink(block)) in a spawned process, float32 and bfloat16, bit-exact.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from weightstream import BucketSender, ReceiverDaemon
from weightstream.frameworks import bytes_view, dtype_of, host_bytes, view_as
from weightstream.frameworks import paddle as paddle_fw

paddle = pytest.importorskip("paddle")

pytestmark = pytest.mark.timeout(180)

NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
CTX = mp.get_context("spawn")
BUCKET = 4096  # embed.weight (8 KiB) and the bf16 MLP weights (8 KiB) travel in chunks
EVENT_TIMEOUT = 120.0  # a spawned rank imports paddle on a busy 2-core box
IDS = [[1, 5, 9, 3, 63, 0]]

# The byte-view implementations to check here: both where NumPy 2 has its own (DLPack) one.
IMPLS = ["pointer", "dlpack"] if NUMPY2 else ["pointer"]


def use_impl(impl: str) -> None:
    """Point weightstream's paddle byte views at one implementation (this process only)."""
    paddle_fw._bytes = paddle_fw._bytes_pointer if impl == "pointer" else paddle_fw._bytes_dlpack


@pytest.fixture
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    saved = paddle_fw._bytes
    use_impl(request.param)
    try:
        yield request.param
    finally:
        paddle_fw._bytes = saved


# --- the block ---------------------------------------------------------------------------

def build_block(seed: int) -> Any:
    """Embedding, two LayerNorms, attention and an MLP; the MLP's parameters in bfloat16 (as a
    model stored in bf16, computed in float32: Paddle has no bf16 matmul on the CPU)."""
    F = paddle.nn.functional

    class Block(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embed = paddle.nn.Embedding(64, 32)
            self.ln1 = paddle.nn.LayerNorm(32)
            self.qkv = paddle.nn.Linear(32, 96)
            self.proj = paddle.nn.Linear(32, 32)
            self.ln2 = paddle.nn.LayerNorm(32)
            self.up = paddle.nn.Linear(32, 128)
            self.down = paddle.nn.Linear(128, 32, bias_attr=False)
            self.up.bfloat16()
            self.down.bfloat16()
            self.register_buffer("pos_scale", paddle.rand([6, 1], dtype="float32"), persistable=True)

        def forward(self, ids: Any) -> Any:
            x = self.embed(ids) * self.pos_scale
            h = self.ln1(x)
            q, k, v = paddle.split(self.qkv(h), 3, axis=-1)
            x = x + self.proj(F.softmax(q @ k.transpose([0, 2, 1]) / 32**0.5, axis=-1) @ v)
            h = F.gelu(F.linear(self.ln2(x), self.up.weight.astype("float32"), self.up.bias.astype("float32")))
            return x + F.linear(h, self.down.weight.astype("float32"))

    paddle.seed(seed)
    return Block()


def fingerprint(t: Any) -> tuple[str, tuple[int, ...], str]:
    """dtype, shape and a hash of the bytes, read by Paddle itself (``numpy()`` copies; bf16
    comes back as uint16): independent of weightstream's byte views."""
    raw = np.ascontiguousarray(t.numpy()).tobytes()
    return (str(t.dtype), tuple(int(n) for n in t.shape), hashlib.sha256(raw).hexdigest())


def state_of(block: Any) -> dict[str, tuple[str, tuple[int, ...], str]]:
    return {name: fingerprint(t) for name, t in block.state_dict().items()}


def pointers(block: Any) -> dict[str, tuple[int, int]]:
    return {name: (id(t), t.data_ptr()) for name, t in block.state_dict().items()}


def forward_of(block: Any) -> str:
    with paddle.no_grad():
        out = block(paddle.to_tensor(IDS, dtype="int64"))
    return fingerprint(out)[2]


def scribble(block: Any, seed: int) -> None:
    """New values, written in place through weightstream's byte views (random bytes: NaN
    payloads and all; bf16 included)."""
    rng = np.random.default_rng(seed)
    for name, t in block.state_dict().items():
        view = bytes_view(t)
        assert view is not None and view.flags.writeable, name
        view[:] = rng.integers(0, 256, size=view.size, dtype=np.uint8)


# --- byte views ----------------------------------------------------------------------------

def test_numpy1_selects_the_pointer_views() -> None:
    want = paddle_fw._bytes_dlpack if NUMPY2 else paddle_fw._bytes_pointer
    assert paddle_fw._bytes is want


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_bytes_view_writable_shared_and_keeps_tensor_alive(impl: str) -> None:
    block = build_block(0)
    for name, t in block.state_dict().items():
        view = bytes_view(t)
        assert view is not None and view.flags.writeable and view.dtype == np.uint8, name
        assert view.size == t.numel().item() * t.element_size() and view.ctypes.data == t.data_ptr(), name
        if impl == "pointer":  # the array holds the tensor: its memory lives as long as the view
            owner = view
            while isinstance(owner, np.ndarray):
                owner = owner.base
            assert owner.tensor is t, name
        before = fingerprint(t)
        view[:] = 0x3F
        assert np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8).tolist() == [0x3F] * view.size, name
        assert fingerprint(t) != before
    # a slice of a tensor: a view at its own offset into the base's memory
    base = paddle.arange(16, dtype="float32")
    part = base[4:8]
    view = bytes_view(part)
    assert view is not None and view.ctypes.data == base.data_ptr() + 16
    view[:] = np.full(4, -1.0, np.float32).view(np.uint8)
    assert base.numpy().tolist() == list(range(4)) + [-1.0] * 4 + list(range(8, 16))
    # a temporary tensor that only the view holds: its memory must not be reused
    hb = host_bytes(paddle.full([1000], 7.0, dtype="float32") * 1)
    gc.collect()
    junk = [paddle.full([1000], 9.0, dtype="float32") for _ in range(8)]  # would reuse freed memory
    assert hb.view(np.float32).tolist() == [7.0] * 1000
    del junk


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_host_bytes_zero_copy_round_trip(impl: str) -> None:
    for dtype in ("float32", "bfloat16", "float16", "int64", "bool", "float8_e4m3fn"):
        src = paddle.ones([3, 5], dtype="float32").astype(dtype)
        hb = host_bytes(src)
        assert hb.ctypes.data == src.data_ptr() and hb.tobytes() == np.ascontiguousarray(src.numpy()).tobytes()
        back = view_as("paddle", hb.copy(), dtype_of(src), (3, 5))
        assert back.dtype == src.dtype and fingerprint(back) == fingerprint(src)
    p = paddle.create_parameter([4], dtype="bfloat16", default_initializer=paddle.nn.initializer.Constant(1.5))  # grad
    assert host_bytes(p).ctypes.data == p.data_ptr()
    t = paddle.arange(12, dtype="float32").reshape([3, 4]).transpose([1, 0])  # not contiguous: one copy
    assert not t.is_contiguous() and bytes_view(t) is None
    assert host_bytes(t).tobytes() == t.numpy().tobytes()
    empty = view_as("paddle", np.zeros(0, np.uint8), dtype_of(p), (0, 3))  # paddle.zeros([0, 3]): no data
    view = bytes_view(empty)  # None where Paddle calls the empty tensor uninitialised
    assert host_bytes(empty).size == 0 and (view is None or view.size == 0)


# --- end to end ------------------------------------------------------------------------------

def rank_main(endpoint: str, seed: int, versions: list[str], direct: bool, impl: str | None, out: Any) -> None:
    """A rank with its own (differently initialised) block: reports fingerprints per version."""
    try:
        if impl is not None:
            use_impl(impl)
        from weightstream.receiver.sinks import PaddleLayerSink

        block = build_block(seed)
        sink = PaddleLayerSink(block)
        seen: list[str] = []

        def load_weights(weights: Any) -> None:  # the daemon hands Paddle views of the bucket
            for name, t in weights:
                seen.append(name)
                sink.load_one(name, t)

        target = sink if direct else load_weights
        daemon = ReceiverDaemon(endpoint, target, rank=0, framework="paddle", expected=sink.param_specs(),
                                heartbeat_interval=0.2, heartbeat_timeout=10.0).start()
        try:
            out.put({"event": "started", "pointers": pointers(block), "state": state_of(block)})
            for version in versions:
                daemon.wait_for_version(version, timeout=EVENT_TIMEOUT)
                out.put({"event": "committed", "version": version, "state": state_of(block),
                         "pointers": pointers(block), "forward": forward_of(block), "loaded": len(seen),
                         "stop_gradient": [p.stop_gradient for p in block.parameters()]})
        finally:
            daemon.stop()
        out.put({"event": "done"})
    except BaseException as exc:  # report, never hang the test
        out.put({"event": "crashed", "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


def next_event(out: Any, proc: Any, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        try:
            event = out.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if time.monotonic() > deadline or not proc.is_alive():
                raise AssertionError(f"the rank reported nothing (alive: {proc.is_alive()})") from None
    if event["event"] == "crashed":
        raise AssertionError(f"the rank crashed: {event['error']}\n{event['tb']}")
    assert event["event"] == kind, event
    return event


CASES = [("direct", None), ("load_weights", None)] + ([("direct", "pointer")] if NUMPY2 else [])


@pytest.mark.parametrize(("mode", "forced"), CASES, ids=[f"{m}-{f or 'default'}" for m, f in CASES])
def test_block_pushed_to_paddle_sink_bit_exact(endpoint: str, mode: str, forced: str | None) -> None:
    """Two versions of the block: its initial weights (the rank's forward pass then matches
    the trainer's bit for bit), then random bytes scribbled in place through byte views."""
    saved = paddle_fw._bytes
    if forced is not None:
        use_impl(forced)  # the sender's side too
    out: Any = CTX.Queue()
    proc = CTX.Process(target=rank_main, args=(endpoint, 99, ["v1", "v2"], mode == "direct", forced, out),
                       name="ws-test-paddle-rank", daemon=True)
    proc.start()
    try:
        trainer = build_block(1)
        dtypes = {str(p.dtype) for p in trainer.parameters()}
        assert dtypes == {"paddle.float32", "paddle.bfloat16"}
        started = next_event(out, proc, "started")
        assert started["state"] != state_of(trainer)  # differently initialised: the push must change it
        with BucketSender(endpoint, receivers=1, bucket_bytes=BUCKET, num_buffers=2, timeout=60) as sender:
            named = [*trainer.named_parameters(), *trainer.named_buffers()]
            report = sender.push(named, version="v1")
            assert report.tensors == len(trainer.state_dict()) and set(report.receivers) == {0}
            got = next_event(out, proc, "committed")
            assert got["state"] == state_of(trainer)
            assert got["forward"] == forward_of(trainer)  # the rank computes what the trainer does
            assert got["pointers"] == started["pointers"]  # in place: same tensors, same memory
            assert got["stop_gradient"] == [False] * len(trainer.parameters())
            if mode == "load_weights":
                assert got["loaded"] == report.tensors

            scribble(trainer, 5)
            sender.push([*trainer.named_parameters(), *trainer.named_buffers()], version="v2")
            got = next_event(out, proc, "committed")
            assert got["state"] == state_of(trainer)
            assert got["pointers"] == started["pointers"]
        next_event(out, proc, "done")
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        paddle_fw._bytes = saved
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        out.close()
        out.join_thread()
