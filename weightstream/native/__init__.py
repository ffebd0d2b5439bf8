"""The per-tensor loops of a push, in C when the accelerator is built: the C modules ``_spans``
(gather, scatter, copy, destinations) and ``_layout`` (unchanged_arrays, same_items,
dict_version) beside this file. The third, ``_ring``, is used by the shm ring alone
(``weightstream.protocol.transports.shm.ring``).

``gather``/``scatter`` copy many tensors into or out of one flat slot, from index ``start``
on, and return the index of the first item they could not copy exactly (``len(items)``
when all were). ``scatter`` writes to addresses that ``destinations`` read once from a
rank's targets, 0 where it may not write. The caller's Python loop owns every check and
error: it takes that item by its checked path and calls again from the next one.
``unchanged_arrays`` answers whether a push has exactly the last push's layout, or None
when it cannot tell; ``same_items`` whether a dict still holds the same keys and objects,
and ``dict_version`` a tag that says so without a walk. ``kept_views`` hands out a batch's
views again when ``load_weights`` let them go untouched.
``stream=True`` makes the copies bypass the cache (see :mod:`.streaming`); ``copy`` is one
such copy of a whole buffer, NumPy's where there is no C module.

Without the C modules (no compiler at install time; ``BUILT`` says both imported) or with
``WEIGHTSTREAM_PURE_PYTHON=1`` (``=spans`` or ``=layout``: only that module's paths), ``gather``/``scatter`` return ``start`` at once,
``destinations``, ``unchanged_arrays`` and ``dict_version`` return None, ``same_items``
compares in Python, ``kept_views`` makes every view anew, and the Python code does everything: the same bytes, about 0.5 us more
per small tensor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from operator import is_
from typing import Any

import numpy as np

try:
    from . import _layout, _spans
except ImportError:  # built without a C compiler: the pure-Python loops do the work
    _layout = _spans = None  # type: ignore[assignment]
else:
    _spans.use_numpy(np.ndarray)

BUILT = _spans is not None and _layout is not None
MODULES = ("spans", "layout")
NATIVE = SPANS = LAYOUT = BUILT


def configure() -> None:
    """Read ``WEIGHTSTREAM_PURE_PYTHON``: "1" turns every C path off (``NATIVE`` False), a comma
    list of ``spans``/``layout`` only those modules' paths (what a bench row measures each
    without); unset or "0" none."""
    global NATIVE, SPANS, LAYOUT
    value = os.environ.get("WEIGHTSTREAM_PURE_PYTHON", "")
    named = set(value.split(","))
    off = set() if value in ("", "0") else named & set(MODULES) if named <= set(MODULES) else set(MODULES)
    NATIVE = BUILT and off != set(MODULES)
    SPANS, LAYOUT = "spans" not in off, "layout" not in off


configure()


def gather(
    dst: Any, offsets: Sequence[int], nbytes: Sequence[int], sources: Sequence[Any], start: int, stream: bool = False,
    stop: int | None = None, shift: int = 0,
) -> int:
    """``sources[i]`` (whole, C-contiguous, exactly ``nbytes[i]`` bytes) into ``dst`` at ``offsets[i] - shift``,
    for i in [start, stop).

    Buffers (NumPy arrays) and plain CPU torch tensors and Parameters; never a subclass, whose
    ``data_ptr`` may not be the whole tensor's bytes (a DTensor's is its local shard). Lists are
    copied into tuples per call, tuples are not: a caller that copies a long sequence part by part
    passes tuples and ``stop`` rather than slices."""
    if not (NATIVE and SPANS):
        return start
    if stop is None and not shift:
        return _spans.gather(dst, offsets, nbytes, sources, start, _tensor_types(), stream)
    stop = len(sources) if stop is None else stop
    return _spans.gather(dst, offsets, nbytes, sources, start, _tensor_types(), stream, stop, shift)


def destinations(targets: Sequence[Any], nbytes: Sequence[int]) -> bytes | None:
    """Per target, the native uint64 address of its writable C-contiguous buffer of exactly
    ``nbytes[i]`` bytes, else 0; None without the C module."""
    return _spans.destinations(targets, nbytes) if NATIVE and SPANS else None


def scatter(src: Any, offsets: np.ndarray, nbytes: np.ndarray, addresses: np.ndarray, start: int,
            stream: bool = False) -> int:
    """``src[offsets[i]:offsets[i] + nbytes[i]]`` to ``addresses[i]`` from ``start`` on, until an
    address is 0; that index. Arrays of 8-byte ints; the addresses from :func:`destinations`, over
    targets the caller keeps alive for as long as it uses them."""
    return _spans.scatter(src, offsets, nbytes, addresses, start, stream) if NATIVE and SPANS else start


def copy(dst: np.ndarray, src: np.ndarray, stream: bool = False) -> None:
    """``dst[:] = src`` for two C-contiguous uint8 arrays of one size; GIL released for big ones."""
    if NATIVE and SPANS and dst.flags.c_contiguous and dst.flags.writeable and src.flags.c_contiguous:
        _spans.copy(dst, src, stream)
    else:
        np.copyto(dst, src)


def unchanged_arrays(
    items: list[Any], code_of: dict[Any, int], names: list[str], codes: list[int], shapes: list[tuple[int, ...]]
) -> tuple[Any, ...] | None:
    """The tensors of ``items`` if every pair is a NumPy array (or a plain CPU-or-not torch
    tensor/Parameter) with exactly ``names[i]``, dtype code ``codes[i]`` (through ``code_of``,
    keyed by NumPy and torch dtypes) and ``shapes[i]``; None if any differs or there is no C module."""
    if not (NATIVE and LAYOUT) or not all(type(x) is list for x in (items, names, codes, shapes)):
        return None
    return _layout.unchanged_arrays(items, np.ndarray, code_of, names, codes, shapes, _tensor_types())


def _tensor_types() -> tuple[type, ...]:
    torch = sys.modules.get("torch")  # a torch tensor can only exist if torch is imported
    return (torch.Tensor, torch.nn.Parameter) if torch is not None else ()


def same_items(mapping: dict[Any, Any], keys: list[Any], values: list[Any]) -> bool:
    """Does ``mapping`` hold exactly ``keys`` (equal) bound to the very objects in ``values``, in order?"""
    if NATIVE and LAYOUT and type(mapping) is dict and type(keys) is list and type(values) is list:
        return _layout.same_items(mapping, keys, values)
    return (
        len(mapping) == len(keys) == len(values)
        and list(mapping) == keys  # keys are str: == never calls into an array
        and all(map(is_, values, mapping.values()))
    )


def dict_version(mapping: dict[Any, Any]) -> int | None:
    """The dict's PEP 509 version tag: unchanged exactly while no entry was added, removed or
    bound to another object. None without the C module or on Python 3.12 and later."""
    if NATIVE and LAYOUT and type(mapping) is dict:
        return _layout.dict_version(mapping)
    return None


def kept_views(rows: np.ndarray, kept: list[Any]) -> Iterator[Any]:
    """The items of ``rows`` (``rows[0]``, ``rows[1]``, ...: a batch of views), each the view
    ``kept[i]`` holds from before when it is exactly ``rows[i]`` (address, dtype, shape, strides,
    flags) and nothing but ``kept`` holds it, not even weakly, else ``rows[i]`` made anew and kept
    in its place.
    Without the C module, or for anything but an exact ndarray and a list as long: ``iter(rows)``,
    every view new and nothing kept."""
    if NATIVE and LAYOUT and type(rows) is np.ndarray and rows.ndim and type(kept) is list and len(kept) == len(rows):
        views = _layout.kept_views(rows, kept)
        if views is not None:
            return views
    return iter(rows)
