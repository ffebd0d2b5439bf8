"""``weightstream demo``: stream a synthetic model to receiver processes and verify every byte.

The sender runs here; each receiver is a spawned process running a ReceiverDaemon
into a NumpySink of preallocated arrays. After each version every receiver sends
back an xxh3_64 digest per tensor (msgpack over a multiprocessing pipe: the demo's
control channel, not the product wire), and the sender compares them with its own.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from . import synthetic
from .protocol.errors import ConfigError
from .protocol.messages import MAX_SLOTS

REPLY_TIMEOUT = 300.0
GiB = 1 << 30
MiB = 1 << 20
FRAMEWORKS = ("numpy", "torch", "paddle")
MAX_SIZE_GIB = 1 << 20  # 1 PiB
MAX_RECEIVERS = 64  # receiver processes on this one host
MAX_VERSIONS = 10_000
MAX_BUCKET_MIB = 1 << 20  # 1 TiB; /dev/shm refuses far less
MAX_SEED = 2**64 - 1  # SFC64's seed: a whole number >= 0
PROCESS_BYTES = 128 << 20  # roughly what a Python process with NumPy, ZeroMQ and weightstream holds

Progress = Callable[[int, int, str], None]
"""``progress(done, total, stage)``: ``done`` of ``total`` versions pushed and verified, and what runs now."""


@dataclass
class DemoConfig:
    """What ``weightstream demo`` runs: its options, one field each (:func:`check_config` says which fit)."""

    size_gib: float = 1.0
    receivers: int = 2
    versions: int = 3
    bucket_mib: int = 256
    buffers: int = 2
    framework: str = "numpy"
    seed: int = 0


class DemoConfigError(ConfigError):
    """A :class:`DemoConfig` that cannot run. ``field`` names the setting (``weightstream demo``'s
    option ``--`` + field with ``-`` for ``_``); ``detail`` is the message without it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"DemoConfig.{field}: {detail}")
        self.field = field
        self.detail = detail

    @property
    def option(self) -> str:
        """The ``weightstream demo`` option of ``field``, e.g. ``--size-gib``."""
        return "--" + self.field.replace("_", "-")


def _whole(cfg: DemoConfig, field: str, lo: int, hi: int, fix: str) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DemoConfigError(field, f"expected a whole number from {lo} to {hi}, got {value!r}; fix: {fix}")


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now: /proc/meminfo's MemAvailable (page cache the
    kernel can drop counts), else the free pages os.sysconf reports; no more than a cgroup (v2)
    memory limit leaves. None where neither can be read."""
    found: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = min(found, max(0, int(limit) - used))
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    return found


def model_bytes(cfg: DemoConfig) -> int:
    """The bytes of the model ``run_demo`` builds for ``cfg`` (its shapes, no allocation)."""
    bucket, total = cfg.bucket_mib * MiB, int(cfg.size_gib * GiB)
    specs = synthetic.transformer_specs(total, min_embedding_bytes=min(bucket + bucket // 4, total // 3))
    return sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in specs)


def needs(cfg: DemoConfig) -> tuple[int, int]:
    """(bytes of memory, bytes of /dev/shm) the demo needs at its peak. The sender holds the model
    and, while it times memcpy, two more copies of it; then it keeps the model while each receiver
    process holds one; the bucket slots in /dev/shm are memory too."""
    shm = cfg.buffers * cfg.bucket_mib * MiB
    model = model_bytes(cfg)
    return max(3, cfg.receivers + 1) * model + (cfg.receivers + 1) * PROCESS_BYTES + shm, shm


def check_config(cfg: DemoConfig) -> None:
    """Raise :class:`DemoConfigError` (a ConfigError) for a setting the demo cannot run with,
    before anything is built: each out of its range, and a model or buckets larger than this
    machine's free memory and /dev/shm."""
    size = cfg.size_gib
    # past MAX_SIZE_GIB the memory check below would not be exact (and no host holds it)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not (math.isfinite(size) and 0 < size <= MAX_SIZE_GIB):
        raise DemoConfigError("size_gib", f"expected a size in GiB > 0 and <= {MAX_SIZE_GIB}, got {size!r}; fix: e.g. 1")
    _whole(cfg, "receivers", 1, MAX_RECEIVERS, "e.g. 2 (each is a process holding the whole model)")
    _whole(cfg, "versions", 1, MAX_VERSIONS, "e.g. 3")
    _whole(cfg, "bucket_mib", 1, MAX_BUCKET_MIB, "e.g. 256")
    _whole(cfg, "buffers", 1, MAX_SLOTS, "e.g. 2 (packs one bucket while the ranks apply the last)")
    _whole(cfg, "seed", 0, MAX_SEED, "e.g. 0")
    if cfg.framework not in FRAMEWORKS:
        raise DemoConfigError("framework", f"expected one of {', '.join(FRAMEWORKS)}, got {cfg.framework!r}; fix: e.g. numpy")
    ram, shm = needs(cfg)
    try:
        shm_free: int | None = shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm: the transport says so itself
        shm_free = None
    if shm_free is not None and shm > shm_free:
        raise DemoConfigError(
            "bucket_mib",
            f"{cfg.buffers} buffers x {cfg.bucket_mib} MiB need {shm / MiB:.0f} MiB of /dev/shm, it has "
            f"{shm_free / MiB:.0f} MiB free; fix: a smaller --bucket-mib or --buffers (the model is sent in "
            "as many buckets as it takes), or a larger /dev/shm (docker run --shm-size=...)",
        )
    free = available_memory()
    if free is not None and ram > free:
        copies = max(3, cfg.receivers + 1)
        fits = math.floor((free - (cfg.receivers + 1) * PROCESS_BYTES - shm) / copies / GiB * 100) / 100
        fix = f"--size-gib {fits:g} or less" if fits >= 0.01 else "fewer --receivers or a smaller --bucket-mib"
        if fits >= 0.01 and cfg.receivers > 2:
            fix += ", or fewer --receivers"
        raise DemoConfigError(
            "size_gib",
            f"a model of {size:g} GiB with {cfg.receivers} receivers needs about {ram / GiB:.1f} GiB of memory "
            f"({copies} copies of the model: the sender's and each receiver's, 3 while the sender times memcpy; "
            f"and the buckets), this machine has {free / GiB:.1f} GiB available; fix: {fix}",
        )


