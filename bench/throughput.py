"""Bucket throughput over the shm transport, against the machine's limit and peer baselines.

    weightstream bench throughput --quick          # the small preset (256 MiB models)
    weightstream bench throughput                  # full preset (2 GiB models, all axes)
    weightstream bench throughput --shapes small --methods weightstream,naive --receivers 1

From a checkout, ``python -m bench.throughput`` runs the same with the same options.

Every run verifies the bytes it moved (xxh3_64 per tensor, sender vs each receiver),
writes <timestamp>.json and .png to bench/results (``bench.results_dir``), and prints a table plus ratios.
Methods: memcpy (limit: one-process NumPy copy of the same bytes), memcpy_stream (the
same copy by streaming stores, which weightstream uses for slots past the cache's size:
the one-copy ceiling of this machine), pipeline (limit of a two-copy pipeline: the minimal
two-process handoff of bench/handoff.py, a writer and a reader copying the same bytes
through 2 shm slots, at its best slot size, swept from 1 to 256 MiB), weightstream, naive (pickle per tensor over ZMQ), handles (one
shm segment per tensor), lockstep (one buffer, REQ/REP acks).

Each weightstream version is also paired with a NumPy memcpy of the same bytes timed just
before it; the "x memcpy" column is the median of those per-version ratios, which holds
while the host's memory bandwidth drifts between rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightstream import native as speedups
from weightstream import synthetic
from weightstream.protocol.messages import MAX_SLOTS

from . import handoff, results_dir, ws_run
from .options import BUFFERS, MAX_MIB, MAX_RANKS, RANKS, REPEATS, SIZE_MIB, names, segments_removed, whole, wholes
from .peers import handles, harness, lockstep, naive

MiB = 1 << 20
GiB = 1 << 30
METHODS = ("memcpy", "memcpy_stream", "pipeline", "weightstream", "naive", "handles", "lockstep")
LIMITS = ("memcpy", "memcpy_stream", "pipeline")  # machine ceilings, measured without receivers
SHAPES = ("large", "transformer", "small", "large_same")


@dataclass
class Row:
    shape: str
    method: str
    tensors: int
    bytes: int
    receivers: int
    bucket_mib: int | None = None
    buffers: int | None = None
    prefetch: int | None = None
    seconds: list[float] = field(default_factory=list)
    # weightstream rows: NumPy's memcpy of the same bytes, timed just before each version
    paired_memcpy: list[float] = field(default_factory=list)
    verified: bool = True
    error: str | None = None

    @property
    def best_s(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def gbps(self) -> float:
        return self.bytes / self.best_s / 1e9 if self.seconds else float("nan")

    @property
    def paired_ratio(self) -> float:
        """Median over versions of memcpy time / this version's time: the ratio to the limit
        measured at the same moment, not the best of each measured minutes apart."""
        pairs = [m / s for m, s in zip(self.paired_memcpy, self.seconds)]
        return statistics.median(pairs) if pairs else float("nan")

    def label(self) -> str:
        if self.method != "weightstream" and self.method != "lockstep":
            return self.method
        parts = [f"b{self.bucket_mib}M"]
        if self.method == "weightstream":
            parts += [f"n{self.buffers}", f"p{self.prefetch}"]
        return f"{self.method}[{','.join(parts)}]"


def make_model(shape: str, size: int, bucket: int) -> synthetic.Model:
    if shape == "large":
        return synthetic.few_large(size, count=4)
    if shape == "transformer":
        return synthetic.transformer_like(size, min_embedding_bytes=min(bucket + bucket // 4, size // 3))
    if shape == "small":
        return synthetic.many_small(100_000, 4096)
    if shape == "large_same":  # the 100k x 4 KiB bytes, in 4 big tensors
        return synthetic.few_large(100_000 * 4096, count=4)
    raise SystemExit(f"unknown shape {shape!r}; expected large, transformer, small or large_same")


def paired_memcpy(model: synthetic.Model) -> Any:
    """A timer of one NumPy memcpy of the model's bytes, into memory faulted in once."""
    dst = np.empty_like(model.buffer)
    dst.fill(0)

    def timed() -> float:
        t = time.perf_counter()
        np.copyto(dst, model.buffer)
        return time.perf_counter() - t

    return timed


