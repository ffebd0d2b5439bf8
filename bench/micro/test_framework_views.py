"""Micro-benchmarks of the receiver's view hot path: many small typed views over one bucket.

Each framework module's ``view`` (what ``VersionRun`` hands ``load_weights`` per tensor)
against, in the same group, the same recipe written inline (same-width NumPy int view +
``torch.from_numpy`` + ``.view(dtype)`` for torch; a plain NumPy view for NumPy): the
difference is the cost of going through the module. Each checks the views it made.

    python -m pytest bench/micro/test_framework_views.py --benchmark-columns=min,median,max
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weightstream.frameworks import module
from weightstream.protocol.dtypes import DTYPES, INT_OF_ITEMSIZE, by_name

N = 20_000
TENSOR_BYTES = 256
SHAPE = (8, 16)  # 128 bfloat16 = 256 bytes
DTYPE = by_name("bfloat16")  # a reinterpreted dtype: the path with the extra .view(dtype)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def pieces() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    bucket = rng.integers(0, 256, N * TENSOR_BYTES, dtype=np.uint8)
    return [bucket[i * TENSOR_BYTES : (i + 1) * TENSOR_BYTES] for i in range(N)]


def check(framework: str, views: list[Any], pieces: list[np.ndarray]) -> None:
    fw = module(framework)
    assert len(views) == N and all(fw.dtype_of(v) is DTYPE and fw.shape_of(v) == SHAPE for v in views[:: N // 100])
    for v, piece in zip(views[:: N // 100], pieces[:: N // 100]):
        assert fw.host_bytes(v).ctypes.data == piece.ctypes.data  # zero-copy


@pytest.mark.parametrize("framework", ["numpy", "torch", "paddle"])
def test_module_view(benchmark: Any, pieces: list[np.ndarray], framework: str) -> None:
    if framework != "numpy":
        pytest.importorskip(framework)
    benchmark.group = f"views-{framework}"
    view = module(framework).view
    views = benchmark(lambda: [view(p, DTYPE, SHAPE) for p in pieces])
    check(framework, views, pieces)


def test_baseline_inline_numpy_view(benchmark: Any, pieces: list[np.ndarray]) -> None:
    benchmark.group = "views-numpy"
    dtypes = tuple(d.numpy for d in DTYPES)
    code = DTYPE.code
    views = benchmark(lambda: [p.view(dtypes[code]).reshape(SHAPE) for p in pieces])
    check("numpy", views, pieces)


def test_baseline_inline_torch_view(benchmark: Any, pieces: list[np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    benchmark.group = "views-torch"
    as_ints, target, from_numpy = INT_OF_ITEMSIZE[DTYPE.itemsize], torch.bfloat16, torch.from_numpy
    views = benchmark(lambda: [from_numpy(p.view(as_ints).reshape(SHAPE)).view(target) for p in pieces])
    check("torch", views, pieces)
