"""The C copy accelerator against the pure-Python loops it stands in for: the same bytes
land, it stops exactly where the Python path must take over, and a span outside the flat
buffer is refused before any byte of its batch moves."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightstream import native as speedups
from weightstream.protocol.transports.shm import ShmExportedSlot

pytestmark = pytest.mark.timeout(60)

native = pytest.mark.skipif(not speedups.BUILT, reason="the C accelerator was not built (no compiler at install time)")

DTYPES = [np.uint8, np.int16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.bool_]


@pytest.fixture(params=[True, False], ids=["native", "python"])
def copy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test with the C module, then with the pure-Python loops alone."""
    if request.param and not speedups.BUILT:
        pytest.skip("the C accelerator was not built")
    monkeypatch.setattr(speedups, "NATIVE", request.param)
    return bool(request.param)


def test_the_accelerator_is_built_where_ci_requires_it() -> None:
    if os.environ.get("WEIGHTSTREAM_REQUIRE_NATIVE") != "1":
        pytest.skip("only CI, which has a compiler, requires it")
    assert speedups.BUILT, "weightstream.native's C modules did not build; see the pip install log for the error"


def test_every_c_module_is_built_where_ci_requires_it() -> None:
    """Each stub beside the wrapper names one C module (setup.py builds each from its .c), and
    each must import; the shm ring must find its own under the name it imports."""
    if os.environ.get("WEIGHTSTREAM_REQUIRE_NATIVE") != "1":
        pytest.skip("only CI, which has a compiler, requires it")
    stubs = sorted(Path(speedups.__file__).parent.glob("_*.pyi"))
    assert len(stubs) >= 3, f"expected the C modules' stubs beside {speedups.__file__}, found {stubs}"
    for stub in stubs:
        name = f"weightstream.native.{stub.stem}"
        try:
            importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"{name} did not build ({exc}); see the pip install log for the compiler error")
    from weightstream.protocol.transports.shm import ring as shm_ring

    assert shm_ring.Control is not None, "shm/ring.py imports its C module under another name than the built one"


class _Subclass(np.ndarray):
    pass


