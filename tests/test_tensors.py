"""host_bytes / view_as: bit-exact round trips and zero-copy, in all three frameworks."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from weightstream.frameworks import bytes_view, framework_of, host_bytes, shape_of, view_as
from weightstream.protocol.dtypes import DTYPES, DType, by_name
from weightstream.protocol.errors import TransportError, WeightstreamError

pytestmark = pytest.mark.timeout(60)

SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3, 4)]
FRAMEWORKS = ["numpy", "torch", "paddle"]


def random_array(dtype: DType, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes viewed as ``dtype`` (covers NaN/inf patterns of bf16/fp8); bool stays 0/1."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape) * dtype.itemsize
    raw = rng.integers(0, 2 if dtype.name == "bool" else 256, size=n, dtype=np.uint8)
    return raw.view(dtype.numpy).reshape(shape)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A writable 1-D uint8 slice starting on a 256-byte boundary, like a bucket entry."""
    block = np.zeros(nbytes + 512, dtype=np.uint8)
    start = (-block.ctypes.data) % 256
    return block[start : start + nbytes]


def raw_of(tensor: object) -> bytes:
    """The bytes of a tensor of any framework, read without weightstream."""
    fw = framework_of(tensor)
    if fw == "numpy":
        return np.ascontiguousarray(tensor).tobytes()
    if fw == "torch":
        t = tensor.contiguous()  # type: ignore[attr-defined]
        return bytes(t.reshape(-1).view(__import__("torch").uint8).numpy()) if t.numel() else b""
    # Tensor.numpy() copies and gives uint16/int8 for bf16/fp8: same bits, an independent path.
    return np.ascontiguousarray(tensor.numpy()).tobytes()  # type: ignore[attr-defined]


def need(framework: str) -> None:
    if framework != "numpy":
        pytest.importorskip(framework)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_roundtrip_every_dtype(framework: str, dtype: DType) -> None:
    need(framework)
    for shape in SHAPES:
        src = random_array(dtype, shape)
        data = host_bytes(src)
        assert data.dtype == np.uint8 and data.ndim == 1 and data.size == src.nbytes
        buf = aligned_buffer(data.size)
        buf[:] = data
        out = view_as(framework, buf, dtype, shape)  # type: ignore[arg-type]
        assert framework_of(out) == framework
        assert shape_of(out) == shape
        assert raw_of(out) == src.tobytes()  # bytes, since NaN != NaN


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_view_is_zero_copy(framework: str, dtype: DType) -> None:
    need(framework)
    for shape in [(), (4, 3)]:
        buf = aligned_buffer(math.prod(shape) * dtype.itemsize)
        out = view_as(framework, buf, dtype, shape)  # type: ignore[arg-type]
        fresh = random_array(dtype, shape, seed=7).reshape(-1).view(np.uint8)
        buf[:] = fresh  # mutate the bucket after the view exists
        assert raw_of(out) == fresh.tobytes()


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_view_keeps_buffer_alive(framework: str) -> None:
    need(framework)
    buf = aligned_buffer(16)
    buf[:] = np.arange(16, dtype=np.uint8)
    out = view_as(framework, buf, by_name("int32"), (4,))  # type: ignore[arg-type]
    del buf
    gc.collect()
    assert raw_of(out) == bytes(range(16))


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_read_only_buffer_is_copied(framework: str) -> None:
    need(framework)
    buf = aligned_buffer(8)
    buf[:] = 1
    buf.flags.writeable = False
    out = view_as(framework, buf, by_name("float32"), (2,))  # type: ignore[arg-type]
    assert raw_of(out) == bytes([1] * 8)


def test_view_as_rejects_bad_buffer() -> None:
    with pytest.raises(WeightstreamError, match="expected a 1-D uint8 buffer of 24 bytes"):
        view_as("numpy", np.zeros(23, np.uint8), by_name("float32"), (2, 3))
    with pytest.raises(WeightstreamError, match="framework"):
        view_as("jax", np.zeros(4, np.uint8), by_name("float32"), (1,))  # type: ignore[arg-type]


