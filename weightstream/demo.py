"""``weightstream demo``: stream a synthetic model to receiver processes and verify every byte.

The sender runs here; each receiver is a spawned process running a ReceiverDaemon
into a NumpySink of preallocated arrays. After each version every receiver sends
back an xxh3_64 digest per tensor (msgpack over a multiprocessing pipe: the demo's
control channel, not the product wire), and the sender compares them with its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from . import synthetic

REPLY_TIMEOUT = 300.0

Progress = Callable[[int, int, str], None]
"""``progress(done, total, stage)``: ``done`` of ``total`` versions pushed and verified, and what runs now."""


@dataclass
class DemoConfig:
    size_gib: float = 1.0
    receivers: int = 2
    versions: int = 3
    bucket_mib: int = 256
    buffers: int = 2
    framework: str = "numpy"
    seed: int = 0


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