@st.composite
def sources(draw: Any) -> list[Any]:
    """Arrays of every kind a trainer hands over, some the C path copies and some it must leave."""
    out: list[Any] = []
    for _ in range(draw(st.integers(0, 24))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        arr = np.arange(int(np.prod(shape)), dtype=np.uint8).astype(dtype).reshape(shape)
        kind = draw(st.sampled_from(["plain", "plain", "fortran", "strided", "readonly", "none", "big", "subclass"]))
        if kind == "big":  # past the size read from the array's own fields: the buffer protocol again
            arr = np.arange(5000, dtype=np.uint8).astype(dtype)[: 5000 if draw(st.booleans()) else 4999]
        elif kind == "subclass":  # not an exact ndarray: exported as a buffer
            arr = arr.view(_Subclass)
        elif kind == "fortran" and arr.ndim > 1:
            arr = np.asfortranarray(arr)
        elif kind == "strided" and arr.ndim >= 1 and arr.shape[0] > 1:
            arr = arr[::2]
        elif kind == "readonly":
            arr.flags.writeable = False
        out.append(None if kind == "none" else arr)
    return out


def layout(items: list[Any], gap: int) -> tuple[list[int], list[int], int]:
    offsets, nbytes, cursor = [], [], 0
    for item in items:
        n = 0 if item is None else item.nbytes
        offsets.append(cursor)
        nbytes.append(n)
        cursor += n + gap
    return offsets, nbytes, cursor


def c_exportable(item: Any, writable: bool) -> bool:
    if item is None or not item.flags.c_contiguous:
        return False
    return item.flags.writeable or not writable


@native
@settings(max_examples=200, deadline=None)
@given(items=sources(), gap=st.integers(0, 9), start=st.integers(0, 3), stream=st.booleans())
def test_gather_copies_up_to_the_first_source_it_cannot_take(items: list[Any], gap: int, start: int, stream: bool) -> None:
    offsets, nbytes, size = layout(items, gap)
    dst = np.full(size, 0xAB, np.uint8)
    stop = speedups._spans.gather(dst, offsets, nbytes, items, start, (), stream)
    want_stop = next((i for i in range(start, len(items)) if not c_exportable(items[i], writable=False)), len(items))
    assert stop == max(want_stop, min(start, len(items)))
    want = np.full(size, 0xAB, np.uint8)
    for i in range(start, stop):
        want[offsets[i] : offsets[i] + nbytes[i]] = items[i].reshape(-1).view(np.uint8)
    assert dst.tobytes() == want.tobytes()


def u64(values: list[int]) -> np.ndarray:
    return np.array(values, np.uint64)


@native
@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), max_size=30), cuts=st.sets(st.integers(0, 30)), stream=st.booleans())
def test_back_to_back_tensors_are_copied_as_runs_bit_exact(sizes: list[int], cuts: set[int], stream: bool) -> None:
    """Views into one flat buffer (a trainer's parameter buffer), back to back in memory and in
    the slot except where a gap cuts the run: gather and scatter copy each run at once."""
    flat = np.random.default_rng(len(sizes)).integers(0, 256, sum(sizes) + 64 * len(sizes), dtype=np.uint8)
    views, offsets, at, pos = [], [], 0, 0
    for i, n in enumerate(sizes):
        gap = 64 if i in cuts else 0
        at, pos = at + (gap if i % 3 != 1 else 0), pos + (gap if i % 3 != 0 else 0)  # in memory, the slot, or both
        views.append(flat[at : at + n])
        offsets.append(pos)
        at, pos = at + n, pos + n
    slot = np.full(pos + 1, 0xAB, np.uint8)
    assert speedups._spans.gather(slot, offsets, sizes, views, 0, (), stream) == len(views)
    for view, offset in zip(views, offsets):
        assert slot[offset : offset + view.nbytes].tobytes() == view.tobytes()
    back = np.full_like(flat, 0xCD)
    targets = [back[v.__array_interface__["data"][0] - flat.__array_interface__["data"][0] :][: v.nbytes] for v in views]
    addresses = np.frombuffer(speedups._spans.destinations(targets, sizes), np.uint64)
    assert speedups._spans.scatter(slot, u64(offsets), u64(sizes), addresses, 0, stream) == len(views)
    for view, target in zip(views, targets):
        assert target.tobytes() == view.tobytes()
    covered = np.zeros(flat.nbytes, bool)
    for v in views:
        start = v.__array_interface__["data"][0] - flat.__array_interface__["data"][0]
        covered[start : start + v.nbytes] = True
    assert (back[~covered] == 0xCD).all()  # nothing between the runs was written


@native
@settings(max_examples=200, deadline=None)
@given(items=sources(), gap=st.integers(0, 9), wrong_size=st.integers(-1, 5))
def test_destinations_give_an_address_only_where_the_c_copy_may_write(items: list[Any], gap: int, wrong_size: int) -> None:
    _offsets, nbytes, _size = layout(items, gap)
    if 0 <= wrong_size < len(items):
        nbytes[wrong_size] += 1  # a target of another size than its span: no address
    got = np.frombuffer(speedups._spans.destinations(items, nbytes), np.uint64)
    for i, (item, n) in enumerate(zip(items, nbytes)):
        usable = c_exportable(item, writable=True) and item.nbytes == n
        assert (got[i] != 0) == usable
        if usable and n:
            assert int(got[i]) == item.__array_interface__["data"][0]


@native
@settings(max_examples=200, deadline=None)
@given(items=sources(), gap=st.integers(0, 9), stream=st.booleans(), start=st.integers(0, 3))
def test_scatter_fills_up_to_the_first_target_it_cannot_write(items: list[Any], gap: int, stream: bool, start: int) -> None:
    offsets, nbytes, size = layout(items, gap)
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    before = [None if t is None else t.copy() for t in items]
    addresses = np.frombuffer(speedups._spans.destinations(items, nbytes), np.uint64)
    stop = speedups._spans.scatter(src, u64(offsets), u64(nbytes), addresses, start, stream)
    want_stop = next((i for i in range(start, len(items)) if not c_exportable(items[i], writable=True)), len(items))
    assert stop == max(want_stop, min(start, len(items)))
    for i, (target, old) in enumerate(zip(items, before)):
        if target is None:
            continue
        got = np.ascontiguousarray(target).reshape(-1).view(np.uint8)
        moved = start <= i < stop
        want = src[offsets[i] : offsets[i] + nbytes[i]] if moved else np.ascontiguousarray(old).reshape(-1).view(np.uint8)
        assert got.tobytes() == want.tobytes()