def _receiver_main(endpoint: str, rank: int, specs: dict[str, Any], versions: list[str], conn: Any) -> None:
    """One inference rank: preallocated NumPy model, daemon, digests after each version."""
    from weightstream import ReceiverDaemon
    from weightstream.protocol.dtypes import by_name
    from weightstream.receiver.sinks import NumpySink

    try:
        state = {name: np.empty(tuple(shape), dtype=by_name(dt).numpy) for name, (dt, shape) in specs.items()}
        for a in state.values():  # touch every page now: a live model's params are resident
            a.view(np.uint8).fill(0)
        daemon = ReceiverDaemon(endpoint, NumpySink(state), rank=rank, prefetch=2)
        daemon.start()
        try:
            conn.send_bytes(msgpack.packb({"rank": rank, "ready": True}))
            for version in versions:
                daemon.wait_for_version(version, timeout=REPLY_TIMEOUT)
                conn.send_bytes(msgpack.packb({"rank": rank, "version": version, "digests": synthetic.digests(state)}))
                # the sender pushes the next version only after reading this reply
        finally:
            daemon.stop()
    except BaseException as exc:  # tell the parent instead of dying silently
        try:
            conn.send_bytes(msgpack.packb({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}))
        except (OSError, ValueError):  # the parent is gone too; the exception below says why
            pass
        raise
    finally:
        conn.close()


def _recv(conn: Any, rank: int, what: str) -> dict[str, Any]:
    if not conn.poll(REPLY_TIMEOUT):
        raise TimeoutError(f"rank {rank}: no {what} within {REPLY_TIMEOUT}s")
    reply: dict[str, Any] = msgpack.unpackb(conn.recv_bytes(), strict_map_key=False)
    if "error" in reply:
        raise RuntimeError(f"rank {rank} failed: {reply['error']}")
    return reply


