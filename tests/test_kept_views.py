"""NumPy views of a slot's batches, handed out again to the next bucket at the same place when
nothing holds them and they are exactly what a new view would be (native.kept_views and
receiver.view_keeper); an engine that keeps or changes a view in place gets a new one."""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue as queue_mod
import sys
import warnings
import weakref

import numpy as np
import pytest
import view_workers

from weightstream import BucketSender, native
from weightstream.receiver.view_keeper import ViewKeeper

KiB = 1 << 10
needs_c = pytest.mark.skipif(not (native.NATIVE and native.LAYOUT), reason="the C module is not built")


def batch(buf: np.ndarray, count: int = 5, offset: int = 8, step: int = 48) -> np.ndarray:
    """``count`` float32 (2, 4) views ``step`` bytes apart from ``offset``, as the receiver makes them."""
    from weightstream.frameworks._api import rows

    return rows(buf, np.dtype(np.float32), (2, 4), count, offset, step)


@needs_c
def test_views_nobody_holds_are_handed_out_again_and_equal_new_ones() -> None:
    buf = np.arange(512, dtype=np.uint8)
    rows, kept = batch(buf), [None] * 5
    first = list(native.kept_views(rows, kept))
    assert all(a is b for a, b in zip(first, kept, strict=True))
    for i, view in enumerate(first):
        assert view.shape == (2, 4) and view.dtype == np.float32 and np.array_equal(view, rows[i])
        assert view.__array_interface__ == rows[i].__array_interface__ and view.flags == rows[i].flags
    ids = [id(v) for v in first]
    del first, view
    again = list(native.kept_views(batch(buf), kept))  # a new batch over the same bytes: the same views
    assert [id(v) for v in again] == ids
    buf[:] = 255 - buf[:]  # the slot's next contents show through
    assert all(np.array_equal(v, r) for v, r in zip(again, batch(buf), strict=True))


def restride(view: np.ndarray, strides: tuple[int, ...]) -> None:
    with warnings.catch_warnings():  # deprecated in NumPy 2.4, and still possible
        warnings.simplefilter("ignore", DeprecationWarning)
        view.strides = strides


@needs_c
@pytest.mark.parametrize(
    "meddle",
    [
        lambda v: setattr(v, "shape", (8,)),
        lambda v: setattr(v, "dtype", np.int32),
        lambda v: restride(v, (4, 8)),
        lambda v: v.setflags(write=False),
    ],
    ids=["reshaped", "retyped", "restrided", "read-only"],
)
def test_a_view_changed_in_place_is_replaced_by_a_new_one(meddle: object) -> None:
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    views = list(native.kept_views(batch(buf), kept))
    meddle(views[2])  # type: ignore[operator]
    # ids, not weak references (a weakly held view is never handed out again): a kept view stays
    # alive in the list, and a new one is made while the one it replaces still is
    changed, untouched = id(views[2]), id(views[3])
    del views
    again = list(native.kept_views(batch(buf), kept))
    assert id(again[2]) != changed and id(again[3]) == untouched
    assert again[2].shape == (2, 4) and again[2].dtype == np.float32
    assert again[2].flags.writeable and again[2].strides == (16, 4)
    assert kept[2] is again[2] and np.array_equal(again[2], batch(buf)[2])


@needs_c
def test_a_view_someone_still_holds_is_never_handed_out_again() -> None:
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    views = list(native.kept_views(batch(buf), kept))
    held = views[1]
    del views
    again = list(native.kept_views(batch(buf), kept))
    assert again[1] is not held and kept[1] is again[1] and np.array_equal(again[1], held)


@needs_c
@pytest.mark.parametrize("weak", ["ref", "finalize", "WeakValueDictionary"])
def test_a_view_something_refers_to_weakly_dies_when_let_go_and_is_never_handed_out_again(weak: str) -> None:
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    views = list(native.kept_views(batch(buf), kept))
    fired: list[int] = []
    cache: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()
    ref = weakref.ref(views[1]) if weak == "ref" else None
    if weak == "finalize":
        weakref.finalize(views[1], fired.append, 1)
    elif weak == "WeakValueDictionary":
        cache["t1"] = views[1]
    untouched = id(views[3])
    del views
    again = list(native.kept_views(batch(buf), kept))
    assert id(again[3]) == untouched and kept[1] is again[1]
    if weak == "ref":
        assert ref is not None and ref() is None
    elif weak == "finalize":
        assert fired == [1]
    else:
        assert "t1" not in cache


@needs_c
def test_another_place_or_another_buffer_gives_new_views() -> None:
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    ids = [id(v) for v in native.kept_views(batch(buf), kept)]
    moved = list(native.kept_views(batch(buf, offset=16), kept))  # other addresses: none fits
    assert all(id(v) != i for v, i in zip(moved, ids, strict=True))
    assert all(np.array_equal(v, r) for v, r in zip(moved, batch(buf, offset=16), strict=True))
    other = np.arange(512, dtype=np.uint8)[::-1].copy()
    fresh = list(native.kept_views(batch(other, offset=16), kept))
    assert all(np.array_equal(v, r) for v, r in zip(fresh, batch(other, offset=16), strict=True))