def test_numpy_host_bytes_zero_copy_and_non_contiguous() -> None:
    a = random_array(by_name("bfloat16"), (4, 6))
    hb = host_bytes(a)
    assert np.shares_memory(hb, a)
    t = a.T  # non-contiguous: one copy, C order
    hb_t = host_bytes(t)
    assert not np.shares_memory(hb_t, a)
    assert hb_t.tobytes() == np.ascontiguousarray(t).tobytes()
    assert host_bytes(np.float32(1.5)).tobytes() == np.float32(1.5).tobytes()
    assert bytes_view(t) is None and bytes_view(a) is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_torch_host_bytes(dtype: DType) -> None:
    torch = pytest.importorskip("torch")
    for shape in SHAPES:
        src = random_array(dtype, shape)
        t = view_as("torch", src.reshape(-1).view(np.uint8).copy(), dtype, shape)
        hb = host_bytes(t)
        assert hb.tobytes() == src.tobytes()
        if t.numel():
            assert hb.ctypes.data == t.data_ptr()  # zero-copy
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    hb = host_bytes(m)
    assert hb.tobytes() == m.contiguous().numpy().tobytes()
    p = torch.nn.Parameter(torch.ones(3))  # requires_grad: detached, still zero-copy
    assert host_bytes(p).ctypes.data == p.data_ptr()


@pytest.mark.parametrize("framework", ["torch", "paddle"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_sliced_tensor_with_offset(framework: str, dtype: DType) -> None:
    """A row slice is contiguous but starts mid-storage: bytes must be the slice's, zero-copy."""
    need(framework)
    src = random_array(dtype, (4, 6), seed=3)
    whole = view_as(framework, src.reshape(-1).view(np.uint8).copy(), dtype, (4, 6))  # type: ignore[arg-type]
    part = whole[1:3]
    assert part.is_contiguous()
    hb = host_bytes(part)
    assert hb.tobytes() == src[1:3].tobytes()
    assert hb.ctypes.data == part.data_ptr()
    bv = bytes_view(part)
    assert bv is not None and bv.ctypes.data == part.data_ptr() and bv.size == src[1:3].nbytes


def test_torch_non_cpu_rejected() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(WeightstreamError, match="meta"):
        host_bytes(torch.empty(3, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(TransportError, match="cuda_ipc"):
            host_bytes(torch.ones(3, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_paddle_host_bytes(dtype: DType) -> None:
    paddle = pytest.importorskip("paddle")
    for shape in SHAPES:
        src = random_array(dtype, shape)
        t = view_as("paddle", src.reshape(-1).view(np.uint8).copy(), dtype, shape)
        hb = host_bytes(t)
        assert hb.tobytes() == src.tobytes()
        if hb.size:
            assert hb.ctypes.data == t.data_ptr()  # zero-copy via DLPack
    m = paddle.arange(12, dtype="float32").reshape([3, 4]).transpose([1, 0])
    assert not m.is_contiguous()
    assert host_bytes(m).tobytes() == m.numpy().tobytes()
    p = paddle.create_parameter([3], dtype="float32")  # stop_gradient False: detached
    assert host_bytes(p).ctypes.data == p.data_ptr()


def test_paddle_uninitialised_rejected() -> None:
    paddle = pytest.importorskip("paddle")
    with paddle.LazyGuard():
        layer = paddle.nn.Linear(2, 2)
    with pytest.raises(WeightstreamError, match="initialised"):
        host_bytes(layer.weight)
    assert bytes_view(layer.weight) is None


def test_bytes_view_is_writable_and_shared() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(2, dtype=torch.float32)
    bv = bytes_view(t)
    assert bv is not None and bv.flags.writeable
    bv[:] = np.array([1.0, 2.0], np.float32).view(np.uint8)
    assert t.tolist() == [1.0, 2.0]
    assert bytes_view(t.t() if t.dim() > 1 else torch.zeros(3, 4).t()) is None
