"""When a bucket copy should bypass the cache (streaming, non-temporal stores).

A cached store first reads the line it writes (read-for-ownership), so a copy through the
cache moves three bytes of memory traffic per byte, a streaming one two. That read is
wasted when nobody reads the destination soon: a slot much larger than the last-level
cache is back in DRAM by the time a rank reads its first bytes, and a model's weights wait
for the next forward pass. A slot that fits in the cache is better written through it: the
rank, on another core, then reads it from the shared cache.

glibc makes the same choice by size, above 3/4 of the cache it detects, but it reads the
cache size from CPUID, which a VM may report as hundreds of MiB; sysfs may too (300 and
480 MiB L3 on two Intel VMs, where copies slow down past 64-128 MiB). So the size these
choices use, :func:`cache_bytes`, is measured (:func:`measure_cache_bytes`, ~0.15 s once per
machine, kept in ``$XDG_CACHE_HOME/weightstream``), with sysfs only where no drop shows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_FALLBACK_BYTES = 32 << 20  # where sysfs says nothing: a common server L3
ENV = "WEIGHTSTREAM_STREAMING_STORES"  # "1" always, "0" never; anything else: by size
CACHE_ENV = "WEIGHTSTREAM_CACHE_BYTES"  # a size in bytes: use it, measure nothing
HOT_ENV = "WEIGHTSTREAM_HOT_BUCKET_BYTES"  # "0": no cap; a size in bytes: that cap (see hot_bucket_bytes)
HOT_MIN_BYTES = 16 << 20  # the smallest bucket cap that pays for its message rounds (see hot_bytes)
PROBE_LIMIT = 256 << 20  # the largest working set measured (two buffers of half of it)
PROBE_PIECE = 4 << 20  # each memcpy call: below glibc's own switch to streaming stores
PROBE_KEEP_S = 30 * 24 * 3600  # a kept measurement is redone after a month
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

log = logging.getLogger("weightstream.transport")
_refused: set[tuple[str, str]] = set()  # environment values already warned about


def parse_cache_size(text: str) -> int | None:
    """sysfs's cache size ("32768K", "1M", "512") in bytes; None if unreadable."""
    text = text.strip().upper()
    scale = _UNITS.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in _UNITS else text
    return int(digits) * scale if digits.isascii() and digits.isdigit() and int(digits) > 0 else None


def env_bytes(name: str) -> int | None:
    """The byte count in the environment variable ``name`` ("0", "16777216", "16M", "512K"); None
    when it is unset or empty, and, with one warning naming it, when it is not a byte count."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    value = 0 if text.isascii() and text.isdigit() and int(text) == 0 else parse_cache_size(text)
    if value is None and (name, text) not in _refused:
        _refused.add((name, text))
        log.warning("ignoring %s=%r: expected a byte count such as 16777216, 16M or 0; fix or unset it", name, text)
    return value


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


def hot_bytes(slot_bytes: int, cache_bytes: int) -> int:
    """The most a bucket in a slot of ``slot_bytes`` should hold so that a rank reads it from the
    cache: a quarter of the cache, two slots' buckets then fit in half of it beside what the
    rank's copies bring in; 0 (no cap) when the slot is no larger than that. Measured on an Intel
    VM measuring 64 MiB, 1 GiB to a rank whose ``load_weights`` copies NumPy views, 2 slots:
    120-131 ms in 16 MiB buckets written through the cache, 144-145 ms in 256 MiB buckets,
    149 ms in 16 MiB buckets written with streaming stores, 151 ms in 32 MiB ones; 100k x 4 KiB
    115-116 ms against 122-125 ms.

    No cap below :data:`HOT_MIN_BYTES`: each bucket costs a message round, which smaller
    buckets no longer repay (same VM, 4 MiB tensors: 152 ms in 8 MiB buckets and 194 ms in
    4 MiB ones, against 145 ms uncapped and 134 ms in 16 MiB ones)."""
    cap = cache_bytes // 4
    return cap if cap >= HOT_MIN_BYTES and slot_bytes > cap else 0


def hot_bucket_bytes(slot_bytes: int) -> int:
    """:func:`hot_bytes` for this machine, unless ``WEIGHTSTREAM_HOT_BUCKET_BYTES`` sets the cap
    (0: none), or ``WEIGHTSTREAM_STREAMING_STORES`` forces a way of copying (then: none)."""
    forced = env_bytes(HOT_ENV)
    if forced is not None:
        return forced if forced < slot_bytes else 0
    if os.environ.get(ENV, "") in ("0", "1"):
        return 0
    return hot_bytes(slot_bytes, cache_bytes())


def slot_streams(slot_bytes: int) -> bool:
    """:func:`streams` for this machine, unless ``WEIGHTSTREAM_STREAMING_STORES`` is 0 or 1."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return streams(slot_bytes, cache_bytes())


