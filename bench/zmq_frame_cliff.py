"""ZMQ receive throughput over loopback TCP by frame size, and the receiver's page faults.

    weightstream bench zmq-frame-cliff                     # frames of 16, 24, 31.9, 32, 64 MiB
    weightstream bench zmq-frame-cliff --frames-mib 8,32

From a checkout, ``python -m bench.zmq_frame_cliff`` runs the same with the same options.

libzmq allocates each received message with malloc. glibc serves an allocation above its mmap
threshold with a fresh mmap (and frees it with munmap), so every page of such a message faults
on first touch. The threshold adapts upward to the size of freed blocks, but never past
DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), and a 32 MiB message is a few bytes over it
with libzmq's header. This script shows where the cliff is: a receiver (a spawned process, like
a rank) takes ``--total-mib`` in frames of each size with ``recv_into`` into one preallocated
buffer, and reports GB/s and minor page faults per run. Nothing of weightstream runs here:
weightstream's tcp transport sends frames of ``FRAME_BYTES`` (see bench/crosshost.py).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import zmq

from weightstream.protocol.transports.tcp import FRAME_BYTES

from .options import MAX_MIB, REPEATS, numbers, segments_removed, whole

MiB = 1 << 20
TIMEOUT_S = 60.0


def receiver(address: str, total: int, frame: int, runs: int, conn: Any) -> None:
    ctx: Any = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    sock.setsockopt(zmq.ROUTING_ID, b"rx")
    sock.connect(address)
    sock.send(b"hello")
    buf = np.zeros(frame, dtype=np.uint8)
    try:
        for _ in range(runs):
            if not conn.poll(TIMEOUT_S):
                raise TimeoutError(f"no start from the sender within {TIMEOUT_S}s")
            conn.recv_bytes()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for at in range(0, total, frame):
                n = min(frame, total - at)
                if sock.recv_into(memoryview(buf[:n])) != n:  # type: ignore[arg-type]
                    raise RuntimeError(f"expected a frame of {n} bytes")
            conn.send_bytes(str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults).encode())
    finally:
        sock.close(linger=0)
        ctx.term()
        conn.close()


def measure(total: int, frame: int, runs: int) -> tuple[list[float], list[int]]:
    """GB/s and receiver page faults of each run (the first is a warm-up of the allocator)."""
    ctx: Any = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    src = np.arange(total, dtype=np.uint8)  # resident before timing
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=receiver, args=(f"tcp://127.0.0.1:{port}", total, frame, runs, child), daemon=True)
    proc.start()
    child.close()
    gbps: list[float] = []
    faults: list[int] = []
    try:
        if not sock.poll(int(TIMEOUT_S * 1000), zmq.POLLIN):
            raise TimeoutError(f"the receiver did not connect within {TIMEOUT_S}s")
        ident = sock.recv_multipart()[0]
        for _ in range(runs):
            parent.send_bytes(b"go")
            t0 = time.perf_counter()
            for at in range(0, total, frame):
                sock.send_multipart([ident, memoryview(src[at : at + frame])], copy=False)  # type: ignore[arg-type]
            if not parent.poll(TIMEOUT_S):
                raise TimeoutError(f"the receiver did not finish within {TIMEOUT_S}s")
            faults.append(int(parent.recv_bytes()))
            gbps.append(total / (time.perf_counter() - t0) / 1e9)
    finally:
        proc.join(TIMEOUT_S)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        parent.close()
        sock.close(linger=0)
        ctx.term()
    return gbps, faults


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the bench with ``argv`` (default: the command line); ``prog`` names it in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.zmq_frame_cliff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # about 1 KiB a frame at least (one of 0 bytes never ends a run); at most 4 GiB, one receive buffer
    ap.add_argument("--frames-mib", type=numbers(0.001, 4096, "16,32"), default="16,24,31.9,32,64",
                    help="comma list of frame sizes in MiB")
    ap.add_argument("--total-mib", type=whole(1, MAX_MIB), default=512)
    ap.add_argument("--runs", type=REPEATS, default=4, help="runs per frame size (2 at least); the first is not counted")
    args = ap.parse_args(argv)
    with segments_removed():
        return _run(args.frames_mib, args.total_mib, args.runs)


def _run(frames_mib: list[float], total_mib: int, runs: int) -> int:
    total = total_mib * MiB
    print(f"{total_mib} MiB per run over loopback TCP; weightstream's tcp FRAME_BYTES = {FRAME_BYTES / MiB:g} MiB")
    print(f"{'frame MiB':>9} {'GB/s (median)':>13} {'page faults per run':>20}")
    for mib in frames_mib:
        gbps, faults = measure(total, int(mib * MiB), max(2, runs))
        print(f"{mib:>9g} {statistics.median(gbps[1:]):>13.2f} {statistics.median(faults[1:]):>20.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