def memcpy_row(shape: str, model: synthetic.Model, repeats: int = 3, stream: bool = False) -> Row:
    src = model.buffer
    dst = np.empty_like(src)
    dst.fill(0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        if stream:
            speedups.copy(dst, src, stream=True)
        else:
            np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    ok = bool(np.array_equal(dst, src))
    return Row(shape, "memcpy_stream" if stream else "memcpy", len(model.tensors), model.nbytes, 0, seconds=times,
               verified=ok)


def pipeline_row(shape: str, model: synthetic.Model, repeats: int = 3) -> Row:
    try:
        _, times, _ = handoff.sweep(model.nbytes, 1, repeats)
    except (RuntimeError, TimeoutError, OSError) as exc:
        return Row(shape, "pipeline", len(model.tensors), model.nbytes, 0, verified=False, error=str(exc))
    return Row(shape, "pipeline", len(model.tensors), model.nbytes, 0, seconds=times)


def peer_row(method: str, shape: str, model: synthetic.Model, receivers: int, bucket: int, buffers: int,
             prefetch: int, versions: int) -> Row:
    row = Row(shape, method, len(model.tensors), model.nbytes, receivers)
    if method == "weightstream":
        row.bucket_mib, row.buffers, row.prefetch = bucket // MiB, buffers, prefetch
        res = harness.run(ws_run.__name__, model, ws_run.make_sender(model), setup=ws_run.make_setup(bucket, buffers),
                          teardown=ws_run.teardown, receivers=receivers, versions=versions,
                          options={"prefetch": prefetch}, paired=paired_memcpy(model))
        row.paired_memcpy = res.paired
    elif method == "naive":
        res = harness.run(naive.__name__, model, naive.make_sender(model), setup=naive.setup,
                          teardown=naive.teardown, receivers=receivers, versions=versions)
    elif method == "handles":
        res = harness.run(handles.__name__, model, handles.make_sender(model), setup=handles.setup,
                          teardown=handles.teardown, receivers=receivers, versions=versions)
    elif method == "lockstep":
        row.bucket_mib = bucket // MiB
        res = harness.run(lockstep.__name__, model, lockstep.make_sender(model, bucket),
                          setup=lockstep.make_setup(bucket), teardown=lockstep.teardown, receivers=receivers,
                          versions=versions)
    else:
        raise SystemExit(f"unknown method {method!r}; expected one of {METHODS}")
    row.seconds, row.verified, row.error = res.seconds, res.verified, res.error
    if res.mismatches:
        row.error = f"{res.mismatches} tensor digests mismatched"
    return row


@dataclass
class Plan:
    shapes: list[str]
    size: int
    methods: list[str]
    receivers: list[int]
    buckets: list[int]  # MiB
    buffers: list[int]
    prefetch: list[int]
    versions: int
    quick: bool = False
    default_bucket: int = 256
    default_buffers: int = 2
    default_prefetch: int = 2


def presets(name: str) -> Plan:
    if name == "quick":
        return Plan(shapes=["transformer", "small", "large_same"], size=256 * MiB, methods=list(METHODS),
                    receivers=[1, 2], buckets=[16, 64], buffers=[1, 2], prefetch=[2], versions=2, quick=True,
                    default_bucket=64, default_buffers=2, default_prefetch=2)
    return Plan(shapes=["large", "transformer", "small", "large_same"], size=2 * GiB, methods=list(METHODS),
                receivers=[1, 2], buckets=[16, 64, 256, 1024], buffers=[1, 2, 3, 4], prefetch=[1, 2, 4], versions=3)


def configs(plan: Plan, shape: str, method: str) -> list[tuple[int, int, int, int]]:
    """(receivers, bucket MiB, buffers, prefetch) to run: the default, then one axis varied at a time."""
    d = (plan.default_bucket, plan.default_buffers, plan.default_prefetch)
    out: list[tuple[int, int, int, int]] = []
    for r in plan.receivers:
        if r == min(plan.receivers) or not plan.quick or method == "weightstream" or shape == "transformer":
            out.append((r, *d))
    if method == "weightstream" and shape in ("transformer", "large"):
        r = min(plan.receivers)
        out += [(r, b, d[1], d[2]) for b in plan.buckets]
        out += [(r, d[0], n, d[2]) for n in plan.buffers]
        out += [(r, d[0], d[1], p) for p in plan.prefetch]
    if method == "lockstep" and shape in ("transformer",):
        out += [(min(plan.receivers), b, 1, 1) for b in plan.buckets]
    if method != "weightstream":  # peers have no ring or prefetch; only lockstep has a bucket
        out = [(r, b if method == "lockstep" else d[0], 1, 1) for r, b, _, _ in out]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def run_plan(plan: Plan, log: Any = print) -> list[Row]:
    rows: list[Row] = []
    free = _shm_free()
    for shape in plan.shapes:
        model = make_model(shape, plan.size, plan.default_bucket * MiB)
        log(f"== {shape}: {len(model.tensors)} tensors, {model.nbytes / 1e9:.3f} GB")
        for method in plan.methods:
            if method in LIMITS:
                if method == "pipeline":
                    rows.append(pipeline_row(shape, model))
                else:
                    rows.append(memcpy_row(shape, model, stream=method == "memcpy_stream"))
                log(_fmt(rows[-1]))
                continue
            for r, b, n, p in configs(plan, shape, method):
                if method in ("handles",) and model.nbytes * 2 > free:
                    continue
                if method == "weightstream" and b * MiB * n > free // 2:
                    continue
                rows.append(peer_row(method, shape, model, r, b * MiB, n, p, plan.versions))
                log(_fmt(rows[-1]))
        del model
    return rows


def _shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def _fmt(row: Row) -> str:
    status = "ok" if row.verified and not row.error else f"FAIL {row.error}"
    return (f"{row.shape:<12} {row.label():<28} r={row.receivers} {row.tensors:>7} t {row.bytes / 1e9:7.3f} GB "
            f"{row.best_s:8.3f} s {row.gbps:7.2f} GB/s  {status}")


def _default(rows: list[Row], shape: str, method: str, plan: Plan, receivers: int) -> Row | None:
    for row in rows:
        if row.shape != shape or row.method != method or not row.seconds:
            continue
        if method in LIMITS:
            return row
        if row.receivers != receivers:
            continue
        if method in ("weightstream", "lockstep") and row.bucket_mib != plan.default_bucket:
            continue
        if method == "weightstream" and (row.buffers, row.prefetch) != (plan.default_buffers, plan.default_prefetch):
            continue
        return row
    return None


def ratios(rows: list[Row], plan: Plan) -> list[dict[str, Any]]:
    out = []
    for shape in plan.shapes:
        for r in plan.receivers:
            ws = _default(rows, shape, "weightstream", plan, r)
            if ws is None:
                continue
            entry: dict[str, Any] = {"shape": shape, "receivers": r, "weightstream_gbps": ws.gbps}
            for name in LIMITS:
                limit = _default(rows, shape, name, plan, r)
                if limit:
                    entry[f"vs_{name}"] = ws.gbps / limit.gbps
            if ws.paired_memcpy:
                entry["vs_memcpy_paired"] = ws.paired_ratio
            for peer in ("naive", "handles", "lockstep"):
                p = _default(rows, shape, peer, plan, r)
                if p:
                    entry[f"speedup_vs_{peer}"] = p.best_s / ws.best_s
            out.append(entry)
    small = {e["receivers"]: e for e in out if e["shape"] == "small"}
    same = {e["receivers"]: e for e in out if e["shape"] == "large_same"}
    for r, entry in small.items():
        if r in same:
            entry["time_vs_large_same_bytes"] = same[r]["weightstream_gbps"] / entry["weightstream_gbps"]
            if "vs_memcpy_paired" in entry and "vs_memcpy_paired" in same[r]:  # each against its own moment's memcpy
                entry["time_vs_large_same_bytes_paired"] = same[r]["vs_memcpy_paired"] / entry["vs_memcpy_paired"]
    return out


def print_table(rows: list[Row], rats: list[dict[str, Any]]) -> None:
    print()
    print(f"{'shape':<12} {'method':<28} {'rcv':>3} {'tensors':>8} {'GB':>7} {'best s':>8} {'GB/s':>7} {'median s':>9} "
          f"{'x memcpy':>8}  check")
    for row in rows:
        med = statistics.median(row.seconds) if row.seconds else float("nan")
        status = "ok" if row.verified and not row.error else f"FAIL {row.error}"
        paired = f"{row.paired_ratio:8.2f}" if row.paired_memcpy else f"{'':>8}"
        print(f"{row.shape:<12} {row.label():<28} {row.receivers:>3} {row.tensors:>8} {row.bytes / 1e9:>7.3f} "
              f"{row.best_s:>8.3f} {row.gbps:>7.2f} {med:>9.3f} {paired}  {status}")
    print("x memcpy: the median over versions of (NumPy memcpy of the same bytes, timed just before the version) / "
          "(the version's time)")
    print()
    print("ratios (weightstream at the default config; speed-up = peer time / weightstream time):")
    for e in rats:
        parts = [f"{k}={v:.2f}" for k, v in e.items() if isinstance(v, float)]
        print(f"  {e['shape']:<12} r={e['receivers']}  " + "  ".join(parts))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(11, 3.2 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        sel = [r for r in rows if r.shape == shape and r.seconds]
        labels = [f"{r.label()} r{r.receivers}" if r.receivers else r.label() for r in sel]
        colors = ["tab:gray" if r.method in LIMITS else "tab:green" if r.method == "weightstream" else "tab:red"
                  for r in sel]
        ax.barh(labels, [r.gbps for r in sel], color=colors)
        ax.set_title(f"{shape}: {sel[0].tensors if sel else 0} tensors, {sel[0].bytes / 1e9 if sel else 0:.2f} GB")
        ax.set_xlabel("GB/s (best version, end to end, verified)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the bench with ``argv`` (default: the command line); ``prog`` names it in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small preset: 256 MiB models, fewer configurations")
    ap.add_argument("--shapes", type=names(SHAPES), help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--methods", type=names(METHODS), help=f"comma list of {','.join(METHODS)}")
    ap.add_argument("--size-mib", type=SIZE_MIB, help="bytes of the large/transformer models")
    ap.add_argument("--receivers", type=RANKS, help="comma list, e.g. 1,2")
    ap.add_argument("--buckets", type=wholes(1, MAX_MIB, "16,64,256,1024"),
                    help="bucket sizes in MiB to sweep, e.g. 16,64,256,1024")
    ap.add_argument("--buffers", type=wholes(1, MAX_SLOTS, "1,2,3,4"), help="num_buffers to sweep, e.g. 1,2,3,4")
    ap.add_argument("--prefetch", type=wholes(1, MAX_RANKS, "1,2,4"), help="receiver prefetch depths to sweep, e.g. 1,2,4")
    ap.add_argument("--bucket-mib", type=whole(1, MAX_MIB), help="default bucket size (MiB)")
    ap.add_argument("--num-buffers", type=BUFFERS, help="default num_buffers")
    ap.add_argument("--versions", type=REPEATS, help="timed versions per run (after one warm-up)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    # a SIGTERM (e.g. timeout) unwinds through the runs' finally blocks: segments and receivers go
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = presets("quick" if args.quick else "full")
    if args.shapes:
        plan.shapes = args.shapes
    if args.methods:
        plan.methods = args.methods
    if args.size_mib:
        plan.size = args.size_mib * MiB
    if args.receivers:
        plan.receivers = args.receivers
    if args.buckets:
        plan.buckets = args.buckets
    if args.buffers:
        plan.buffers = args.buffers
    if args.prefetch:
        plan.prefetch = args.prefetch
    if args.bucket_mib:
        plan.default_bucket = args.bucket_mib
    if args.num_buffers:
        plan.default_buffers = args.num_buffers
    if args.versions:
        plan.versions = args.versions
    with segments_removed():
        return _run(plan, args.no_plot)


def _run(plan: Plan, no_plot: bool) -> int:
    t0 = time.perf_counter()
    rows = run_plan(plan)
    rats = ratios(rows, plan)
    print_table(rows, rats)
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = results / f"{stamp}.json"
    meta = {"python": sys.version.split()[0], "numpy": np.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "plan": asdict(plan), "wall_s": time.perf_counter() - t0}
    out.write_text(json.dumps({"meta": meta, "rows": [{**asdict(r), "gbps": r.gbps} for r in rows],
                               "ratios": rats}, indent=1))
    print(f"\nwrote {out}")
    if not no_plot:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    failed = [r for r in rows if not r.verified or r.error]
    if failed:
        print(f"{len(failed)} runs FAILED verification or errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