@native
@settings(max_examples=300, deadline=None)
@given(
    size=st.one_of(st.integers(0, 600), st.integers(4000, 70_000)),
    dst_at=st.integers(0, 130),
    src_at=st.integers(0, 130),
    stream=st.booleans(),
)
def test_copy_lands_every_byte_at_any_alignment_and_nothing_around_it(
    size: int, dst_at: int, src_at: int, stream: bool
) -> None:
    """Streaming copies have a cached head up to the destination's next 64-byte line, whole
    lines (four pages interleaved, then single lines), and a cached tail: every split of those,
    from any source alignment."""
    src = np.random.default_rng(size).integers(0, 256, src_at + size, dtype=np.uint8)
    dst = np.full(dst_at + size + 64, 0xAB, np.uint8)
    speedups._spans.copy(dst[dst_at : dst_at + size], src[src_at:], stream)
    assert dst[dst_at : dst_at + size].tobytes() == src[src_at:].tobytes()
    assert (dst[:dst_at] == 0xAB).all() and (dst[dst_at + size :] == 0xAB).all()


SWEEP = """
import numpy as np
from weightstream.native import _spans
print(_spans.STREAM_SIMD)
for size in [*range(0, 300, 7), 4095, 4096, 16383, 16384, 16448, 65536 + 65, 300_001]:
    for dst_at in (0, 1, 31, 32, 63, 64, 100):
        for src_at in (0, 3, 32):
            src = np.random.default_rng(size).integers(0, 256, src_at + size, dtype=np.uint8)
            dst = np.full(dst_at + size + 64, 0xAB, np.uint8)
            _spans.copy(dst[dst_at : dst_at + size], src[src_at:], True)
            if dst[dst_at : dst_at + size].tobytes() != src[src_at:].tobytes() or (dst[:dst_at] != 0xAB).any() \
                    or (dst[dst_at + size :] != 0xAB).any():
                raise SystemExit(f"size {size} dst_at {dst_at} src_at {src_at}: bytes differ")
"""


