"""What the sender knows of a version before any byte moves: its tensors as parallel arrays.

One pass over the trainer's ``(name, tensor)`` pairs records name, dtype code, shape
and byte size per tensor in plain lists (the wire's BEGIN layout), with a NumPy
fast path; names are then validated in bulk. At 100k tensors this is the sender's
per-tensor floor, so it allocates nothing per tensor (a NumPy shape is already a tuple).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter, itemgetter
from typing import Any, cast

import numpy as np

from .. import native as speedups
from ..frameworks import memory_key, module_of
from ..frameworks import numpy as numpy_fw
from ..frameworks import torch as torch_fw
from ..gc_pause import gc_paused
from ..protocol import messages as m
from ..protocol.dtypes import DTYPES, by_name
from ..protocol.errors import WeightstreamError


@dataclass
class Manifest:
    names: list[str]
    tensors: Sequence[Any] | None  # None in lazy mode: the tensors come from a generator; a tuple when unchanged
    dtypes: list[int]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]

    def __len__(self) -> int:
        return len(self.names)

    def same_layout(self, other: Manifest | None) -> bool:
        """Same names, dtypes and shapes in the same order (compared at C speed): everything
        derived from ``other`` (its bucket plan, its packed BEGIN arrays) holds for this one."""
        if other is None:
            return False
        if self.names is other.names and self.dtypes is other.dtypes and self.shapes is other.shapes:
            return True  # describe found the previous layout unchanged and shares its lists
        return self.dtypes == other.dtypes and self.shapes == other.shapes and self.names == other.names


_CODE_OF_NUMPY = numpy_fw.codes_by_dtype()
_dtype, _shape, _nbytes = attrgetter("dtype"), attrgetter("shape"), attrgetter("nbytes")
_first, _second = itemgetter(0), itemgetter(1)


def describe(named_tensors: Iterable[tuple[str, Any]], previous: Manifest | None = None) -> Manifest:
    """The manifest of ``(name, tensor)`` pairs; raises WeightstreamError on a bad pair or name.

    Names equal to ``previous``'s (the last push's, already checked) are not checked again.
    """
    if isinstance(named_tensors, Mapping):  # iterating a state_dict gives its names alone
        raise WeightstreamError(
            f"push expects (name, tensor) pairs, got a mapping ({type(named_tensors).__name__}, {len(named_tensors)} "
            "entries), whose iteration gives names only; pass its items, e.g. push(state_dict.items())"
        )
    with gc_paused():
        items = named_tensors if type(named_tensors) is list else list(named_tensors)
        if previous is not None:  # an RL loop's every push after the first: nothing to build or check
            same = speedups.unchanged_arrays(items, _codes_by_dtype(), previous.names, previous.dtypes, previous.shapes)
            if same is not None:
                return replace(previous, tensors=same)
        fast = _describe_numpy(items)
        if fast is not None:
            if previous is None or fast.names != previous.names:
                check_names(fast.names, "tensor names")
            return fast
        names: list[str] = []
        tensors: list[Any] = []
        codes: list[int] = []
        shapes: list[tuple[int, ...]] = []
        sizes: list[int] = []
        for index, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                got = f"a tuple of {len(item)}" if isinstance(item, tuple) else f"a {type(item).__name__}"
                raise WeightstreamError(
                    f"push expects (name, tensor) pairs, e.g. model.named_parameters(); item {index} is {got}"
                )
            name, tensor = item
            try:
                fw = module_of(tensor)
                dtype = fw.dtype_of(tensor)
                fw.check_sendable(tensor)  # a tensor with no data of its own: say so before anything moves
                shape = fw.shape_of(tensor)
            except WeightstreamError as exc:  # say which tensor
                text = str(exc)
                raise type(exc)(f"tensor {name!r:.200}: {text.removeprefix('tensor: ')}") from None
            names.append(name)
            tensors.append(tensor)
            codes.append(dtype.code)
            shapes.append(shape)
            sizes.append(dtype.itemsize * math.prod(shape))
    check_names(names, "tensor names")
    return Manifest(names, tensors, codes, _shared(shapes), sizes)


def _codes_by_dtype() -> dict[Any, int]:
    """Wire dtype codes keyed by NumPy dtype, and by torch dtype once torch is imported (built once)."""
    global _CODE_OF_ANY
    if _CODE_OF_ANY is None:
        if not torch_fw.imported():
            return _CODE_OF_NUMPY
        _CODE_OF_ANY = {**_CODE_OF_NUMPY, **torch_fw.codes_by_dtype()}
    return _CODE_OF_ANY


_CODE_OF_ANY: dict[Any, int] | None = None  # _CODE_OF_NUMPY plus torch's, once torch is imported


def _describe_numpy(items: list[Any]) -> Manifest | None:
    """All pairs of NumPy arrays in wire dtypes, described with C-level maps (no Python loop
    per tensor); None when anything else is in the list, for the general path to handle."""
    if not items or set(map(type, items)) != {tuple} or set(map(len, items)) != {2}:
        return None
    names, tensors = list(map(_first, items)), list(map(_second, items))  # zip(*items) is ~10x slower at 100k
    if set(map(type, tensors)) != {np.ndarray}:
        return None
    codes = list(map(_CODE_OF_NUMPY.get, map(_dtype, tensors)))
    if None in codes:
        return None
    known = cast("list[int]", codes)  # no None in it (checked above), which mypy cannot narrow
    return Manifest(names, tensors, known, _shared(list(map(_shape, tensors))), list(map(_nbytes, tensors)))


def _shared(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Equal shapes as one tuple object each. A model repeats a few shapes, and every later push
    compares each tensor's shape with these: 100k tuples and their ints spread over memory cost
    ~0.7 ms of cache misses a push at 100k tensors, a few shared ones stay in cache."""
    canonical: dict[tuple[int, ...], tuple[int, ...]] = {}
    return list(map(canonical.setdefault, shapes, shapes))


