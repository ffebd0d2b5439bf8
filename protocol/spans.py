"""Many small copies between one flat slot and many tensors, in C when the accelerator is built.

``gather``/``scatter`` copy from index ``start`` on and return the index of the first item
they could not copy exactly (``len(items)`` when all were). The caller's Python loop owns
every check and error: it takes that item by its checked path and calls again from the
next one. Without the C module (no compiler at install time) or with
``WEIGHTSTREAM_PURE_PYTHON=1``, both return ``start`` at once and the Python loop does
everything: the same bytes, about 0.5 us more per small tensor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

try:
    from .._spans import gather as _gather
    from .._spans import scatter as _scatter
except ImportError:  # built without a C compiler: the pure-Python loops do the work
    _gather = _scatter = None

BUILT = _gather is not None
NATIVE = BUILT and os.environ.get("WEIGHTSTREAM_PURE_PYTHON", "") in ("", "0")


def gather(dst: Any, offsets: Sequence[int], nbytes: Sequence[int], sources: Sequence[Any], start: int) -> int:
    """``sources[i]`` (whole, C-contiguous, exactly ``nbytes[i]`` bytes) into ``dst`` at ``offsets[i]``."""
    return _gather(dst, offsets, nbytes, sources, start) if NATIVE else start  # type: ignore[misc]


def scatter(src: Any, offsets: Sequence[int], nbytes: Sequence[int], targets: Sequence[Any], start: int) -> int:
    """``src[offsets[i]:offsets[i] + nbytes[i]]`` into each writable ``targets[i]`` of exactly that size."""
    return _scatter(src, offsets, nbytes, targets, start) if NATIVE else start  # type: ignore[misc]
