"""When bucket copies bypass the cache: the size rule, the machine's cache size as sysfs
reports it and as copies measure it, and the environment overrides."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from weightstream.protocol.transports.shm import streaming

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "want"),
    [("32768K\n", 32 << 20), ("1M", 1 << 20), ("2G", 2 << 30), ("512", 512), ("", None), ("0K", None), ("lots", None)],
)
def test_parse_cache_size(text: str, want: int | None) -> None:
    assert streaming.parse_cache_size(text) == want


def _cache(root: Path, index: int, level: str, size: str) -> None:
    folder = root / f"index{index}"
    folder.mkdir(parents=True)
    (folder / "level").write_text(level)
    (folder / "size").write_text(size)


def test_the_last_level_cache_is_the_highest_level_sysfs_lists(tmp_path: Path) -> None:
    _cache(tmp_path, 0, "1\n", "32K\n")
    _cache(tmp_path, 1, "2\n", "1024K\n")
    _cache(tmp_path, 2, "3\n", "32768K\n")
    _cache(tmp_path, 3, "x\n", "999M\n")  # unreadable level: ignored
    assert streaming.last_level_cache_bytes(str(tmp_path)) == 32 << 20


def test_without_sysfs_the_cache_is_taken_as_32_mib(tmp_path: Path) -> None:
    assert streaming.last_level_cache_bytes(str(tmp_path / "absent")) == streaming.CACHE_FALLBACK_BYTES


def test_this_machine_reports_a_plausible_cache() -> None:
    assert 256 << 10 <= streaming.last_level_cache_bytes() <= 4 << 30


@pytest.mark.parametrize(("slot", "cache", "want"), [(256 << 20, 32 << 20, True), (16 << 20, 32 << 20, True),
                                                     (8 << 20, 32 << 20, False), (4096, 32 << 20, False)])
def test_slots_of_half_the_cache_or_more_stream(slot: int, cache: int, want: bool) -> None:
    assert streaming.streams(slot, cache) is want


@pytest.mark.parametrize(("value", "small", "large"), [("1", True, True), ("0", False, False), ("", False, True),
                                                       ("auto", False, True)])
def test_the_environment_forces_either_way(monkeypatch: pytest.MonkeyPatch, value: str, small: bool, large: bool) -> None:
    monkeypatch.setenv(streaming.ENV, value)
    big = 4 * streaming.last_level_cache_bytes()
    assert (streaming.slot_streams(4096), streaming.slot_streams(big)) == (small, large)


# --- the cache size, measured ----------------------------------------------------------------

MiB = 1 << 20


@pytest.mark.parametrize(
    ("rates", "reported", "want"),
    [
        # an edge between 64 and 128 MiB: the largest working set still at in-cache speed
        ({4 * MiB: 16.0, 8 * MiB: 16.2, 32 * MiB: 16.1, 64 * MiB: 15.2, 128 * MiB: 11.6, 256 * MiB: 10.0}, 300 * MiB, 64 * MiB),
        # an L2 much faster than the rest counts as the cache only if the rate falls after it
        ({4 * MiB: 45.0, 8 * MiB: 17.0, 256 * MiB: 10.0}, 32 * MiB, 4 * MiB),
        # no edge up to the largest measured: at least that, or what the machine reports if more
        ({4 * MiB: 16.0, 256 * MiB: 15.0}, 300 * MiB, 300 * MiB),
        ({4 * MiB: 16.0, 256 * MiB: 15.0}, 32 * MiB, 256 * MiB),
        ({}, 32 * MiB, 32 * MiB),
    ],
)
def test_cache_from_rates_takes_the_last_working_set_before_the_drop(rates: dict[int, float], reported: int, want: int) -> None:
    assert streaming.cache_from_rates(rates, reported) == want


def test_copy_rates_measures_doubling_working_sets() -> None:
    rates = streaming.copy_rates(limit=16 * MiB, piece=1 * MiB)
    assert list(rates) == [4 * MiB, 8 * MiB, 16 * MiB] and all(r > 0 for r in rates.values())


def test_cache_bytes_is_forced_kept_or_measured_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(streaming.CACHE_ENV, raising=False)
    kept = tmp_path / "weightstream" / "cache-probe.json"
    try:
        monkeypatch.setenv(streaming.CACHE_ENV, str(24 * MiB))  # forced: nothing measured or kept
        streaming.cache_bytes.cache_clear()
        assert streaming.cache_bytes() == 24 * MiB and not kept.exists()
        monkeypatch.delenv(streaming.CACHE_ENV)
        kept.parent.mkdir(parents=True)
        kept.write_text(json.dumps({"key": streaming._machine_key(), "at": time.time(), "cache_bytes": 40 * MiB}))
        streaming.cache_bytes.cache_clear()
        assert streaming.cache_bytes() == 40 * MiB  # this machine's measurement, kept
        for stale in ({"key": "another machine", "at": time.time()}, {"key": streaming._machine_key(), "at": 0.0}):
            kept.write_text(json.dumps({**stale, "cache_bytes": 40 * MiB}))
            monkeypatch.setattr(streaming, "measure_cache_bytes", lambda: 48 * MiB)  # the probe itself is timed above
            streaming.cache_bytes.cache_clear()
            assert streaming.cache_bytes() == 48 * MiB
            assert json.loads(kept.read_text())["cache_bytes"] == 48 * MiB  # kept for the next process
        kept.write_text("not json")
        streaming.cache_bytes.cache_clear()
        assert streaming.cache_bytes() == 48 * MiB
    finally:
        streaming.cache_bytes.cache_clear()