def copy_rates(limit: int = PROBE_LIMIT, piece: int = PROBE_PIECE) -> dict[int, float]:
    """Bytes a second one core copies, per working set (source + destination) from 4 MiB to
    ``limit``, doubling: the best of three passes, each at least 32 MiB, in ``piece``-sized
    ``memcpy`` calls (so glibc's own streaming path never runs)."""
    half = limit // 2
    src, dst = np.ones(half, np.uint8), np.ones(half, np.uint8)  # faulted in before any timing
    rates: dict[int, float] = {}
    working = 4 << 20
    while working <= limit:
        size = working // 2
        laps, best = max(1, (32 << 20) // size), math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(laps):
                for at in range(0, size, piece):
                    end = min(at + piece, size)
                    np.copyto(dst[at:end], src[at:end])
            best = min(best, (time.perf_counter() - t0) / laps)
        rates[working] = size / best
        working *= 2
    return rates


def cache_from_rates(rates: dict[int, float], reported: int) -> int:
    """The largest working set copied at >= 90% of the best rate, if the rate then drops below
    80% of it (a cache's edge); else ``reported`` (no edge within what was measured: the cache
    is at least that large, or nothing here behaves like one)."""
    if not rates:
        return reported
    best, last = max(rates.values()), rates[max(rates)]
    if last > 0.8 * best:
        return max(reported, max(rates))
    return max(w for w, r in rates.items() if r >= 0.9 * best)


def _probe_file(name: str = "cache-probe") -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "weightstream" / f"{name}.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine_key() -> str:
    return f"{cpu_model()}|{os.cpu_count()}|{last_level_cache_bytes()}|{platform.release()}"


def measure_cache_bytes() -> int:
    """The cache these choices should assume, from :func:`copy_rates` on this machine."""
    return cache_from_rates(copy_rates(), last_level_cache_bytes())


def kept(name: str, field: str, measure: Callable[[], int], valid: Callable[[int], bool] = lambda v: v > 0) -> int:
    """``measure()``, kept per machine (CPU model, cores, reported cache, kernel) for a month in
    ``$XDG_CACHE_HOME/weightstream/<name>.json``; measured again when not kept, not ``valid``
    (a damaged or hand-edited file) or not keepable."""
    path, key = _probe_file(name), _machine_key()
    try:
        found = json.loads(path.read_text())
        if found.get("key") == key and time.time() - float(found["at"]) < PROBE_KEEP_S and valid(int(found[field])):
            return int(found[field])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        pass
    measured = measure()
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            temp = f.name
            json.dump({"key": key, "at": time.time(), field: measured}, f)
        os.replace(temp, path)  # whole or not at all, for processes measuring at once
    except OSError:  # not keepable (read-only home, a directory in the way): measured again next time
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    return measured


@functools.cache
def cache_bytes() -> int:
    """``WEIGHTSTREAM_CACHE_BYTES`` if set; else this machine's measured cache (:func:`kept`)."""
    forced = env_bytes(CACHE_ENV)
    if forced:
        return forced
    return kept("cache-probe", "cache_bytes", measure_cache_bytes)