@native
@pytest.mark.parametrize("simd", ["", "sse2"])
def test_each_streaming_store_path_lands_every_byte(simd: str) -> None:
    """The streaming copy takes 32-byte AVX2 stores where the CPU has them and SSE2's otherwise
    (``WEIGHTSTREAM_SIMD=sse2`` forces the latter): both, in a process of their own, at sizes
    around every split and at any alignment."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSTREAM_SIMD"} | ({"WEIGHTSTREAM_SIMD": simd} if simd else {})
    out = subprocess.run([sys.executable, "-c", SWEEP], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    flags = set(m.group(1).split()) if (m := re.search(r"^flags\s*:(.*)$", cpu, re.M)) else set()
    want = "avx2" if "avx2" in flags and not simd else "sse2" if "sse2" in flags else "none"
    assert out.stdout.split()[0] == want


@native
@pytest.mark.parametrize("shift", [-100, -1, 1, 100])
def test_an_overlapping_streaming_copy_is_a_memmove(shift: int) -> None:
    buf = np.arange(4096, dtype=np.uint32).view(np.uint8)
    want = buf[1000:9000].copy()
    speedups._spans.copy(buf[1000 + shift : 9000 + shift], buf[1000:9000], True)
    assert buf[1000 + shift : 9000 + shift].tobytes() == want.tobytes()


@native
def test_copy_refuses_buffers_of_different_sizes_and_a_read_only_destination() -> None:
    with pytest.raises(ValueError, match="expected a destination of the source's 8 bytes, got 7"):
        speedups._spans.copy(np.zeros(7, np.uint8), np.ones(8, np.uint8), True)
    frozen = np.zeros(8, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        speedups._spans.copy(frozen, np.ones(8, np.uint8))
    assert not frozen.any()


def test_copy_takes_numpys_path_for_what_the_c_copy_cannot(copy_mode: bool) -> None:
    """A strided view (or no C module) goes through np.copyto: the same bytes."""
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(128, np.uint8)
    speedups.copy(dst[::2], src, stream=True)
    assert dst[::2].tobytes() == src.tobytes() and not dst[1::2].any()
    speedups.copy(dst[:64], src, stream=True)
    assert dst[:64].tobytes() == src.tobytes()


@native
def test_a_source_of_the_wrong_size_stops_the_copy_there() -> None:
    dst = np.zeros(16, np.uint8)
    items = [np.ones(4, np.uint8), np.ones(3, np.uint8), np.ones(4, np.uint8)]
    assert speedups._spans.gather(dst, [0, 4, 8], [4, 4, 4], items, 0) == 1
    assert dst.tolist() == [1] * 4 + [0] * 12


@native
@pytest.mark.parametrize(
    ("offsets", "nbytes", "items", "message"),
    [
        ([13], [4], [np.ones(4, np.uint8)], "expected bytes [13, 17) inside the 16-byte buffer"),
        ([-1], [4], [np.ones(4, np.uint8)], "offsets[0]: expected a non-negative int, got -1"),
        ([0], [-4], [np.ones(4, np.uint8)], "nbytes[0]: expected a non-negative int, got -4"),
        ([0, 4], [4], [np.ones(4, np.uint8)] * 2, "expected equal lengths, got 2, 1 and 2"),
    ],
    ids=["past-the-end", "negative-offset", "negative-size", "lengths"],
)
def test_a_span_the_buffer_cannot_hold_is_refused_before_its_batch_moves(
    offsets: list[int], nbytes: list[int], items: list[Any], message: str
) -> None:
    flat = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        speedups._spans.gather(flat, offsets, nbytes, items, 0)
    assert not flat.any()


@native
@pytest.mark.parametrize(
    ("offsets", "nbytes", "message"),
    [
        ([0, 13], [4, 4], "span 1: expected bytes [13, 17) inside the 16-byte buffer"),
        ([0, 2**64 - 1], [4, 4], "span 1: expected bytes [18446744073709551615, "),  # a negative int64, as uint64
        ([0, 4], [4], "expected equal lengths, got 2, 1 and 2"),
    ],
    ids=["past-the-end", "negative-offset", "lengths"],
)
def test_scatter_refuses_a_span_outside_the_slot_before_any_byte_moves(
    offsets: list[int], nbytes: list[int], message: str
) -> None:
    targets = [np.zeros(4, np.uint8), np.zeros(4, np.uint8)]
    addresses = np.frombuffer(speedups._spans.destinations(targets, [4, 4]), np.uint64)
    src = np.ones(16, np.uint8)
    with pytest.raises(ValueError, match=re.escape(message)):
        speedups._spans.scatter(src, u64(offsets), u64(nbytes), addresses, 0, True)
    assert not any(t.any() for t in targets)


@native
def test_scatter_takes_arrays_of_8_byte_ints_only() -> None:
    addresses = np.zeros(1, np.uint64)
    with pytest.raises(TypeError, match="offsets: expected a buffer of 8-byte ints"):
        speedups._spans.scatter(np.ones(8, np.uint8), np.zeros(1, np.uint32), u64([4]), addresses, 0)
    with pytest.raises(TypeError, match="addresses: expected a buffer of 8-byte ints"):
        speedups._spans.scatter(np.ones(8, np.uint8), u64([0]), u64([4]), np.zeros(1, np.float64), 0)
    # signed int64, as a rank's BUCKET arrays are: taken as they are
    assert speedups._spans.scatter(np.ones(8, np.uint8), np.zeros(1, np.int64), np.full(1, 4, np.int64), addresses, 0) == 0


@native
def test_a_read_only_flat_buffer_cannot_be_gathered_into() -> None:
    flat = np.zeros(8, np.uint8)
    flat.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        speedups._spans.gather(flat, [0], [4], [np.ones(4, np.uint8)], 0)


def test_without_the_accelerator_both_hand_everything_to_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speedups, "NATIVE", False)
    flat = np.zeros(8, np.uint8)
    assert speedups.gather(flat, [0], [4], [np.ones(4, np.uint8)], 0) == 0
    target = np.zeros(4, np.uint8)
    assert speedups.destinations([target], [4]) is None
    assert speedups.scatter(np.ones(8, np.uint8), u64([0]), u64([4]), u64([target.ctypes.data]), 0) == 0
    assert not flat.any() and not target.any()


@native
@pytest.mark.parametrize(
    ("value", "spans", "layout"),
    [("", True, True), ("0", True, True), ("1", False, False), ("spans", False, True), ("layout", True, False),
     ("spans,layout", False, False), ("bogus", False, False)],
)
def test_pure_python_can_switch_off_one_c_module(monkeypatch: pytest.MonkeyPatch, value: str, spans: bool, layout: bool) -> None:
    """WEIGHTSTREAM_PURE_PYTHON=spans|layout turns off only that module's paths (a bench row per
    module); "1", or anything it does not know, turns off all."""
    monkeypatch.setenv("WEIGHTSTREAM_PURE_PYTHON", value)
    try:
        speedups.configure()
        assert (speedups.SPANS and speedups.NATIVE, speedups.LAYOUT and speedups.NATIVE) == (spans, layout)
        flat = np.zeros(8, np.uint8)
        assert speedups.gather(flat, [0], [4], [np.ones(4, np.uint8)], 0) == (1 if spans else 0)
        assert (speedups.dict_version({}) is not None) == (layout and sys.version_info < (3, 12))
    finally:
        monkeypatch.delenv("WEIGHTSTREAM_PURE_PYTHON")
        speedups.configure()


def test_write_tensors_lands_every_kind_of_tensor_and_names_the_one_that_changed(copy_mode: bool) -> None:
    """The slot's bulk write, mixing what the C path takes with what only Python can."""
    rng = np.random.default_rng(7)
    tensors = [
        rng.random((3, 5), dtype=np.float32),
        np.asfortranarray(rng.random((4, 3))),  # F order: the checked path copies it in C order
        rng.random(100).astype(ml_dtypes.bfloat16),
        np.float64(2.5),  # a NumPy scalar
        np.array(7, np.int64),  # 0-d
        np.zeros((0, 3), np.float16),
        rng.random(40_000)[::2],  # strided, big
        rng.random(1 << 17),  # bigger than the small-copy limit
    ]
    offsets, nbytes, size = layout(tensors, 8)
    slot = ShmExportedSlot(size)
    try:
        assert slot.write_tensors(offsets, tensors, nbytes) is None
        for tensor, offset, n in zip(tensors, offsets, nbytes):
            want = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
            assert slot.host_view()[offset : offset + n].tobytes() == want.tobytes()  # no view outlives close
        resized = [*tensors[:5], np.zeros((1, 3), np.float16), *tensors[6:]]
        assert slot.write_tensors(offsets, resized, nbytes) == 5
    finally:
        slot.close()


