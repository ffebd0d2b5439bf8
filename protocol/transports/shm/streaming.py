"""When a bucket copy should bypass the cache (streaming, non-temporal stores).

A cached store first reads the line it writes (read-for-ownership), so a copy through the
cache moves three bytes of memory traffic per byte, a streaming one two. That read is
wasted when nobody reads the destination soon: a slot much larger than the last-level
cache is back in DRAM by the time a rank reads its first bytes, and a model's weights wait
for the next forward pass. A slot that fits in the cache is better written through it: the
rank, on another core, then reads it from the shared cache.

glibc makes the same choice by size, above 3/4 of the cache it detects, but it reads the
cache size from CPUID, which a VM may report as hundreds of MiB (320 MiB on our bench VM,
whose 32 MiB L3 the kernel reports correctly): its streaming path then never runs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

CACHE_FALLBACK_BYTES = 32 << 20  # where sysfs says nothing: a common server L3
ENV = "WEIGHTSTREAM_STREAMING_STORES"  # "1" always, "0" never; anything else: by size
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_cache_size(text: str) -> int | None:
    """sysfs's cache size ("32768K", "1M", "512") in bytes; None if unreadable."""
    text = text.strip().upper()
    scale = _UNITS.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in _UNITS else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


@functools.cache
def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest cache of CPU 0 as the kernel reports it (sysfs), else 32 MiB."""
    best: tuple[int, int] | None = None
    try:
        for index in Path(root).glob("index*"):
            try:
                level = int((index / "level").read_text())
                size = parse_cache_size((index / "size").read_text())
            except (OSError, ValueError):
                continue
            if size is not None and (best is None or (level, size) > best):
                best = (level, size)
    except OSError:
        pass
    return best[1] if best is not None else CACHE_FALLBACK_BYTES


def streams(slot_bytes: int, cache_bytes: int) -> bool:
    """Copies into and out of a slot of ``slot_bytes`` bypass the cache if the slot is at least
    half the cache's size. Measured on a 2 GiB model with a 32 MiB L3 and 2 buffers, streaming
    against cached GB/s: 8.3 against 6.6-7.6 at 16 MiB buckets, 9.9 against 6.9 at 64 MiB,
    7.6 against 8.3 at 8 MiB (a 16 MiB ring: the rank reads the bucket from the cache)."""
    return slot_bytes >= cache_bytes // 2


def slot_streams(slot_bytes: int) -> bool:
    """:func:`streams` for this machine, unless ``WEIGHTSTREAM_STREAMING_STORES`` is 0 or 1."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return streams(slot_bytes, last_level_cache_bytes())
