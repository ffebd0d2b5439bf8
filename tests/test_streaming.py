"""When bucket copies bypass the cache: the size rule, the machine's cache size as sysfs
reports it, and the environment override."""

from __future__ import annotations

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
