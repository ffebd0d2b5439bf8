"""Fixtures shared by the end-to-end suite: a fresh ipc endpoint per test, and a leak guard
that fails any test leaving shared-memory segments or child processes behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ws_"  # weightstream.protocol.transports.shm.PREFIX
LEAK_GRACE_S = 5.0  # children and segments get this long to go away on their own


def _segments(creators: set[int]) -> set[str]:
    """Our segments: named ``ws_<creator pid>_...``; other sessions' tests may share /dev/shm."""
    try:
        names = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIX)]
    except FileNotFoundError:
        return set()
    ours = set()
    for name in names:
        pid = name[len(SHM_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and int(pid) in creators:
            ours.add(name)
    return ours


def _is_helper(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker lives for the whole session; it is not a leak."""
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return True


def _children() -> dict[int, psutil.Process]:
    kids = psutil.Process().children(recursive=True)
    return {p.pid: p for p in kids if not _is_helper(p)}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test: no new /dev/shm/ws_* segment of this process tree and no child process may remain."""
    children_before = set(_children())
    creators = {os.getpid(), *children_before}
    segments_before = _segments(creators)
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        new_children = {pid: p for pid, p in _children().items() if pid not in children_before}
        creators.update(new_children)
        new_segments = _segments(creators) - segments_before
        if not (new_segments or new_children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if new_children:
        desc = []
        for pid, proc in new_children.items():
            try:
                desc.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(new_children.values()), timeout=5)
        problems.append(f"child processes left running (killed): {desc}")
    if new_segments:
        for name in new_segments:
            try:
                os.unlink(SHM_DIR / name)
            except OSError:
                pass
        problems.append(f"shared-memory segments left behind (unlinked): {sorted(new_segments)}")
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def endpoint_dir() -> Iterator[Path]:
    """A private directory for ipc sockets; short, because unix socket paths max out at ~107 bytes."""
    base = Path(tempfile.mkdtemp(prefix="ws-test-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def endpoint(endpoint_dir: Path) -> str:
    """A unique ipc endpoint; its directory does not exist yet (the sender creates it 0700)."""
    return f"ipc://{endpoint_dir}/sock/x.sock"
