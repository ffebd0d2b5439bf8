"""weightstream.frameworks.{numpy,torch,paddle}: one interface, every dtype bit-exact, the same errors.

Each module's functions are checked on every wire dtype, with bytes read back by the
framework itself (an independent path), and zero-copy where the module says so. Runs on
NumPy 1.x and 2.x; torch's and paddle's cases skip where they are not installed.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from weightstream import frameworks
from weightstream.frameworks import FRAMEWORKS, INT_OF_ITEMSIZE, CudaSource, FrameworkModule, module, module_of
from weightstream.frameworks import numpy as numpy_fw
from weightstream.frameworks import paddle as paddle_fw
from weightstream.frameworks import torch as torch_fw
from weightstream.protocol import dtypes as wire
from weightstream.protocol.dtypes import DTYPES, DType, by_name
from weightstream.protocol.errors import TransportError, WeightstreamError

pytestmark = pytest.mark.timeout(90)

MODULES = {"numpy": numpy_fw, "torch": torch_fw, "paddle": paddle_fw}
SHAPES: list[tuple[int, ...]] = [(), (0,), (3, 0, 2), (5,), (2, 3, 4)]


def need(name: str) -> Any:
    """The framework module, skipping where its framework is not installed."""
    if name != "numpy":
        pytest.importorskip(name)
    return MODULES[name]


def random_bytes(dtype: DType, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes for ``dtype`` (NaN/inf patterns of floats included); bool stays 0/1."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2 if dtype.name == "bool" else 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)


def aligned(data: np.ndarray) -> np.ndarray:
    """A writable copy of ``data`` starting on a 256-byte boundary, like a bucket entry."""
    block = np.zeros(data.size + 512, dtype=np.uint8)
    start = (-block.ctypes.data) % 256
    out = block[start : start + data.size]
    out[:] = data
    return out


def read_back(name: str, tensor: Any) -> bytes:
    """A tensor's bytes, read by its own framework (not by weightstream)."""
    if name == "numpy":
        return np.ascontiguousarray(tensor).tobytes()
    if name == "torch":
        import torch

        t = tensor.contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    # paddle: Tensor.numpy() copies and gives uint16/int8 for bf16/fp8: the same bits
    return np.ascontiguousarray(tensor.numpy()).tobytes()


def flat_bytes(name: str, data: np.ndarray) -> Any:
    """A flat uint8 tensor of the framework's own memory holding ``data`` (what empty_bytes gives)."""
    fw = need(name)
    flat = fw.empty_bytes(data.size, None)
    view = fw.bytes_view(flat) if data.size else None
    if view is not None:
        view[:] = data
    return flat


# --- one interface ----------------------------------------------------------------------------


def interface() -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(FrameworkModule).items() if callable(v) and not n.startswith("_")]
    return {n: inspect.signature(getattr(FrameworkModule, n)) for n in names}


@pytest.mark.parametrize("name", list(MODULES))
def test_every_module_has_the_interface_with_the_same_signatures(name: str) -> None:
    fw = MODULES[name]
    assert fw.NAME == name
    for func, sig in interface().items():
        got = inspect.signature(getattr(fw, func))
        want = [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()][1:]  # without self
        assert [(p.name, p.kind, p.default, p.annotation) for p in got.parameters.values()] == want, (name, func)
    assert set(FRAMEWORKS) == set(MODULES)
    assert module(name) is fw


def test_one_same_width_integer_table() -> None:
    assert frameworks.INT_OF_ITEMSIZE is wire.INT_OF_ITEMSIZE
    assert {n: dt.itemsize for n, dt in INT_OF_ITEMSIZE.items()} == {1: 1, 2: 2, 4: 4, 8: 8}
    assert all(dt.kind in "iu" for dt in INT_OF_ITEMSIZE.values())
    assert {d.itemsize for d in DTYPES} <= set(INT_OF_ITEMSIZE)


