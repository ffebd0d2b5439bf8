"""NumPy views of a slot's batches, kept to be handed out again at the same place.

A bucket of many small tensors of one dtype and shape goes to ``load_weights`` as a batch of
views over its slot. Making each view costs ~0.1 us, 8-10% of an engine's own loop at 100k
tensors of 4 KiB (it copies each view out in ~1.2 us). The next version's bucket at the same
place in the same slot (an RL loop pushes one layout every step) would make the very same
views again, so the rank keeps the ones it made and hands each out again when nothing else
holds it and it is exactly what a new one would be: address, dtype, shape, strides and flags
(``weightstream.native.kept_views`` checks each as the consumer takes it). A view the engine
kept, changed in place (``view.shape = ...``) or refers to weakly (a weakref, a
``weakref.finalize``) is replaced by a new one, so that it dies as it would have without the
keeper.

Kept per slot object, weakly: a slot the session unmapped goes with its views. At most
:data:`MAX_VIEWS` views are kept per slot (~130 bytes each: ~17 MiB a slot at most, ~13 MiB
in all for 100k tensors); a place that would pass that drops the slot's others first, and a
batch larger than that alone is not kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..native import kept_views

MAX_VIEWS = 1 << 17  # views kept per slot


class ViewKeeper:
    """Per slot and place (offset, step, batch shape, dtype), the views handed out last."""

    def __init__(self, max_views: int = MAX_VIEWS) -> None:
        self.max_views = max_views
        self._slots: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], list[Any]]] = weakref.WeakKeyDictionary()

    def views(self, slot: Any, rows: np.ndarray, offset: int, step: int) -> Iterator[Any]:
        """``rows``' items (the views of a batch at ``offset`` in ``slot``, ``step`` bytes apart),
        those kept from before handed out again where they are still exactly the same."""
        places = self._slots.get(slot)
        if places is None:
            places = self._slots[slot] = {}
        place = (offset, step, rows.shape, rows.dtype)
        kept = places.get(place)
        if kept is None:
            count = len(rows)
            if count > self.max_views:
                return iter(rows)
            if count + sum(map(len, places.values())) > self.max_views:  # a layout that changed, say
                places.clear()
            kept = places[place] = [None] * count
        return kept_views(rows, kept)

    @property
    def kept(self) -> int:
        """Views kept, over every slot."""
        return sum(sum(v is not None for v in kept) for places in self._slots.values() for kept in places.values())

    def clear(self) -> None:
        self._slots.clear()