def test_without_the_c_module_every_view_is_new(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LAYOUT", False)
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    views = list(native.kept_views(batch(buf), kept))
    assert kept == [None] * 5 and all(np.array_equal(v, r) for v, r in zip(views, batch(buf), strict=True))


@needs_c
def test_anything_but_a_list_as_long_as_the_batch_is_iterated_plainly() -> None:
    buf = np.arange(512, dtype=np.uint8)
    short: list[object] = [None] * 4
    assert [v.tolist() for v in native.kept_views(batch(buf), short)] == [r.tolist() for r in batch(buf)]
    assert short == [None] * 4


@needs_c
def test_the_kept_list_changing_size_mid_batch_is_an_error_not_a_bad_read() -> None:
    buf = np.arange(512, dtype=np.uint8)
    kept: list[object] = [None] * 5
    views = native.kept_views(batch(buf), kept)
    next(views)
    kept.pop()
    with pytest.raises(RuntimeError, match="changed size"):
        next(views)


@needs_c
def test_the_keeper_keeps_per_slot_and_place_and_lets_a_dropped_slot_go() -> None:
    class Slot:  # stands for an ImportedSlot: only its identity matters here
        pass

    keeper, slot, other = ViewKeeper(max_views=12), Slot(), Slot()
    buf = np.arange(512, dtype=np.uint8)
    first = [id(v) for v in keeper.views(slot, batch(buf), 8, 48)]
    assert [id(v) for v in keeper.views(slot, batch(buf), 8, 48)] == first
    assert [id(v) for v in keeper.views(other, batch(buf), 8, 48)] != first  # another slot: its own views
    assert keeper.kept == 10
    list(keeper.views(slot, batch(buf, count=3, offset=16), 16, 48))
    assert keeper.kept == 13  # 8 views at two places in slot
    list(keeper.views(slot, batch(buf, count=5, offset=24), 24, 48))  # would be 13 in slot: its others go
    assert keeper.kept == 5 + 5
    list(keeper.views(slot, batch(buf, count=13, offset=0, step=24), 0, 24))  # over the bound alone: not kept
    assert keeper.kept == 5 + 5
    del other
    gc.collect()
    assert keeper.kept == 5
    keeper.clear()
    assert keeper.kept == 0 and sys.getrefcount(buf) == 2


def meddled(k: int) -> bool:
    """Whether view_workers.meddling_rank keeps, changes or weakly refers to tensor ``k``'s view."""
    return k % 7 == 3 or k % 5 == 1 or k % 11 == 2 or k % 13 == 4 or k % 17 == 6


@pytest.mark.timeout(120)
def test_a_views_rank_gets_every_byte_and_shape_though_it_keeps_and_changes_views(endpoint: str) -> None:
    """Tensors of one shape in many buckets, to a rank whose load_weights keeps some views past
    their bucket, reshapes, retypes or write-protects others in place and puts a finalizer on
    others, over five versions of new contents: every version gets every byte with the manifest's
    shape and dtype, writable; no view the rank holds is handed out again; every finalizer runs
    once the next version replaced its view; and the views it let go untouched come back: they
    stay alive in the rank's keeper, so a version's untouched views are many distinct objects,
    mostly the ones of the version before (without the C module every view is new and dies at
    once, and only the bytes are checked)."""
    rng = np.random.default_rng(5)
    versions = [f"v{k}" for k in range(1, 6)]
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    rank = ctx.Process(target=view_workers.meddling_rank, args=(endpoint, versions, events), daemon=True)
    rank.start()

    def expect(kind: str) -> object:
        try:
            got, payload = events.get(timeout=60)
        except queue_mod.Empty:
            raise AssertionError(f"no {kind!r} from the rank in 60 s (alive: {rank.is_alive()})") from None
        assert got == kind, payload
        return payload

    untouched = [f"t{k}" for k in range(400) if not meddled(k)]
    keeping = native.NATIVE and native.LAYOUT
    try:
        expect("started")
        last_ids: set[int] = set()
        finalized = 0
        with BucketSender(endpoint, receivers=1, bucket_bytes=32 * KiB, num_buffers=2, timeout=60) as sender:
            for version in versions:
                model = {f"t{k}": rng.standard_normal((8, 16)).astype(np.float32) for k in range(400)}
                sender.push(model.items(), version=version)
                seen, counts = expect(version)  # type: ignore[misc]
                assert set(seen) == set(model)
                for name, array in model.items():
                    assert seen[name][:4] == (array.tobytes(), (8, 16), "<f4", True), f"{version} {name}"
                assert counts["held_again"] == 0, (version, counts)
                finalized += counts["finalized"]
                ids = {seen[name][4] for name in untouched}
                if keeping:  # alive together in the keeper: many distinct objects (64 of 198 without it)
                    assert len(ids) >= 0.75 * len(untouched), (version, len(ids))
                    if last_ids:  # most of them the last version's (meddled tensors share places)
                        assert len(ids & last_ids) >= 0.5 * len(ids), (version, len(ids & last_ids), len(ids))
                last_ids = ids
        rank.join(30)
    finally:
        if rank.is_alive():
            rank.kill()
            rank.join()
    # each version's weakly held views die once the next version replaced them (or at once)
    weak = sum(k % 17 == 6 and not (k % 7 == 3 or k % 5 == 1 or k % 11 == 2 or k % 13 == 4) for k in range(400))
    assert finalized >= weak * (len(versions) - 1), (finalized, weak)