def test_importing_weightstream_imports_no_framework() -> None:
    code = (
        "import sys, weightstream, weightstream.frameworks.torch, weightstream.frameworks.paddle, "
        "weightstream.receiver.sinks, weightstream.receiver.snapshot, weightstream.sender.manifest\n"
        "print(sorted(m for m in ('torch', 'paddle') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_dispatch() -> None:
    a = np.zeros(3, np.float32)
    assert module_of(a) is numpy_fw and frameworks.framework_of(np.float32(1)) == "numpy"
    with pytest.raises(WeightstreamError, match="expected a numpy array, torch tensor or paddle tensor, got list"):
        module_of([1, 2])
    with pytest.raises(WeightstreamError, match="framework: expected one of numpy, paddle, torch, got 'jax'"):
        module("jax")
    assert frameworks.memory_key([1, 2]) is None and not frameworks.is_model({"a": a})
    assert frameworks.unmaterialised({"a": a}) == []


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
def test_dtype_table_round_trips_every_dtype(name: str) -> None:
    fw = need(name)
    codes = fw.codes_by_dtype()
    for d in DTYPES:
        native = fw.native_dtype(d)
        assert fw.wire_dtype(native) is d
        assert codes[native] == d.code
    assert len(codes) == len(DTYPES)


@pytest.mark.parametrize("name", list(MODULES))
def test_unsupported_dtype_is_the_same_error_everywhere(name: str) -> None:
    fw = need(name)
    native = {"numpy": lambda: np.dtype(np.complex64), "torch": lambda: __import__("torch").complex64,
              "paddle": lambda: __import__("paddle").complex64}[name]()
    with pytest.raises(WeightstreamError, match=r"is not supported by weightstream; supported: bool, uint8, .*fix: cast"):
        fw.wire_dtype(native)


# --- views and bytes, every dtype ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_view_host_bytes_and_retype_bit_exact(name: str, dtype: DType) -> None:
    fw = need(name)
    for shape in SHAPES:
        raw = random_bytes(dtype, shape, seed=dtype.code)
        buf = aligned(raw)
        t = fw.view(buf, dtype, shape)
        assert fw.owns(t) and module_of(t) is fw and fw.dtype_of(t) is dtype and fw.shape_of(t) == shape
        assert read_back(name, t) == raw.tobytes(), shape
        assert fw.is_materialised(t) and fw.device_of(t) == "cpu" and fw.to_host(t) is t
        fw.check_sendable(t)
        # the view is zero-copy: a write to the bucket shows in the tensor
        fresh = random_bytes(dtype, shape, seed=99)
        buf[:] = fresh
        assert read_back(name, t) == fresh.tobytes(), shape
        # and its host bytes are the bucket's own memory
        hb = fw.host_bytes(t)
        assert hb.dtype == np.uint8 and hb.ndim == 1 and hb.tobytes() == fresh.tobytes()
        if hb.size:
            assert hb.ctypes.data == buf.ctypes.data == fw.data_ptr(t)
            bv = fw.bytes_view(t)
            assert bv is not None and bv.flags.writeable and bv.ctypes.data == buf.ctypes.data
        # the framework's own flat bytes, reinterpreted (cuda_ipc's copy fallback, on the host)
        flat = flat_bytes(name, raw)
        typed = fw.retype(flat, dtype, shape)
        assert fw.dtype_of(typed) is dtype and fw.shape_of(typed) == shape and read_back(name, typed) == raw.tobytes()
        # a private copy keeps the bytes, not the memory
        copy = fw.detached_copy(t)
        buf[:] = raw
        assert read_back(name, copy) == fresh.tobytes() and fw.dtype_of(copy) is dtype


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_views_in_a_batch_equal_one_view_each(name: str, dtype: DType) -> None:
    """``views`` (tensors of one shape at equal steps, made in one batch) gives what ``view``
    gives for each: the same type, dtype, shape and bytes, and the bucket's own memory."""
    fw = need(name)
    for shape in [(5,), (2, 3, 4), (1,)]:
        nbytes = dtype.itemsize * int(np.prod(shape))
        for stride in (nbytes, -(-nbytes // 64) * 64 + 64):  # packed back to back, and aligned with a gap
            buf = aligned(np.random.default_rng(dtype.code).integers(0, 256, 64 + 7 * stride, dtype=np.uint8))
            batch = list(fw.views(buf, dtype, shape, 7, 64, stride))
            assert len(batch) == 7
            for k, t in enumerate(batch):
                one = fw.view(buf[64 + k * stride : 64 + k * stride + nbytes], dtype, shape)
                assert type(t) is type(one) and fw.dtype_of(t) is dtype and fw.shape_of(t) == shape
                assert read_back(name, t) == read_back(name, one) == buf[64 + k * stride :][:nbytes].tobytes()
                assert fw.data_ptr(t) == buf.ctypes.data + 64 + k * stride  # zero-copy


@pytest.mark.parametrize("name", list(MODULES))
def test_view_equals_the_checked_view_as(name: str) -> None:
    fw = need(name)
    for d in DTYPES:
        raw = random_bytes(d, (4, 3), seed=d.code)
        fast = fw.view(aligned(raw), d, (4, 3))
        checked = frameworks.view_as(name, aligned(raw), d, (4, 3))  # type: ignore[arg-type]
        assert type(fast) is type(checked) and fast.dtype == checked.dtype
        assert read_back(name, fast) == read_back(name, checked) == raw.tobytes()


@pytest.mark.parametrize("name", list(MODULES))
def test_memory_key_finds_aliases_only(name: str) -> None:
    fw = need(name)
    d = by_name("float32")
    buf = aligned(random_bytes(d, (2, 3)))
    a, b = fw.view(buf, d, (2, 3)), fw.view(buf, d, (2, 3))
    assert fw.memory_key(a) is not None and fw.memory_key(a) == fw.memory_key(b) == frameworks.memory_key(a)
    assert fw.memory_key(fw.detached_copy(a)) != fw.memory_key(a)
    assert fw.memory_key(fw.view(buf, d, (3, 2))) != fw.memory_key(a)  # same memory, another shape
    assert fw.memory_key(fw.view(buf, by_name("int32"), (2, 3))) != fw.memory_key(a)  # another dtype
    assert fw.memory_key(fw.view(aligned(np.zeros(0, np.uint8)), d, (0, 3))) is None


# --- the same errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
def test_host_tensors_are_no_cuda_source(name: str) -> None:
    fw = need(name)
    t = fw.view(aligned(np.zeros(8, np.uint8)), by_name("float32"), (2,))
    with pytest.raises(TransportError, match=r"transport='cuda_ipc'.*transport='shm'"):
        fw.cuda_source(t)
    with pytest.raises(TransportError, match=r"transport='cuda_ipc'.*transport='shm'"):
        frameworks.cuda_source(t)
    with pytest.raises(TransportError, match="expected a CUDA torch or paddle tensor"):
        fw.cuda_source(object())
    with pytest.raises(TransportError, match="expected a CUDA torch or paddle tensor"):
        frameworks.cuda_source(object())


def test_numpy_has_no_device_view_and_its_device_functions_are_host_only() -> None:
    assert numpy_fw.device_view(object(), by_name("float32"), (2,)) is None  # type: ignore[arg-type]
    out = numpy_fw.empty_bytes(16, 0)
    assert out.dtype == np.uint8 and out.shape == (16,)
    numpy_fw.sync_device(0)
    assert numpy_fw.unmaterialised({"a": out}) == [] and not numpy_fw.is_model({"a": out})


def test_numpy_facts() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert numpy_fw.bytes_view(a.T) is None  # not C-contiguous
    ro = a.copy()
    ro.flags.writeable = False
    assert numpy_fw.bytes_view(ro) is None and not numpy_fw.host_bytes(ro).flags.writeable
    assert numpy_fw.host_bytes(a.T).tobytes() == np.ascontiguousarray(a.T).tobytes()  # one copy, C order
    assert numpy_fw.memory_key(np.float32(1)) is None  # a scalar has no memory to share


def test_torch_materialisation_and_models() -> None:
    torch = pytest.importorskip("torch")
    meta = torch.empty(3, device="meta")
    assert not torch_fw.is_materialised(meta) and torch_fw.memory_key(meta) is None
    with pytest.raises(WeightstreamError, match="meta device"):
        torch_fw.check_sendable(meta)
    with pytest.raises(WeightstreamError, match="meta device"):
        torch_fw.host_bytes(meta)
    with pytest.raises(WeightstreamError, match="dense"):
        torch_fw.check_sendable(torch.eye(2).to_sparse())
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    model.bias = torch.nn.Parameter(torch.zeros(2))
    assert torch_fw.is_model(model) and frameworks.is_model(model) and not paddle_fw.is_model(model)
    assert torch_fw.unmaterialised(model) == ["weight"] == frameworks.unmaterialised(model)
    assert torch_fw.to_host(meta) is meta
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous: one copy
    assert torch_fw.bytes_view(t) is None and torch_fw.host_bytes(t).tobytes() == t.contiguous().numpy().tobytes()
    p = torch.nn.Parameter(torch.ones(3))  # requires grad: detached, still zero-copy
    assert torch_fw.host_bytes(p).ctypes.data == p.data_ptr()
    neg = torch._neg_view(torch.ones(3))  # lazily negated: its memory does not hold its values
    assert torch_fw.host_bytes(neg).view(np.float32).tolist() == [-1.0] * 3
    assert torch_fw.device_of(p) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(TransportError, match="cuda_ipc"):
            torch_fw.cuda_source(meta)


def test_paddle_materialisation_and_models() -> None:
    paddle = pytest.importorskip("paddle")
    with paddle.LazyGuard():
        layer = paddle.nn.Linear(2, 2)
    w = layer.weight
    assert not paddle_fw.is_materialised(w) and paddle_fw.memory_key(w) is None and paddle_fw.bytes_view(w) is None
    with pytest.raises(WeightstreamError, match="initialised"):
        paddle_fw.check_sendable(w)
    with pytest.raises(WeightstreamError, match="initialised"):
        paddle_fw.host_bytes(w)
    assert paddle_fw.is_model(layer) and frameworks.is_model(layer) and not torch_fw.is_model(layer)
    assert sorted(paddle_fw.unmaterialised(layer)) == ["bias", "weight"] == sorted(frameworks.unmaterialised(layer))
    assert paddle_fw.to_host(w) is w
    t = paddle.arange(12, dtype="float32").reshape([3, 4]).transpose([1, 0])  # not contiguous: one copy
    assert paddle_fw.bytes_view(t) is None and paddle_fw.host_bytes(t).tobytes() == t.numpy().tobytes()
    assert paddle_fw.device_of(t) == "cpu" == paddle.get_device()


@pytest.mark.parametrize("name", ["torch", "paddle"])
def test_tensors_of_an_unimported_framework_are_not_owned(name: str) -> None:
    """In a fresh process without the framework imported, nothing is its tensor (and it stays unimported)."""
    code = (
        f"import sys, numpy as np\nfrom weightstream.frameworks import {name} as fw\n"
        f"print(fw.imported(), fw.owns(np.zeros(2)), fw.is_model(object()), {name!r} in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False", "False", "False"]


# --- device memory (needs a GPU) ----------------------------------------------------------------


class _Device:
    """A DeviceMemory over a torch CUDA tensor's bytes (keeps the tensor alive)."""

    def __init__(self, tensor: Any) -> None:
        self.tensor, self.ptr, self.device = tensor, int(tensor.data_ptr()), int(tensor.device.index)
        self.nbytes = tensor.numel() * tensor.element_size()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "paddle"])
def test_device_view_and_cuda_source_bit_exact(name: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fw = need(name)
    for d in DTYPES:
        for shape in [(), (0,), (4, 3)]:
            raw = random_bytes(d, shape, seed=d.code)
            mem = _Device(torch.from_numpy(raw.copy()).cuda())
            t = fw.device_view(mem, d, shape)
            if t is None:
                assert name == "paddle"
                pytest.skip("paddle views GPU memory through cuda.core, which is not installed")
            assert fw.dtype_of(t) is d and fw.shape_of(t) == shape
            assert read_back(name, fw.to_host(t)) == raw.tobytes()
            if raw.size:
                src = fw.cuda_source(t)
                assert isinstance(src, CudaSource) and src.ptr == mem.ptr and src.nbytes == raw.size
                fw.sync_device(mem.device)
