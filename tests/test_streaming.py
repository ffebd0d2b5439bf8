"""When bucket copies bypass the cache: the size rule, the machine's cache size as sysfs
reports it and as copies measure it, and the environment overrides."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
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


@pytest.mark.parametrize(
    ("slot", "cache", "want"),
    [(256 << 20, 64 << 20, 16 << 20), (256 << 20, 128 << 20, 32 << 20), (16 << 20, 64 << 20, 0),
     (17 << 20, 64 << 20, 16 << 20), (256 << 20, 32 << 20, 0)],
    ids=["64M-cache", "128M-cache", "slot-within-cap", "slot-above-cap", "cap-below-minimum"],
)
def test_buckets_are_capped_at_a_quarter_of_the_cache_in_larger_slots(slot: int, cache: int, want: int) -> None:
    """A quarter of the cache, where that is at least HOT_MIN_BYTES (16 MiB) and less than the slot."""
    assert streaming.hot_bytes(slot, cache) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("0", 0), ("16777216", 16 << 20), ("16M", 16 << 20), (" 64k ", 64 << 10), ("1G", 1 << 30), ("", None),
     ("abc", None), ("-5", None), ("1e6", None), ("\u00b2", None), ("16MiB", None)],
)
def test_byte_counts_from_the_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                          text: str, want: int | None) -> None:
    """A byte count, with K/M/G; anything else is ignored with one warning naming the variable (a
    superscript digit passes str.isdigit but not int())."""
    monkeypatch.setenv("WEIGHTSTREAM_TEST_BYTES", text)
    streaming._refused.clear()
    with caplog.at_level("WARNING", logger="weightstream.transport"):
        assert streaming.env_bytes("WEIGHTSTREAM_TEST_BYTES") == want
        assert streaming.env_bytes("WEIGHTSTREAM_TEST_BYTES") == want
    warned = [r for r in caplog.records if "WEIGHTSTREAM_TEST_BYTES" in r.getMessage()]
    assert len(warned) == (1 if want is None and text.strip() else 0), warned


def test_a_bad_environment_value_neither_fails_a_slot_nor_leaks_its_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from weightstream.protocol.transports.shm import ShmExportedSlot

    for name in (streaming.HOT_ENV, streaming.CACHE_ENV, "WEIGHTSTREAM_RING_BYTES"):
        monkeypatch.setenv(name, "\u00b2")
    streaming.cache_bytes.cache_clear()
    try:
        slot = ShmExportedSlot(1 << 20)
        try:
            assert os.path.exists(f"/dev/shm/{slot.name}")
        finally:
            slot.close()
    finally:
        streaming.cache_bytes.cache_clear()


@pytest.mark.parametrize(
    ("env", "value", "want"),
    [
        (streaming.HOT_ENV, "0", 0),  # off
        (streaming.HOT_ENV, str(4 << 20), 4 << 20),  # that cap
        (streaming.HOT_ENV, "4M", 4 << 20),
        (streaming.HOT_ENV, str(512 << 20), 0),  # no smaller than the slot: no cap
        (streaming.ENV, "1", 0),  # a forced way of copying: no cap either
        (streaming.ENV, "0", 0),
        (streaming.CACHE_ENV, str(64 << 20), 16 << 20),  # by the cache
    ],
)
def test_the_environment_sets_or_removes_the_bucket_cap(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, want: int
) -> None:
    for name in (streaming.HOT_ENV, streaming.ENV, streaming.CACHE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env, value)
    streaming.cache_bytes.cache_clear()
    try:
        assert streaming.hot_bucket_bytes(256 << 20) == want
    finally:
        streaming.cache_bytes.cache_clear()


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


# --- buckets a rank reads from the cache ------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hot", [str(1 << 20), "0"], ids=["capped", "off"])
def test_plain_buckets_are_capped_and_written_through_the_cache_in_slots_larger_than_the_cap(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, hot: str
) -> None:
    """With a (forced) 4 MiB cache 4 MiB slots stream; with a (forced) 1 MiB cap they take buckets
    of at most 1 MiB, each written through the cache; with the cap off
    (``WEIGHTSTREAM_HOT_BUCKET_BYTES=0``) buckets fill the slot, written with streaming stores.
    Views ranks get every byte either way."""
    import xxhash

    from weightstream import BucketSender, ReceiverDaemon
    from weightstream.sender.bucket_sender import usable_cores

    if usable_cores() < 2:
        pytest.skip("the cap needs the sender and the rank on a core each")
    monkeypatch.setenv(streaming.CACHE_ENV, str(4 * MiB))
    monkeypatch.setenv(streaming.HOT_ENV, hot)
    monkeypatch.delenv(streaming.ENV, raising=False)
    streaming.cache_bytes.cache_clear()
    rng = np.random.default_rng(7)
    model = {f"w{i}": rng.standard_normal(64 << 10, dtype=np.float32) for i in range(24)}  # 24 x 256 KiB
    state = {name: np.zeros_like(t) for name, t in model.items()}

    def load_weights(items: Any) -> None:  # an engine's: copies each view
        for name, view in items:
            np.copyto(state[name], view)

    daemon = ReceiverDaemon(endpoint, load_weights, rank=0, expected={k: ("float32", t.shape) for k, t in model.items()})
    daemon.start()
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=4 * MiB, timeout=30.0) as sender:
            for version in ("v1", "v2"):
                report = sender.push(model.items(), version=version)
                daemon.wait_for_version(version, timeout=30)
                for name, t in model.items():
                    assert xxhash.xxh3_64_digest(state[name]) == xxhash.xxh3_64_digest(t), name
                model = {name: t + 1 for name, t in model.items()}
            plan = sender._last_layout.plan  # type: ignore[union-attr]
            slots = sender._lanes.single().exported.slots  # type: ignore[union-attr]
            if hot != "0":
                assert all(slot.hot_bytes == MiB for slot in slots)
                assert max(b.used for b in plan) <= MiB and report.buckets >= 6
                assert not any(slot.streams for slot in slots), "a capped bucket is written through the cache"
            else:
                assert all(slot.hot_bytes == 0 for slot in slots)
                assert max(b.used for b in plan) > MiB and report.buckets < 6
                assert all(slot.streams for slot in slots)
    finally:
        daemon.stop()
        streaming.cache_bytes.cache_clear()


@pytest.mark.timeout(30)
def test_no_cap_while_the_sender_and_its_ranks_outnumber_the_cores(
    endpoint_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks read a bucket from the cache only if they run while it is written: with more
    processes (sender + ranks) than usable cores the buckets fill their slots."""
    from weightstream import BucketSender
    from weightstream.sender.bucket_sender import usable_cores

    monkeypatch.setenv(streaming.HOT_ENV, str(1 << 20))
    cores = usable_cores()
    for receivers, want in ((cores - 1, 1 << 20), (cores, 0)):
        if receivers < 1:
            continue
        with BucketSender(f"ipc://{endpoint_dir}/r{receivers}.sock", receivers=receivers, bucket_bytes=4 * MiB) as sender:
            assert sender._hot_bytes() == want, receivers
