"""Packed per-tensor arrays: shapes and sizes survive packing exactly, and hostile values
are caught before they can wrap int64."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightstream.protocol import messages as m
from weightstream.protocol.dtypes import DTYPES
from weightstream.protocol.errors import ProtocolError
from weightstream.protocol.packed import MAX_VALUE, element_counts, pack_shapes, pack_u64, u64_array, unpack_shapes
from weightstream.receiver.run_manifest import RunManifest

pytestmark = pytest.mark.timeout(120)

shapes_st = st.lists(st.lists(st.integers(0, 1 << 12), max_size=5).map(tuple), max_size=30)
uniform_st = st.integers(0, 4).flatmap(
    lambda k: st.lists(st.lists(st.integers(0, 1 << 12), min_size=k, max_size=k).map(tuple), max_size=30)
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(shapes_st, uniform_st))
def test_shapes_and_counts_round_trip(shapes: list[tuple[int, ...]]) -> None:
    ndims, dims = pack_shapes(shapes)
    values = u64_array(dims)
    assert values is not None
    assert unpack_shapes(ndims, values) == shapes
    counts = element_counts(ndims, values)
    assert counts is not None and counts.tolist() == [math.prod(s) for s in shapes]


def test_element_counts_refuse_what_would_wrap() -> None:
    ndims, dims = pack_shapes([(1 << 40, 1 << 40)])
    assert element_counts(ndims, u64_array(dims)) is None  # type: ignore[arg-type]
    ndims, dims = pack_shapes([(3,), (1 << 31, 1 << 31, 4)])  # ragged path
    assert element_counts(ndims, u64_array(dims)) is None  # type: ignore[arg-type]
    ndims, dims = pack_shapes([(0, 1 << 40, 1 << 40)])  # an empty tensor is fine whatever its other dims
    assert element_counts(ndims, u64_array(dims)).tolist() == [0]  # type: ignore[union-attr]


def test_u64_array_bounds() -> None:
    assert u64_array(pack_u64([0, MAX_VALUE])).tolist() == [0, MAX_VALUE]  # type: ignore[union-attr]
    assert u64_array(pack_u64([MAX_VALUE + 1])) is None
    assert u64_array(b"\x00" * 7) is None
    assert u64_array(b"").tolist() == []  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(shapes_st, st.data())
def test_begin_sizes_match_dtype_times_elements(shapes: list[tuple[int, ...]], data: st.DataObject) -> None:
    codes = [data.draw(st.integers(0, len(DTYPES) - 1)) for _ in shapes]
    sizes = [DTYPES[c].itemsize * math.prod(s) for c, s in zip(codes, shapes)]
    names = [f"t{i}" for i in range(len(shapes))]
    begin = m.Begin.build("v", names, codes, shapes, sum(sizes), 1 if shapes else 0)
    decoded = m.decode(m.encode(begin))
    assert isinstance(decoded, m.Begin)
    assert m.manifest_arrays(decoded).sizes.tolist() == sizes
    assert decoded.shapes() == shapes


def test_begin_with_a_huge_total_is_refused() -> None:
    big = (1 << 20, 1 << 20, 1 << 20)  # 2**60 elements: fits one tensor, not 8 bytes each
    begin = m.Begin.build("v", ["a"], [9], [big], 0, 1)  # float64
    with pytest.raises(ProtocolError, match="more than"):
        m.decode(m.encode(begin))


def test_run_manifest_is_reused_only_for_an_identical_begin() -> None:
    begin = m.Begin.build("v1", ["a", "b"], [8, 5], [(2, 3), (4,)], 56, 1)
    manifest = RunManifest(begin)
    assert manifest.fulls == [24, 32] and manifest.shapes == [(2, 3), (4,)]
    assert manifest.same_as(m.decode(m.encode(m.Begin.build("v2", ["a", "b"], [8, 5], [(2, 3), (4,)], 56, 3))))
    assert not manifest.same_as(m.Begin.build("v2", ["a", "c"], [8, 5], [(2, 3), (4,)], 56, 1))
    assert not manifest.same_as(m.Begin.build("v2", ["a", "b"], [8, 5], [(3, 2), (4,)], 56, 1))
    assert not manifest.same_as(m.Begin.build("v2", ["a", "b"], [8, 9], [(2, 3), (4,)], 56, 1))


def test_run_manifest_targets_follow_their_owner() -> None:
    begin = m.Begin.build("v1", ["small", "big", "odd", "none"], [8, 1, 8, 8], [(4,), (1 << 17,), (3,), (1,)], 16 + (1 << 17) + 12 + 4, 1)
    state = {"small": np.zeros(4, np.float32), "big": np.zeros(1 << 17, np.uint8), "odd": np.zeros(5, np.float32)}

    def destination(name: str) -> np.ndarray | None:
        return state[name].view(np.uint8) if name in state else None

    manifest = RunManifest(begin)
    owner = object()
    found = manifest.targets(destination, owner)
    targets = found.objects
    assert isinstance(targets[0], memoryview) and isinstance(targets[1], np.ndarray)
    assert targets[2] is None and targets[3] is None  # wrong size, no destination: load_weights gets a view
    if found.addresses is not None:  # the C copy writes where the objects are, and nowhere else
        assert found.addresses.tolist() == [state["small"].ctypes.data, state["big"].ctypes.data, 0, 0]
    assert manifest.targets(destination, owner) is found
    state["small"] = np.ones(4, np.float32)
    fresh = manifest.targets(destination, object()).objects  # a new specs object: destinations looked up again
    assert fresh is not targets
    fresh[0][:] = np.full(4, 2.0, np.float32).view(np.uint8)
    assert state["small"].tolist() == [2.0] * 4
