"""A version's manifest on a receiver, in the forms its run needs, derived once.

An RL loop pushes the same manifest every step. Everything derived from it here
(sizes as Python ints, shapes as tuples, where each tensor lands in the model) is
kept by the daemon and reused while the next BEGIN carries byte-identical arrays,
so a 100k-tensor model pays its per-tensor Python work once, not every version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..protocol import messages as m
from ..protocol import speedups

_SMALL_COPY = 64 << 10  # below this a memoryview copy beats np.copyto's per-call cost


class RunManifest:
    def __init__(self, begin: m.Begin) -> None:
        arrays = m.manifest_arrays(begin)
        self.names = begin.names
        self.codes = begin.dtypes  # bytes: indexing gives the dtype code
        self.sizes = arrays.sizes  # int64 array, for vectorised bucket checks
        self.fulls: list[int] = arrays.sizes.tolist()  # the same as ints, for per-tensor loops
        self._shapes: list[tuple[int, ...]] | None = None
        self._begin = begin
        # direct mode: per tensor, where its bytes go (see ``targets``); built on first use
        self._targets: list[Any] | None = None
        self._targets_of: Any = None
        self.addresses: np.ndarray | None = None  # per tensor, where the C copy writes (with ``targets``)

    def __len__(self) -> int:
        return len(self.names)

    def same_as(self, begin: m.Begin) -> bool:
        """Does ``begin`` carry exactly this manifest? Compared at C speed."""
        return m.same_manifest(begin, self._begin)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = self._begin.shapes()
        return self._shapes

    def targets(self, destination: Callable[[str], Any], owner: Any) -> list[Any]:
        """Per tensor: a writable memoryview (small tensors), a uint8 array (big ones) or None
        (no destination of the tensor's size: load_weights gets a view instead).

        Kept while ``owner`` (the sink's specs object, which a direct-copy sink keeps only
        while its arrays are unchanged) is the same object.
        """
        if self._targets is None or self._targets_of is not owner:
            targets: list[Any] = []
            for name, full in zip(self.names, self.fulls):
                dest = destination(name)
                if dest is None or dest.nbytes != full:
                    targets.append(None)
                elif full <= _SMALL_COPY:
                    targets.append(memoryview(np.asarray(dest)).cast("B"))
                else:
                    targets.append(dest)
            self._targets, self._targets_of = targets, owner
            # the C copy's view of the same targets: their addresses, 0 where it cannot write
            built = speedups.destinations(targets, self.fulls)
            self.addresses = None if built is None else np.frombuffer(built, np.uint64)
        return self._targets