# --- describe's unchanged-layout fast path ---------------------------------------------

def _layout_items(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    return [(f"p{i}", rng.random(n).astype(np.float32)) for i, n in enumerate([3, 1, 4, 1, 5])]


CHANGES = {
    "renamed": lambda items: [*items[:2], ("other", items[2][1]), *items[3:]],
    "retyped": lambda items: [*items[:2], (items[2][0], items[2][1].astype(np.float16)), *items[3:]],
    "reshaped": lambda items: [*items[:2], (items[2][0], items[2][1].reshape(2, 2)), *items[3:]],
    "one-more": lambda items: [*items, ("p5", np.zeros(2, np.float32))],
    "one-fewer": lambda items: items[:-1],
    "reordered": lambda items: [items[1], items[0], *items[2:]],
    "not-a-pair": lambda items: [*items[:2], (items[2][0], items[2][1], 1), *items[3:]],
    "a-list-pair": lambda items: [*items[:2], list(items[2]), *items[3:]],
    "not-numpy": lambda items: [*items[:2], (items[2][0], memoryview(items[2][1])), *items[3:]],
    "not-a-wire-dtype": lambda items: [*items[:2], (items[2][0], items[2][1].astype(np.complex64)), *items[3:]],
    "a-subclass": lambda items: [*items[:2], (items[2][0], np.ma.masked_array(items[2][1])), *items[3:]],
}


@native
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_of_layout_takes_the_full_describe(change: str) -> None:
    from weightstream.sender.manifest import _CODE_OF_NUMPY, describe

    items = _layout_items(np.random.default_rng(1))
    previous = describe(items)
    fresh = [(name, t.copy()) for name, t in items]  # new arrays, same layout
    same = speedups.unchanged_arrays(fresh, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes)
    assert same is not None and all(a is b for a, b in zip(same, (t for _, t in fresh)))
    changed = CHANGES[change](fresh)
    assert speedups.unchanged_arrays(changed, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes) is None


@native
def test_the_fast_path_checks_every_dtype_of_a_mixed_model() -> None:
    """It looks a dtype's code up again only when the dtype object changes from the last
    tensor's: alternating dtypes, and one retyped to its neighbour's, must still be seen."""
    from weightstream.sender.manifest import _CODE_OF_NUMPY, describe

    kinds = [np.float32, np.float16, np.float16, np.int64, np.float32, np.float32]
    items = [(f"p{i}", np.zeros(4, kind)) for i, kind in enumerate(kinds)]
    previous = describe(items)
    same = speedups.unchanged_arrays(items, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes)
    assert same is not None and all(a is b for a, b in zip(same, (t for _, t in items)))
    for i in range(1, len(items)):  # each tensor takes the dtype of the one before it
        changed = list(items)
        changed[i] = (items[i][0], np.zeros(4, kinds[i - 1]))
        got = speedups.unchanged_arrays(changed, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes)
        assert (got is None) == (kinds[i] != kinds[i - 1])


_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@native
@settings(max_examples=200, deadline=None)
@given(before=st.lists(_shapes, min_size=1, max_size=6), after=st.lists(_shapes, min_size=1, max_size=6),
       transposed=st.booleans())
def test_the_fast_path_sees_every_shape_change(before: list[tuple[int, ...]], after: list[tuple[int, ...]],
                                               transposed: bool) -> None:
    """Shapes are read from the arrays' own fields, not ``.shape``: 0-d arrays, empty dims,
    equal sizes in another shape, and views (a transpose) must all compare as ``.shape`` does."""
    from weightstream.sender.manifest import _CODE_OF_NUMPY, describe

    after = (after * len(before))[: len(before)]
    previous = describe([(f"p{i}", np.zeros(s, np.float32)) for i, s in enumerate(before)])
    now = [(f"p{i}", np.zeros(s[::-1], np.float32).T if transposed else np.zeros(s, np.float32))
           for i, s in enumerate(after)]
    got = speedups.unchanged_arrays(now, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes)
    assert (got is not None) == (after == before)


@native
@settings(max_examples=60, deadline=None)
@given(at=st.integers(0, 99), change=st.sampled_from(sorted(CHANGES)))
def test_the_fast_path_sees_a_change_anywhere_in_a_long_list(at: int, change: str) -> None:
    """The pass reads pairs ahead of the one it checks: a change (a non-pair, a non-array, a new
    shape) at any place, the last ones included, must still be seen, and nothing read past the end."""
    from weightstream.sender.manifest import _CODE_OF_NUMPY, describe

    items = [(f"p{i}", np.zeros(4, np.float32)) for i in range(100)]
    previous = describe(items)
    same = speedups.unchanged_arrays(items, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes)
    assert same is not None and len(same) == 100
    window = items[max(at - 2, 0):at + 3]
    changed_window = CHANGES[change](window) if len(window) == 5 else window[:-1]
    changed = [*items[:max(at - 2, 0)], *changed_window, *items[at + 3:]]
    assert speedups.unchanged_arrays(changed, _CODE_OF_NUMPY, previous.names, previous.dtypes, previous.shapes) is None


def test_describe_shares_one_tuple_per_distinct_shape() -> None:
    from weightstream.sender.manifest import describe

    got = describe([(f"p{i}", np.zeros((4, i % 3), np.float32)) for i in range(30)])
    assert len({id(shape) for shape in got.shapes}) == 3 and got.shapes[:3] == [(4, 0), (4, 1), (4, 2)]
    torch = pytest.importorskip("torch")
    general = describe([(f"p{i}", torch.zeros((2, i % 2), dtype=torch.int8)) for i in range(10)])  # not NumPy
    assert len({id(shape) for shape in general.shapes}) == 2


@pytest.mark.parametrize("change", ["unchanged", *sorted(CHANGES)])
def test_describe_with_a_previous_push_equals_describe_from_scratch(change: str) -> None:
    from weightstream.protocol.errors import WeightstreamError
    from weightstream.sender.manifest import describe

    items = _layout_items(np.random.default_rng(2))
    previous = describe(items)
    now = items if change == "unchanged" else CHANGES[change](items)
    try:
        want = describe(now)
    except WeightstreamError as exc:
        with pytest.raises(WeightstreamError, match=re.escape(str(exc))):
            describe(now, previous=previous)
        return
    got = describe(now, previous=previous)
    assert (got.names, got.dtypes, got.shapes, got.nbytes) == (want.names, want.dtypes, want.shapes, want.nbytes)
    assert all(a is b for a, b in zip(got.tensors or [], want.tensors or []))


# --- a sink's state dict, unchanged or not ----------------------------------------------

def test_same_items_sees_every_kind_of_change_to_a_state_dict(copy_mode: bool) -> None:
    state = {f"p{i}": np.zeros(i + 1) for i in range(4)}
    keys, values = list(state), list(state.values())
    assert speedups.same_items(state, keys, values)
    assert speedups.same_items(state, ["".join(k) for k in keys], values)  # equal, not identical, names
    changes = {
        "replaced": lambda d: d.__setitem__("p2", np.zeros(3)),
        "added": lambda d: d.__setitem__("p9", np.zeros(1)),
        "removed": lambda d: d.pop("p1"),
        "reordered": lambda d: d.__setitem__("p0", d.pop("p0")),
    }
    for name, change in changes.items():
        changed = dict(state)
        change(changed)
        assert not speedups.same_items(changed, keys, values), name


def test_every_change_to_a_state_dict_moves_its_version_tag(copy_mode: bool) -> None:
    """NumpySink trusts its cached specs while the tag is the one it saw: any entry added,
    removed, rebound or reordered must move it. Where there is no tag, the sink walks."""
    state = {f"p{i}": np.zeros(i + 1) for i in range(4)}
    tag = speedups.dict_version(state)
    if not copy_mode or sys.version_info >= (3, 12):
        assert tag is None
        return
    assert tag is not None and speedups.dict_version(state) == tag  # reading it changes nothing
    changes = {
        "replaced": lambda d: d.__setitem__("p2", np.zeros(3)),
        "added": lambda d: d.__setitem__("p9", np.zeros(1)),
        "removed": lambda d: d.pop("p1"),
        "reordered": lambda d: d.__setitem__("p0", d.pop("p0")),
        "cleared": lambda d: d.clear(),
        "updated": lambda d: d.update({"p3": np.ones(4)}),
    }
    for name, change in changes.items():
        before = speedups.dict_version(state)
        change(state)
        assert speedups.dict_version(state) != before, name
        assert speedups.dict_version(dict(state)) != speedups.dict_version(state), "a copy is another state"
    with pytest.raises(TypeError, match="expected a dict"):
        speedups._layout.dict_version([])  # type: ignore[arg-type]


# --- torch tensors: read through their own accessors ------------------------------------

def _torch_sources() -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(3)
    return [
        torch.rand(3, 5, generator=gen),
        torch.nn.Parameter(torch.rand(7, generator=gen)),  # requires grad
        torch.rand(9, generator=gen).to(torch.bfloat16),
        torch.tensor(4, dtype=torch.int64),  # 0-d
        torch.zeros(0, 3),
        torch.rand(20, generator=gen)[5:15],  # a view at an offset into its storage
    ]


@native
def test_gather_takes_plain_cpu_torch_tensors_bit_exact() -> None:
    import torch

    sources = _torch_sources()
    offsets, nbytes, size = layout(sources, 3)
    dst = np.zeros(size, np.uint8)
    assert speedups.gather(dst, offsets, nbytes, sources, 0) == len(sources)
    for source, offset, n in zip(sources, offsets, nbytes):
        want = source.detach().reshape(-1).view(torch.uint8).numpy()
        assert dst[offset : offset + n].tobytes() == want.tobytes()


@native
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),  # not contiguous
        lambda t: t.to("meta"),  # no data
        lambda t: __import__("torch")._neg_view(t),  # lazily negated: its memory is not its values
        lambda t: t.as_subclass(type("Sub", (__import__("torch").Tensor,), {})),  # a subclass (DTensor-like)
        lambda t: t.reshape(-1)[:14],  # fewer bytes than planned
    ],
    ids=["transposed", "meta", "neg-view", "subclass", "resized"],
)
def test_gather_leaves_every_other_torch_tensor_to_the_checked_path(make: Any) -> None:
    import torch

    base = torch.rand(3, 5)
    dst = np.zeros(64, np.uint8)
    assert speedups.gather(dst, [0], [60], [make(base)], 0) == 0
    assert not dst.any()