def memcpy_gbps(nbytes: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` single-process NumPy copy between two preallocated buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _as_framework(tensors: list[tuple[str, np.ndarray]], framework: str) -> list[tuple[str, Any]]:
    """Zero-copy torch tensors, or paddle tensors, over the same bytes."""
    if framework == "numpy":
        return tensors
    if framework not in ("torch", "paddle"):
        raise ValueError(f"framework: expected numpy, torch or paddle, got {framework!r}")
    from .frameworks import dtype_of, host_bytes, view_as

    return [(name, view_as(framework, host_bytes(a), dtype_of(a), a.shape)) for name, a in tensors]  # type: ignore[arg-type]


class _Printer:
    def __init__(self) -> None:
        try:
            from rich.console import Console

            # soft_wrap: a line is never broken at the console's width, so a log (stdout not a
            # terminal, where rich also drops the styles) reads line for line as on a terminal
            self._console: Any = Console(highlight=False, soft_wrap=True)
        except ImportError:
            self._console = None

    def __call__(self, text: str, style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style)
        else:
            print(text, flush=True)


def run_demo(cfg: DemoConfig, progress: Progress | None = None) -> int:
    """Run the demo; return the process exit code (0 only if every digest matched).

    ``progress``, if given, is called as each stage starts and after each version was verified
    on every receiver (``weightstream demo`` draws its progress bar with it)."""
    from weightstream import BucketSender

    check_config(cfg)  # before anything is built or spawned
    say = _Printer()
    report_progress: Progress = progress or (lambda done, total, stage: None)
    report_progress(0, cfg.versions, "building the model")
    bucket = cfg.bucket_mib << 20
    total = int(cfg.size_gib * (1 << 30))
    model = synthetic.transformer_like(total, seed=cfg.seed, min_embedding_bytes=min(bucket + bucket // 4, total // 3))
    specs = {k: [dt, list(shape)] for k, (dt, shape) in model.specs().items()}
    largest = max(t.nbytes for _, t in model.tensors)
    say(
        f"model: {len(model.tensors)} tensors, {model.nbytes / 1e9:.3f} GB "
        f"(largest {largest / 2**20:.0f} MiB{', chunked' if largest > bucket else ''}); "
        f"bucket {cfg.bucket_mib} MiB x {cfg.buffers}, {cfg.receivers} receivers, framework {cfg.framework}"
    )
    report_progress(0, cfg.versions, "timing memcpy")
    limit = memcpy_gbps(model.nbytes)
    say(f"memcpy limit (1 process, numpy, same bytes, best of 3): {limit:.2f} GB/s")

    versions = [f"step_{i}" for i in range(cfg.versions)]
    workdir = tempfile.mkdtemp(prefix="ws-demo-", dir="/tmp")
    os.rmdir(workdir)  # the sender creates the directory itself (mode 0700)
    endpoint = f"ipc://{workdir}/sender.sock"
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    mismatches = 0
    rates: list[float] = []
    try:
        with BucketSender(endpoint, receivers=cfg.receivers, bucket_bytes=bucket, num_buffers=cfg.buffers) as sender:
            report_progress(0, cfg.versions, f"starting {cfg.receivers} receivers")
            for rank in range(cfg.receivers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_receiver_main, args=(endpoint, rank, specs, versions, child), daemon=True)
                p.start()
                child.close()
                procs.append(p)
                conns.append(parent)
            for rank, conn in enumerate(conns):
                _recv(conn, rank, "start")
            sender.wait_for_receivers(timeout=REPLY_TIMEOUT)
            for i, version in enumerate(versions):
                report_progress(i, cfg.versions, f"pushing {version}")
                if i:
                    model.bump()
                expected = synthetic.digests(model)
                report = sender.push(_as_framework(model.tensors, cfg.framework), version=version)
                bad = 0
                for rank, conn in enumerate(conns):
                    got = _recv(conn, rank, f"digests of {version}")["digests"]
                    wrong = [n for n, d in expected.items() if got.get(n) != d]
                    if wrong:
                        say(f"  rank {rank}: {len(wrong)} tensors differ, e.g. {wrong[:3]}", style="bold red")
                    bad += len(wrong) + len(set(got) - set(expected))
                mismatches += bad
                rates.append(report.gbps)
                say(
                    f"{version}: {report.bytes / 1e9:.3f} GB, {report.tensors} tensors, {report.buckets} buckets "
                    f"in {report.seconds:.3f} s = {report.gbps:.2f} GB/s end to end "
                    f"({report.gbps / limit:.0%} of memcpy); digests {'OK' if not bad else f'{bad} MISMATCHED'}",
                    style=None if not bad else "bold red",
                )
                report_progress(i + 1, cfg.versions, f"{version} verified")
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in conns:
            c.close()
        shutil.rmtree(workdir, ignore_errors=True)
    best = max(rates) if rates else 0.0
    say(f"best {best:.2f} GB/s vs memcpy {limit:.2f} GB/s: ratio {best / limit:.2f}")
    n_checked = len(model.tensors) * cfg.receivers * cfg.versions
    if mismatches:
        say(f"verification FAILED: {mismatches} of {n_checked} tensor digests mismatched", style="bold red")
        return 1
    if any(p.exitcode != 0 for p in procs):
        say(f"verification FAILED: receiver exit codes {[p.exitcode for p in procs]}", style="bold red")
        return 1
    say(f"verification OK: {n_checked} tensor digests bit-exact (xxh3_64) across {cfg.receivers} receivers x {cfg.versions} versions", style="bold green")
    return 0
