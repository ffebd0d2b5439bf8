"""The stable dtype table: codes, names, and the mapping to NumPy/torch/paddle."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from weightstream.frameworks import dtype_of
from weightstream.frameworks import paddle as paddle_fw
from weightstream.frameworks import torch as torch_fw
from weightstream.protocol.dtypes import BY_NUMPY, DTYPES, by_code, by_name, from_numpy
from weightstream.protocol.errors import ProtocolError, WeightstreamError

pytestmark = pytest.mark.timeout(60)

# The wire contract: these codes must never change.
STABLE = [
    (0, "bool"),
    (1, "uint8"),
    (2, "int8"),
    (3, "int16"),
    (4, "int32"),
    (5, "int64"),
    (6, "float16"),
    (7, "bfloat16"),
    (8, "float32"),
    (9, "float64"),
    (10, "float8_e4m3fn"),
    (11, "float8_e5m2"),
]


def test_codes_are_stable() -> None:
    assert [(d.code, d.name) for d in DTYPES] == STABLE
    for i, d in enumerate(DTYPES):
        assert d.code == i and by_code(i) is d and by_name(d.name) is d
        assert d.itemsize == d.numpy.itemsize


def test_numpy_dtypes() -> None:
    assert by_name("bfloat16").numpy == np.dtype(ml_dtypes.bfloat16)
    assert by_name("float8_e4m3fn").numpy == np.dtype(ml_dtypes.float8_e4m3fn)
    assert by_name("float8_e5m2").numpy == np.dtype(ml_dtypes.float8_e5m2)
    assert by_name("bool").numpy == np.dtype(np.bool_)
    for d in DTYPES:
        assert BY_NUMPY[d.numpy] is d
        assert dtype_of(np.zeros(2, d.numpy)) is d
        assert dtype_of(np.zeros((), d.numpy)[()]) is d  # numpy scalar


@pytest.mark.parametrize("code", [-1, 12, 255, True, 1.0, "1", None])
def test_by_code_rejects(code: object) -> None:
    with pytest.raises(ProtocolError, match=r"0\.\.11"):
        by_code(code)  # type: ignore[arg-type]


def test_by_name_rejects_with_list() -> None:
    with pytest.raises(WeightstreamError, match="float8_e5m2") as info:
        by_name("bf16")
    assert "'bf16'" in str(info.value)


def test_unsupported_numpy_dtype() -> None:
    with pytest.raises(WeightstreamError, match=r"complex64.*supported: bool"):
        dtype_of(np.zeros(2, np.complex64))
    with pytest.raises(WeightstreamError, match="supported"):
        from_numpy(np.dtype(">f4"))  # non-native byte order is not a wire dtype
    with pytest.raises(WeightstreamError, match="list"):
        dtype_of([1, 2])


def test_torch_dtypes() -> None:
    torch = pytest.importorskip("torch")
    for d in DTYPES:
        td = torch_fw.native_dtype(d)
        assert td == getattr(torch, d.name)
        assert dtype_of(torch.zeros(2, dtype=td)) is d
        assert torch.empty((), dtype=td).element_size() == d.itemsize
    with pytest.raises(WeightstreamError, match="complex64"):
        dtype_of(torch.zeros(2, dtype=torch.complex64))


def test_paddle_dtypes() -> None:
    paddle = pytest.importorskip("paddle")
    for d in DTYPES:
        pd = paddle_fw.native_dtype(d)
        assert pd == getattr(paddle, d.name)
        t = paddle.zeros([2], dtype=pd)
        assert dtype_of(t) is d
        assert t.element_size() == d.itemsize
    with pytest.raises(WeightstreamError, match="supported"):
        dtype_of(paddle.zeros([2], dtype="complex64"))