def test_write_tensors_lands_torch_tensors_bit_exact(copy_mode: bool) -> None:
    import torch

    tensors = [*_torch_sources(), torch.rand(4, 6).t(), torch._neg_view(torch.rand(5))]
    offsets, sizes, size = layout(tensors, 8)
    slot = ShmExportedSlot(size)
    try:
        assert slot.write_tensors(offsets, tensors, sizes) is None
        for tensor, offset, n in zip(tensors, offsets, sizes):
            want = tensor.detach().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
            assert slot.host_view()[offset : offset + n].tobytes() == want.tobytes()
    finally:
        slot.close()


@pytest.mark.parametrize("change", ["unchanged", "renamed", "retyped", "reshaped", "subclass"])
def test_describe_of_torch_tensors_with_a_previous_push_equals_describe_from_scratch(change: str) -> None:
    import torch

    from weightstream.sender.manifest import describe

    items = [(f"p{i}", t) for i, t in enumerate(_torch_sources())]
    previous = describe(items)
    name, tensor = items[1]
    replacement = {
        "unchanged": (name, tensor),
        "renamed": ("other", tensor),
        "retyped": (name, tensor.detach().double()),
        "reshaped": (name, tensor.detach().reshape(7, 1)),
        "subclass": (name, tensor.detach().as_subclass(type("Sub", (torch.Tensor,), {}))),
    }[change]
    now = [items[0], replacement, *items[2:]]
    got, want = describe(now, previous=previous), describe(now)
    assert (got.names, got.dtypes, got.nbytes) == (want.names, want.dtypes, want.nbytes)
    assert [tuple(s) for s in got.shapes] == [tuple(s) for s in want.shapes]
    assert all(a is b for a, b in zip(got.tensors or [], want.tensors or []))