def from_specs(specs: Mapping[str, tuple[str, Sequence[int]]]) -> Manifest:
    names: list[str] = []
    codes: list[int] = []
    shapes: list[tuple[int, ...]] = []
    sizes: list[int] = []
    for name, spec in specs.items():
        try:
            dtype_name, shape = spec
            dtype = by_name(str(dtype_name))
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise WeightstreamError(
                f"specs[{name!r:.80}]: expected (dtype name, shape) like ('bfloat16', (4096, 4096)), "
                f"got {spec!r:.80} ({exc})"
            ) from None
        names.append(name)
        codes.append(dtype.code)
        shapes.append(dims)
        sizes.append(dtype.itemsize * math.prod(dims))
    check_names(names, "specs: names")
    return Manifest(names, None, codes, shapes, sizes)


def check_names(names: list[str], what: str) -> None:
    """Non-empty str of at most MAX_NAME_LEN chars, UTF-8 without NUL, unique; checked at C speed, named on failure."""
    limit = m.MAX_NAME_LEN
    if names and (
        set(map(type, names)) != {str} or max(map(len, names)) > limit or min(map(len, names)) == 0
        or not _wire_text("".join(names))
    ):
        for name in names:
            if type(name) is not str or not name or len(name) > limit or not _wire_text(name):
                raise WeightstreamError(
                    f"{what} must be non-empty str of at most {limit} chars, valid UTF-8 without NUL, "
                    f"got {name!r:.80}"
                )
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise WeightstreamError(f"tensor name {name!r} appears twice; names must be unique per version")
            seen.add(name)


def _wire_text(text: str) -> bool:
    """The wire joins names with NUL, in UTF-8: no NUL, and no lone surrogate (which UTF-8 cannot hold)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_aliases(tensors: Sequence[Any]) -> list[tuple[int, int]]:
    """(alias index, first index) for each tensor that is another one of the list again."""
    first: dict[Any, int] = {}
    found = []
    for i, tensor in enumerate(tensors):
        key = memory_key(tensor)
        if key is not None:
            at = first.setdefault(key, i)
            if at != i:
                found.append((i, at))
    return found


@dataclass(frozen=True)
class Aliased:
    """A manifest with its aliases taken out: what travels (each tensor once) and the names that
    travel as aliases, as (name, index in ``wire``)."""

    full_names: list[str]  # the manifest it was made from (identity: an unchanged layout shares it)
    pairs: list[tuple[int, int]]  # (alias index, first index) in the full manifest
    keep: list[int]  # full-manifest indices of the tensors that travel
    wire: Manifest  # without its tensors
    aliases: list[tuple[str, int]]


def take_aliases(manifest: Manifest, last: Aliased | None) -> tuple[Manifest, Aliased | None]:
    """``manifest`` with aliased tensors sent once; aliases are found again only for a new layout,
    and the last layout's are checked to still hold (a handful of pairs)."""
    tensors = manifest.tensors
    if tensors is None:  # lazy: the tensors do not exist yet
        return manifest, None
    if last is not None and last.full_names is manifest.names and all(
        memory_key(tensors[a]) == memory_key(tensors[b]) for a, b in last.pairs
    ):
        found = last
    else:
        pairs = find_aliases(tensors)
        if not pairs:
            found = Aliased(manifest.names, [], [], manifest, [])
        else:
            dropped = {a for a, _ in pairs}
            keep = [i for i in range(len(manifest)) if i not in dropped]
            position = {full: wire for wire, full in enumerate(keep)}
            wire = Manifest(
                [manifest.names[i] for i in keep], None, [manifest.dtypes[i] for i in keep],
                [manifest.shapes[i] for i in keep], [manifest.nbytes[i] for i in keep],
            )
            found = Aliased(manifest.names, pairs, keep, wire, [(manifest.names[a], position[b]) for a, b in pairs])
    if not found.pairs:
        return manifest, found
    return replace(found.wire, tensors=[tensors[i] for i in found.keep]), found


def pull(source: Iterator[tuple[str, Any]], manifest: Manifest, index: int) -> Any:
    """The next lazily made tensor; it must be the one the specs announced."""
    item = next(source, None)
    want = (manifest.names[index], manifest.dtypes[index], manifest.shapes[index])
    if item is None:
        raise WeightstreamError(f"the tensors ended before {want[0]!r}; yield every tensor named in specs=, in that order")
    got = describe([item])
    if (got.names[0], got.dtypes[0], got.shapes[0]) != want:
        raise WeightstreamError(
            f"lazy tensor: expected {want[0]!r} {DTYPES[want[1]].name}{list(want[2])} as in specs=, "
            f"got {got.names[0]!r} {DTYPES[got.dtypes[0]].name}{list(got.shapes[0])}; yield the specs' tensors in order"
        )
    return got.tensors[0] if got.tensors else None
