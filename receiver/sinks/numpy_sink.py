"""A sink that loads into a dict of NumPy arrays."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ... import native as speedups
from ...frameworks import Framework
from ...frameworks import numpy as numpy_fw
from ...protocol.dtypes import from_numpy
from ...protocol.errors import WeightstreamError
from .base import ParamSpecs, check_tied, spec_mismatch, unknown_name


class NumpySink:
    """Loads tensors into ``state``, a dict of NumPy arrays.

    Two modes, fixed at construction:

    - ``state`` non-empty: a fixed model. Every received name must be a key; its array
      is overwritten in place (``np.copyto``), and :meth:`param_specs` describes the
      arrays so the daemon checks manifests against them.
    - ``state`` None or empty: a collector. Received tensors are copied into ``state``
      (the given dict, or a new one), reusing an array in place when name, dtype and
      shape repeat from an earlier version; :meth:`param_specs` is ``{}`` (no check).
    """

    framework: Framework = "numpy"
    direct_copy = True  # loading a tensor = copying its bytes into destination(name)

    def __init__(self, state: dict[str, np.ndarray] | None = None) -> None:
        self.state: dict[str, np.ndarray] = {} if state is None else state
        self._fixed = bool(self.state)
        # The specs are re-derived only when the dict's keys or arrays changed (checked by identity,
        # at C speed): at 100k params, rebuilding them every version costs more than moving the bytes.
        self._specs: tuple[list[str], list[np.ndarray], ParamSpecs] | None = None
        self._specs_tag: int | None = None  # the dict's version tag when _specs was last found true
        self._dest: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # name -> (array, its byte view)

    def param_specs(self) -> ParamSpecs:
        """The arrays' specs; the same dict object as last time when nothing in ``state`` was replaced."""
        if not self._fixed:
            return {}
        cached, tag = self._specs, speedups.dict_version(self.state)
        if cached is not None and tag is not None and tag == self._specs_tag:
            return cached[2]  # not one entry added, removed or rebound since the walk below
        if cached is not None and speedups.same_items(self.state, cached[0], cached[1]):
            self._specs_tag = tag
            return cached[2]
        names, arrays = list(self.state), list(self.state.values())
        specs = {name: (from_numpy(a.dtype).name, tuple(a.shape)) for name, a in zip(names, arrays)}
        self._specs, self._specs_tag = (names, arrays, specs), tag
        return specs

    def load_one(self, name: str, tensor: np.ndarray) -> None:
        target = self.state.get(name)
        if target is None:
            if self._fixed:
                raise unknown_name(name, self.state, "the NumpySink's state dict")
            self.state[name] = np.array(tensor, copy=True, order="C")
            return
        if target.dtype != tensor.dtype or target.shape != tensor.shape:
            if not self._fixed:  # collector: the tensor changed between versions
                self.state[name] = np.array(tensor, copy=True, order="C")
                return
            want = (from_numpy(target.dtype).name, tuple(target.shape))
            raise spec_mismatch(name, want, (from_numpy(tensor.dtype).name, tuple(tensor.shape)))
        if not target.flags.writeable:
            raise WeightstreamError(
                f"tensor {name!r}: expected a writable destination array, got a read-only one; "
                "fix: give NumpySink writable arrays (e.g. arr.copy())"
            )
        np.copyto(target, tensor, casting="no")

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        written: dict[tuple[int, int], str] = {}  # memory written in this version -> the name that wrote it
        for name, tensor in weights:
            target = self.state.get(name) if self._fixed else None
            if target is not None and target.nbytes:
                first = written.setdefault(_memory_key(target), name)
                if first != name:  # tied here: one array under a second name
                    check_tied(first, name, np.array_equal(target, tensor))
                    continue
            self.load_one(name, tensor)

    def name_groups(self) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
        """(tied names -> a key per array, optional, unmaterialised) for the manifest check."""
        groups: dict[Any, list[str]] = {}
        for name, array in self.state.items() if self._fixed else ():
            groups.setdefault(_memory_key(array) if array.nbytes else id(array), []).append(name)
        tied = {name: key for key, names in groups.items() if len(names) > 1 for name in names}
        return tied, frozenset(), frozenset()

    def destination(self, name: str) -> np.ndarray | None:
        # A collector does not know the incoming dtype/shape ahead of time: no destination.
        if not self._fixed:
            return None
        target = self.state.get(name)
        if target is None:
            return None
        hit = self._dest.get(name)
        if hit is None or hit[0] is not target:
            hit = self._dest[name] = (target, numpy_fw.bytes_view(target))
        return hit[1]


def _memory_key(array: np.ndarray) -> tuple[int, int]:
    return (int(array.__array_interface__["data"][0]), array.nbytes)