@native
def test_python_code_run_by_a_torch_accessor_cannot_pull_the_list_from_under_the_c_loop() -> None:
    """A TorchFunctionMode runs Python inside is_cpu/size()/data_ptr(); here it empties the
    very lists being walked. The C loops walk snapshots, so they finish, bit-exact."""
    import torch
    from torch.overrides import TorchFunctionMode

    from weightstream.sender.manifest import _codes_by_dtype, describe

    items = [(f"p{i}", torch.rand(4)) for i in range(8)]
    tensors = [t for _, t in items]
    previous = describe(list(items))
    calls = 0

    class Emptying(TorchFunctionMode):
        def __init__(self, victim: list[Any]) -> None:
            super().__init__()
            self.victim = victim

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            nonlocal calls
            calls += 1
            self.victim.clear()
            return func(*args, **(kwargs or {}))

    codes = _codes_by_dtype()
    with Emptying(items):
        same = speedups.unchanged_arrays(items, codes, previous.names, previous.dtypes, previous.shapes)
    assert calls > 0, "the mode never ran: the test proves nothing"
    calls = 0
    assert same is not None and [id(t) for t in same] == [id(t) for t in tensors]
    sources, dst = list(tensors), np.zeros(8 * 16, np.uint8)
    with Emptying(sources):
        copied = speedups.gather(dst, [16 * i for i in range(8)], [16] * 8, sources, 0)
    assert calls > 0, "the mode never ran: the test proves nothing"
    assert copied == 8
    assert dst.tobytes() == b"".join(t.numpy().tobytes() for t in tensors)
