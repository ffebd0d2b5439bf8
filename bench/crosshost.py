"""Cross-host transports (tcp, gloo) on loopback, against the raw engine under each.

    weightstream bench crosshost --quick           # 512 MiB model, 5 repeats
    weightstream bench crosshost                   # 1 GiB model, 9 repeats
    weightstream bench crosshost --quick --curve   # also tcp with CURVE (and the raw ZMQ engine with it)

From a checkout, ``python -m bench.crosshost`` runs the same with the same options.

For every (transport, ranks, bucket size) it starts a BucketSender (control endpoint ipc://
in a temp dir, data over TCP on 127.0.0.1) and rank processes (spawn), each applying into a
preallocated NumPy model through NumpySink. The same rank processes also run the raw engine
of the transport (bench/peers/raw_zmq.py, bench/peers/raw_gloo.py): the same bytes, bucket
by bucket, into one preallocated bucket buffer per rank, no metadata, acks or model copy.
After one warm-up of each (the first push builds connections and groups), weightstream and
raw runs alternate (ws, raw, ws, raw, ...) so that both see the same machine state;
medians are reported.

- weightstream time: the sender's push() wall time of one version (every rank committed).
- raw time: from the first send to every rank's "done".
- GB/s: the model's bytes per second (each rank receives all of them).
- Verification: after each weightstream version every rank's xxh3_64 of each tensor is
  compared with the sender's; after each raw run, the xxh3_64 of the last bucket each rank
  holds. A mismatch fails the row and the run (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash
import zmq

from weightstream import BucketSender, CurveKeys, ReceiverDaemon, WeightstreamError, synthetic
from weightstream.protocol.transports.tcp import FRAME_BYTES
from weightstream.receiver.sinks import NumpySink

from . import results_dir
from .checksum_cost import cpu_model
from .options import MAX_MIB, RANKS, REPEATS, SIZE_MIB, names, segments_removed, wholes
from .peers import harness, raw_gloo
from .peers.raw_zmq import RawZmqReceiver, RawZmqSender, spans

MiB = 1 << 20
TIMEOUT = 60.0  # every wait of the bench: a push, a rank's answer, a group's rendezvous (a push takes ~1 s)
TRANSPORTS = ("tcp", "gloo", "tcp+curve")


@dataclass
class Config:
    transport: str  # "tcp", "gloo" or "tcp+curve"
    ranks: int
    bucket_mib: int

    @property
    def wire(self) -> str:
        return self.transport.split("+")[0]

    @property
    def curve(self) -> bool:
        return self.transport.endswith("+curve")


@dataclass
class Row:
    transport: str
    ranks: int
    bucket_mib: int
    bytes: int
    tensors: int
    ws_buckets: int = 0
    raw_buckets: int = 0
    ws_seconds: list[float] = field(default_factory=list)
    raw_seconds: list[float] = field(default_factory=list)
    # CPU seconds (user + system) of the sender and all ranks together, over each timed run
    ws_cpu: list[float] = field(default_factory=list)
    raw_cpu: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ws_gbps(self) -> float:
        return self.bytes / statistics.median(self.ws_seconds) / 1e9 if self.ws_seconds else float("nan")

    @property
    def raw_gbps(self) -> float:
        return self.bytes / statistics.median(self.raw_seconds) / 1e9 if self.raw_seconds else float("nan")

    @property
    def ratio(self) -> float:
        return self.ws_gbps / self.raw_gbps

    @property
    def ws_cpu_s(self) -> float:
        return statistics.median(self.ws_cpu) if self.ws_cpu else float("nan")

    @property
    def raw_cpu_s(self) -> float:
        return statistics.median(self.raw_cpu) if self.raw_cpu else float("nan")

    @property
    def paired_ratios(self) -> list[float]:
        """raw time / ws time of each interleaved pair (ws run i, raw run i right after it)."""
        return [r / w for w, r in zip(self.ws_seconds, self.raw_seconds)]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (ZMQ I/O, gloo, receive)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


# --- the bench's own control channel (msgpack over a multiprocessing pipe; no product wire) ---


def send(conn: Any, **msg: Any) -> None:
    conn.send_bytes(msgpack.packb(msg))


def expect(conn: Any, key: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message from the other side, which must carry ``key``; a rank's error is raised here."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no {key!r} from a rank within {timeout}s")
    msg = msgpack.unpackb(conn.recv_bytes(), strict_map_key=False)
    if "error" in msg:
        raise RuntimeError(msg["error"])
    if key not in msg:
        raise RuntimeError(f"expected {key!r}, got {sorted(msg)}")
    return msg  # type: ignore[no-any-return]


# --- rank process ----------------------------------------------------------------------------


def rank_main(rank: int, setup: dict[str, Any], specs: dict[str, Any], conn: Any) -> None:
    """One inference rank: a ReceiverDaemon into a NumPy model, and the raw engine's receiver;
    runs the commands the bench sends until "exit"."""
    daemon: ReceiverDaemon | None = None
    zrx: RawZmqReceiver | None = None
    try:
        model = harness.alloc_state(specs)
        bucket, total = setup["bucket"], setup["total"]
        raw = np.zeros(bucket, dtype=np.uint8)  # resident before timing, like the model
        server_key = setup["server_key"]
        security: dict[str, Any] = (
            {"curve_keys": CurveKeys.generate(), "server_key": server_key} if server_key else {"insecure": True}
        )
        daemon = ReceiverDaemon(setup["endpoint"], NumpySink(model), rank=rank, **security)
        daemon.start()
        group: Any = None
        raw_tensor: Any = None
        if setup["wire"] == "gloo":
            group = raw_gloo.join_group(setup["store_port"], rank + 1, setup["world"], TIMEOUT)
            raw_tensor = raw_gloo.as_tensor(raw)
        else:
            zrx = RawZmqReceiver(setup["raw_address"], rank, server_key)
        send(conn, ready=True)
        while True:
            msg = expect(conn, "cmd", 3 * TIMEOUT)
            if msg["cmd"] == "ws":
                daemon.wait_for_version(msg["version"], timeout=TIMEOUT)
                send(conn, digests=synthetic.digests(model))
            elif msg["cmd"] == "raw":
                send(conn, armed=True)
                if zrx is not None:
                    used = zrx.receive(raw, total, bucket)
                else:
                    used = raw_gloo.receive(group, raw_tensor, total, bucket, TIMEOUT)
                send(conn, done=True)  # the clock stops here; the digest below is not timed
                send(conn, digest=xxhash.xxh3_64_intdigest(raw[:used]))  # type: ignore[arg-type]
            else:
                break
    except BaseException as exc:
        try:
            send(conn, error=f"rank {rank}: {type(exc).__name__}: {exc}")
        except (OSError, ValueError):  # the bench is gone too
            pass
        raise
    finally:
        if zrx is not None:
            zrx.close()
        if daemon is not None:
            daemon.stop()
        conn.close()


# --- sender side -----------------------------------------------------------------------------


class Session:
    """One configuration's sender, raw engine and rank processes."""

    def __init__(self, cfg: Config, model: synthetic.Model) -> None:
        self.cfg = cfg
        self.model = model
        self.payload = model.buffer[: model.nbytes]  # the raw engine's bytes: as many as the model's tensors
        self.bucket = cfg.bucket_mib * MiB
        self.workdir = harness.new_endpoint_dir()
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.sender: BucketSender | None = None
        self.zraw: RawZmqSender | None = None
        self.store: Any = None
        self.group: Any = None
        self.raw_tensor: Any = None  # gloo: the payload as a torch tensor (shares its memory)
        self.version = 0

    def start(self) -> None:
        cfg = self.cfg
        keys = CurveKeys.generate() if cfg.curve else None
        endpoint = f"ipc://{self.workdir}/ws/s.sock"
        self.sender = BucketSender(endpoint, receivers=cfg.ranks, transport=cfg.wire, bucket_bytes=self.bucket,
                                   num_buffers=2, timeout=TIMEOUT, curve_keys=keys, insecure=keys is None)
        setup: dict[str, Any] = {"endpoint": endpoint, "wire": cfg.wire, "bucket": self.bucket,
                                 "total": self.model.nbytes, "server_key": keys.public if keys else None,
                                 "world": cfg.ranks + 1}
        if cfg.wire == "gloo":
            self.store = raw_gloo.store_server(TIMEOUT)
            setup["store_port"] = self.store.port
        else:
            self.zraw = RawZmqSender(keys)
            setup["raw_address"] = self.zraw.address
        specs = {k: [dt, list(s)] for k, (dt, s) in self.model.specs().items()}
        ctx = mp.get_context("spawn")
        for rank in range(cfg.ranks):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(rank, setup, specs, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        if self.store is not None:  # returns once every rank joined, i.e. before any timing
            self.group = raw_gloo.make_group(self.store, 0, cfg.ranks + 1, TIMEOUT)
            self.raw_tensor = raw_gloo.as_tensor(self.payload)
        for c in self.conns:
            expect(c, "ready")
        if self.zraw is not None:
            self.zraw.wait_hellos(cfg.ranks, TIMEOUT)

    def cpu(self) -> float:
        """CPU seconds so far of this process and every rank."""
        return cpu_seconds(os.getpid()) + sum(cpu_seconds(p.pid) for p in self.procs)

    def ws(self) -> tuple[float, float, int]:
        """One weightstream version (a new one: every byte changed): push() seconds, CPU seconds, buckets."""
        if self.sender is None:
            raise RuntimeError("Session.ws() before start()")
        if self.version:
            self.model.bump()
        name = f"v{self.version}"
        self.version += 1
        expected = synthetic.digests(self.model)
        cpu0 = self.cpu()
        t0 = time.perf_counter()
        report = self.sender.push(self.model.tensors, version=name)
        seconds = time.perf_counter() - t0
        cpu = self.cpu() - cpu0
        for c in self.conns:
            send(c, cmd="ws", version=name)
        for rank, c in enumerate(self.conns):
            got = expect(c, "digests")["digests"]
            bad = [n for n, d in expected.items() if got.get(n) != d]
            if bad:
                raise RuntimeError(f"weightstream {name}: rank {rank}: {len(bad)} tensors differ, e.g. {bad[:3]}")
        return seconds, cpu, report.buckets

    def raw(self) -> tuple[float, float]:
        """One raw-engine run of the model's bytes: seconds from the first send to every rank done, CPU seconds."""
        for c in self.conns:
            send(c, cmd="raw")
        for c in self.conns:
            expect(c, "armed")
        works: list[Any] = []
        cpu0 = self.cpu()
        t0 = time.perf_counter()
        if self.zraw is not None:
            self.zraw.send(self.payload, self.bucket)
        else:
            works = raw_gloo.send(self.group, self.raw_tensor, self.bucket, TIMEOUT)
        for c in self.conns:
            expect(c, "done")
        seconds = time.perf_counter() - t0
        cpu = self.cpu() - cpu0
        raw_gloo.settle(works, TIMEOUT)
        at, used = spans(self.model.nbytes, self.bucket)[-1]
        want = xxhash.xxh3_64_intdigest(self.payload[at : at + used])  # type: ignore[arg-type]
        for rank, c in enumerate(self.conns):
            if expect(c, "digest")["digest"] != want:
                raise RuntimeError(f"raw {self.cfg.wire}: rank {rank}: the last bucket's digest differs")
        return seconds, cpu

    def close(self) -> None:
        for c in self.conns:
            try:
                send(c, cmd="exit")
            except (OSError, ValueError):  # that rank is gone already
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self.conns:
            c.close()
        if self.sender is not None:
            self.sender.close()
        if self.zraw is not None:
            self.zraw.close()
        self.group = self.store = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def run_config(cfg: Config, model: synthetic.Model, repeats: int) -> Row:
    row = Row(cfg.transport, cfg.ranks, cfg.bucket_mib, model.nbytes, len(model.tensors),
              raw_buckets=len(spans(model.nbytes, cfg.bucket_mib * MiB)))
    session = Session(cfg, model)
    try:
        session.start()
        session.ws()  # warm-up: connections, the gloo group, first-touch of the slots
        session.raw()
        for _ in range(repeats):
            seconds, cpu, row.ws_buckets = session.ws()
            row.ws_seconds.append(seconds)
            row.ws_cpu.append(cpu)
            seconds, cpu = session.raw()
            row.raw_seconds.append(seconds)
            row.raw_cpu.append(cpu)
    except (OSError, RuntimeError, TimeoutError, EOFError, WeightstreamError, zmq.ZMQError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        session.close()
    return row


# --- plan, output ----------------------------------------------------------------------------


@dataclass
class Plan:
    size_mib: int
    transports: list[str]
    ranks: list[int]
    buckets: list[int]  # MiB
    repeats: int


def presets(quick: bool) -> Plan:
    if quick:
        return Plan(size_mib=512, transports=["tcp", "gloo"], ranks=[1, 2], buckets=[16, 64, 256], repeats=5)
    return Plan(size_mib=1024, transports=["tcp", "gloo"], ranks=[1, 2], buckets=[16, 64, 256], repeats=9)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(row: Row) -> str:
    status = "ok" if row.error is None else f"FAIL {row.error}"
    return (f"{row.transport:<10} {row.ranks:>5} {row.bucket_mib:>10} {row.ws_gbps:>8.2f} {row.raw_gbps:>8.2f} "
            f"{row.ratio:>6.2f} {row.ws_cpu_s:>8.2f} {row.raw_cpu_s:>8.2f}  {status}")


HEADER = (f"{'transport':<10} {'ranks':>5} {'bucket MiB':>10} {'ws GB/s':>8} {'raw GB/s':>8} {'ratio':>6} {'ws CPU s':>8} "
          f"{'raw CPU s':>8}  check")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the bench with ``argv`` (default: the command line); ``prog`` names it in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.crosshost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 MiB model, 5 repeats")
    ap.add_argument("--curve", action="store_true", help="also run tcp with CURVE keys (raw ZMQ with CURVE too)")
    ap.add_argument("--transports", type=names(TRANSPORTS), help=f"comma list of {','.join(TRANSPORTS)}")
    ap.add_argument("--ranks", type=RANKS, help="comma list, e.g. 1,2")
    ap.add_argument("--buckets", type=wholes(1, MAX_MIB, "16,64,256"), help="bucket sizes in MiB, e.g. 16,64,256")
    ap.add_argument("--size-mib", type=SIZE_MIB, help="model size")
    ap.add_argument("--repeats", type=REPEATS, help="interleaved (weightstream, raw) pairs per row, after a warm-up")
    args = ap.parse_args(argv)
    # a SIGTERM (e.g. timeout) unwinds through the sessions' finally blocks: ranks and sockets go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = presets(args.quick)
    if args.transports:
        plan.transports = args.transports
    if args.curve and "tcp+curve" not in plan.transports:
        plan.transports.append("tcp+curve")
    if args.ranks:
        plan.ranks = args.ranks
    if args.buckets:
        plan.buckets = args.buckets
    if args.size_mib:
        plan.size_mib = args.size_mib
    if args.repeats:
        plan.repeats = args.repeats
    with segments_removed():
        return _run(plan)


def _run(plan: Plan) -> int:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    model = synthetic.transformer_like(plan.size_mib * MiB)
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average at start {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f}")
    print(f"model: {len(model.tensors)} tensors, {model.nbytes / 1e9:.3f} GB; frames of {FRAME_BYTES // MiB} MiB; "
          f"{plan.repeats} interleaved repeats per row, medians")
    print()
    print(HEADER)
    rows: list[Row] = []
    for transport in plan.transports:
        for ranks in plan.ranks:
            for bucket in plan.buckets:
                rows.append(run_config(Config(transport, ranks, bucket), model, plan.repeats))
                print(fmt(rows[-1]), flush=True)
    load_end = os.getloadavg()
    wall = time.perf_counter() - t_start
    print()
    print("GB/s: model bytes / median seconds (each rank receives all of them); ratio = ws GB/s / raw GB/s; "
          "CPU s: median CPU seconds of the sender and all ranks together per run")
    print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; total {wall:.1f} s")

    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"crosshost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"cpu": cpu, "cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "commit": git_commit(),
            "frame_bytes": FRAME_BYTES, "plan": asdict(plan), "loadavg_start": load_start, "loadavg_end": load_end,
            "wall_s": wall}
    out.write_text(json.dumps({"meta": meta, "rows": [
        {**asdict(r), "ws_gbps": r.ws_gbps, "raw_gbps": r.raw_gbps, "ratio": r.ratio, "paired_ratios": r.paired_ratios,
         "ws_cpu_s": r.ws_cpu_s, "raw_cpu_s": r.raw_cpu_s}
        for r in rows]}, indent=1))
    print(f"wrote {out}")
    failed = [r for r in rows if r.error is not None]
    if failed:
        print(f"{len(failed)} rows FAILED (verification or error): see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
