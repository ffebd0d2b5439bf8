"""A version's manifest on a receiver, in the forms its run needs, derived once.

An RL loop pushes the same manifest every step. Everything derived from it here
(sizes as Python ints, shapes as tuples, where each tensor lands in the model) is
kept by the daemon and reused while the next BEGIN carries byte-identical arrays,
so a 100k-tensor model pays its per-tensor Python work once, not every version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .. import native as speedups
from ..protocol import messages as m

_PACKED_KEPT = 256  # packed buckets' derived arrays kept per layout (a layout has a few buckets)
_SMALL_COPY = 64 << 10  # below this a memoryview copy beats np.copyto's per-call cost


class Targets(NamedTuple):
    """Where each tensor of a layout lands in the model, in the two forms a copy needs."""

    # per tensor: a writable memoryview (small tensors), a uint8 array (big ones) or None (no
    # destination of the tensor's size: load_weights gets a view instead)
    objects: list[Any]
    # the same as native uint64 addresses for the C copy, 0 where it may not write; valid while
    # ``objects`` holds the buffers (so always kept together); None without the C module
    addresses: np.ndarray | None


class RunManifest:
    def __init__(self, begin: m.Begin, arrays: m.ManifestArrays | None = None) -> None:
        """``arrays``: the BEGIN's, when its decode derived them already (``Codec.manifest_arrays``)."""
        arrays = m.manifest_arrays(begin) if arrays is None else arrays
        self.names = begin.names
        self.codes = begin.dtypes  # bytes: indexing gives the dtype code
        self.sizes = arrays.sizes  # int64 array, for vectorised bucket checks
        self.fulls: list[int] = arrays.sizes.tolist()  # the same as ints, for per-tensor loops
        self.total = sum(self.fulls)
        self._shapes: list[tuple[int, ...]] | None = None
        self._kinds: np.ndarray | None = None
        self._begin = begin
        # direct mode: per tensor, where its bytes go (see ``targets``); built on first use
        self._targets: Targets | None = None
        self._targets_of: Any = None
        self._packed: dict[tuple[int, int | None, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # tied weights the sender sent once: alias name -> manifest index, and per index its aliases
        self.alias_names: list[str] = list(begin.alias_names or [])
        self.alias_of: list[int] = np.frombuffer(begin.alias_of, "<u8").tolist() if begin.alias_of else []
        self.aliases_of: dict[int, list[str]] = {}
        for alias, index in zip(self.alias_names, self.alias_of):
            self.aliases_of.setdefault(index, []).append(alias)
        # tied weights on this rank that the sender sent apart: index -> the first index with the
        # same destination (direct mode; set by ``targets``). They are compared, not written twice.
        self.tie_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.names)

    def same_as(self, begin: m.Begin) -> bool:
        """Does ``begin`` carry exactly this manifest? Compared at C speed."""
        old = self._begin
        return m.same_manifest(begin, old) and begin.alias_names == old.alias_names and begin.alias_of == old.alias_of

    def checked_lists(self) -> tuple[list[str], bytes, list[tuple[int, ...]]]:
        """Names, dtype codes and shapes the manifest check sees: each alias as its tensor."""
        if not self.alias_names:
            return self.names, self.codes, self.shapes
        shapes = self.shapes
        return (
            self.names + self.alias_names,
            self.codes + bytes(self.codes[i] for i in self.alias_of),
            shapes + [shapes[i] for i in self.alias_of],
        )

    def packed_entries(self, msg: m.Bucket, alignment: int, slot_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A packed BUCKET's (offsets, nbytes, chunks), derived once per bucket of the layout:
        every version of an RL loop sends the same buckets."""
        key = (msg.first, msg.count, alignment, slot_size)
        found = self._packed.get(key)
        if found is None:
            if len(self._packed) >= _PACKED_KEPT:
                self._packed.clear()
            found = m.packed_entries(msg, self.sizes, alignment, slot_size)
            for array in found:
                array.flags.writeable = False  # shared by every version's run
            self._packed[key] = found
        return found

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = self._begin.shapes()
        return self._shapes

    @property
    def kinds(self) -> np.ndarray:
        """Per tensor, an id shared by every tensor of its dtype and shape (int32), or -1 for a
        0-d or empty one: consecutive tensors of one kind are viewed in one batch."""
        if self._kinds is None:
            ids: dict[tuple[int, tuple[int, ...]], int] = {}
            codes, kinds = self.codes, np.empty(len(self.names), np.int32)
            for i, (shape, full) in enumerate(zip(self.shapes, self.fulls)):
                kinds[i] = ids.setdefault((codes[i], shape), len(ids)) if shape and full else -1
            kinds.flags.writeable = False
            self._kinds = kinds
        return self._kinds

    def targets(self, destination: Callable[[str], Any], owner: Any) -> Targets:
        """Where each tensor lands: looked up through ``destination`` once, and kept while
        ``owner`` (the sink's specs object, which a direct-copy sink keeps only while its
        arrays are unchanged) is the same object."""
        if self._targets is None or self._targets_of is not owner:
            targets: list[Any] = []
            first_at: dict[int, int] = {}  # address -> the first tensor written there
            self.tie_of = {}
            for index, (name, full) in enumerate(zip(self.names, self.fulls)):
                dest = destination(name)
                if dest is None or dest.nbytes != full:
                    targets.append(None)
                    continue
                if full:
                    at = first_at.setdefault(address_of(dest), index)
                    if at != index:  # tied in this model, sent apart: compared with the first, not written
                        self.tie_of[index] = at
                        targets.append(None)
                        continue
                if full <= _SMALL_COPY:
                    # NumPy's stubs type ndarray.__buffer__ on 3.12+ only (mypy checks as 3.10)
                    targets.append(memoryview(np.asarray(dest)).cast("B"))  # type: ignore[arg-type]
                else:
                    targets.append(dest)
            addresses = speedups.destinations(targets, self.fulls)
            self._targets = Targets(targets, None if addresses is None else np.frombuffer(addresses, np.uint64))
            self._targets_of = owner
        return self._targets


def address_of(array: Any) -> int:
    """Where a NumPy array's bytes start."""
    return int(np.asarray(array).__array_interface__["data"][0])
