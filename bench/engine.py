"""The engine's path (``load_weights`` over views) against this machine's two-copy limit.

    weightstream bench engine --quick     # 1 GiB x 64 and 100k x 4 KiB, 1 rank
    weightstream bench engine             # + 2 ranks, the 2 GiB transformer mix, torch views

From a checkout, ``python -m bench.engine`` runs the same with the same options.

Yardsticks, measured in the same run and interleaved with the project's rows (yardstick,
project, yardstick, ...):

- ``handoff``: the minimal two-process pipeline of bench/handoff.py, its slot size swept from
  1 to 256 MiB on every repeat and the slot size with the best median counted; with 2 ranks,
  its 2-reader variant (one writer, two readers each copying every slot out);
- ``memcpy``: one ``np.copyto`` of the same bytes in one process;
- ``floor``: the engine's own cost, the same ``load_weights`` loop over in-process tensors;
- ``floor[numpy,hot]`` (1 rank, tensors of 1 MiB and more): that loop when each tensor was written a moment
  before ``load_weights`` copies it, so it reads from the cache. No transport can hand an engine
  its views faster, so its ratio to ``handoff`` bounds the views rows' ratio from above.
- ``floor[numpy,busy]`` (1 rank): that loop over in-process tensors while another thread does
  the least any sender must, reading bytes from memory and writing them with streaming stores
  (a 256 MiB buffer over and over): the engine's copy when it shares the memory bandwidth with
  a sender, as a views rank does.
- ``handoff[S,whole]`` (when the best slot is smaller than the largest tensor): the same sweep's
  best slot among those that hold the largest tensor whole. A view is a whole tensor, so
  ``load_weights`` copies a tensor only once all its bytes are in; a transport of views
  pipelines in steps of at least a tensor, as the handoff does in steps of a slot. Its ratio to
  ``handoff`` bounds the views rows' ratio from above, with 1 rank and with 2; the direct-copy
  sink copies pieces as they come and is not bound by it.

Project rows push through shm (2 x 256 MiB buffers, prefetch 2) to ranks whose
``load_weights`` copies each NumPy view (``numpy``) or torch view (``torch``) into its own
parameter, and to ranks with the direct-copy sink (``direct``). Every version is verified
(xxh3 per tensor). Each row prints its median, its spread (min-max) and its ratio to its
yardstick: median yardstick / median row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from weightstream import BucketSender, synthetic
from weightstream.protocol.transports.shm.streaming import cpu_model

from . import engine_run, handoff, results_dir
from .options import RANKS, REPEATS, names, segments_removed
from .peers import harness

MiB = 1 << 20
GiB = 1 << 30
SHAPES = ("large", "small", "transformer")
MODES = ("numpy", "torch", "paddle", "direct")


def make_model(shape: str) -> synthetic.Model:
    if shape == "large":
        return synthetic.few_large(GiB, count=64)
    if shape == "small":
        return synthetic.many_small(100_000, 4096)
    if shape == "transformer":
        return synthetic.transformer_like(2 * GiB)
    raise SystemExit(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


@dataclass
class Row:
    shape: str
    name: str
    receivers: int
    seconds: list[float] = field(default_factory=list)
    yardstick: str = ""
    verified: bool = True
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def model_like(model: synthetic.Model, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays shaped like the model's tensors, laid over ``flat`` (one model's bytes, faulted in)."""
    out, at = {}, 0
    for name, a in model.tensors:
        out[name] = flat[at : at + a.nbytes].view(a.dtype).reshape(a.shape)
        at += a.nbytes
    return out


def floor_timer(model: synthetic.Model, mode: str, dest: dict[str, np.ndarray]) -> Any:
    """The engine's own loop over in-process tensors: what ``load_weights`` costs with no transport."""
    load = engine_run.LOADERS[mode](dest)
    items = list(model.tensors) if mode == "numpy" else engine_run.as_framework(mode, model.tensors)

    def timed() -> float:
        t0 = time.perf_counter()
        load(iter(items))
        return time.perf_counter() - t0

    return timed


def hot_floor_timer(model: synthetic.Model, dest: dict[str, np.ndarray]) -> Any:
    """The NumPy engine loop, each tensor copied into a scratch the size of the largest just before
    ``load_weights`` takes it (as a transport that delivers into the cache would); only the engine's
    copies are timed."""
    load = engine_run.numpy_loader(dest)
    scratch = np.ones(max(a.nbytes for _, a in model.tensors), np.uint8)

    def timed() -> float:
        spent = 0.0

        def fresh() -> Any:
            nonlocal spent
            for name, a in model.tensors:
                t = time.perf_counter()
                view = scratch[: a.nbytes].view(a.dtype).reshape(a.shape)
                np.copyto(view, a)
                spent += time.perf_counter() - t
                yield name, view

        t0 = time.perf_counter()
        load(fresh())
        return time.perf_counter() - t0 - spent

    return timed


BUSY_BYTES = 256 << 20  # the busy thread's buffers: larger than any cache, so it reads and writes memory
BUSY_PIECE = 4 << 20  # per copy call: it looks for the stop between pieces


def busy_floor_timer(model: synthetic.Model, dest: dict[str, np.ndarray]) -> Any:
    """The NumPy engine loop over in-process tensors while a second thread streams memory to
    memory with streaming stores, from before the loop starts until it ends; only the loop is
    timed. Both copies release the GIL, so the two run on two cores."""
    from weightstream import native

    load = engine_run.numpy_loader(dest)
    items = list(model.tensors)
    size = min(BUSY_BYTES, max(model.nbytes, BUSY_PIECE))
    src, dst = np.ones(size, np.uint8), np.ones(size, np.uint8)  # faulted in before any timing

    def timed() -> float:
        stop, started = threading.Event(), threading.Event()

        def busy() -> None:
            started.set()
            while not stop.is_set():
                for at in range(0, size, BUSY_PIECE):
                    native.copy(dst[at : at + BUSY_PIECE], src[at : at + BUSY_PIECE], True)
                    if stop.is_set():
                        return

        thread = threading.Thread(target=busy, name="floor-busy", daemon=True)
        thread.start()
        try:
            started.wait(10)
            t0 = time.perf_counter()
            load(iter(items))
            return time.perf_counter() - t0
        finally:
            stop.set()
            thread.join(10)

    return timed


HOT_MIN_BYTES = 1 << 20  # below this a tensor is cached either way, and the loop's cost is per tensor


# what a row's name says after its mode, and the environment both sides run it under (the
# sender's own process included: the C modules' switch is read at each call)
VARIANTS: dict[str, dict[str, str]] = {
    "": {},
    "pure": {"WEIGHTSTREAM_PURE_PYTHON": "1"},  # no C fast path at all (and so no ring)
    "nospans": {"WEIGHTSTREAM_PURE_PYTHON": "spans"},  # no C gather/scatter/copy (and so no ring)
    "nolayout": {"WEIGHTSTREAM_PURE_PYTHON": "layout"},  # no C layout checks
    "noring": {"WEIGHTSTREAM_RING_BYTES": "0"},
    "ring8M": {"WEIGHTSTREAM_RING_BYTES": str(8 << 20)},
    "nohot": {"WEIGHTSTREAM_HOT_BUCKET_BYTES": "0"},  # plain buckets up to bucket_bytes, not a quarter of the cache
    "stream": {"WEIGHTSTREAM_STREAMING_STORES": "1"},
    "nostream": {"WEIGHTSTREAM_STREAMING_STORES": "0"},
}


class variant:
    """Run a row under one of :data:`VARIANTS`, in this process and the ranks it spawns."""

    def __init__(self, name: str) -> None:
        self.env = VARIANTS[name]
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        from weightstream import native

        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        native.configure()

    def __exit__(self, *exc: object) -> None:
        from weightstream import native

        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        native.configure()


def run_shape(shape: str, receivers: int, modes: list[str], repeats: int, log: Any) -> list[Row]:
    model = make_model(shape)
    log(f"== {shape}: {len(model.tensors)} tensors, {model.nbytes / GiB:.3f} GiB, {receivers} rank(s)")
    sizes = handoff.slot_sizes(model.nbytes)
    sweep: dict[int, list[float]] = {s: [] for s in sizes}
    memcpy = Row(shape, "memcpy", 0)
    floors = {m: Row(shape, f"floor[{m}]", 0) for m in dict.fromkeys(spec.partition(":")[0] for spec in modes) if m != "direct"}
    if "numpy" in floors and receivers == 1 and max(a.nbytes for _, a in model.tensors) >= HOT_MIN_BYTES:
        floors["numpy,hot"] = Row(shape, "floor[numpy,hot]", 0)
    if "numpy" in floors and receivers == 1:
        floors["numpy,busy"] = Row(shape, "floor[numpy,busy]", 0)
    rows: list[Row] = []
    with handoff.Handoff(model.nbytes, readers=receivers) as pipe:
        for s in sizes:  # one warm-up lap
            pipe.run(s)

        def yardsticks(mode: str) -> float:
            for s in sizes:
                sweep[s].append(pipe.run(s))
            memcpy.seconds.append(memcpy_timer())
            for name in (mode, f"{mode},hot", f"{mode},busy"):
                if name in floors:
                    floors[name].seconds.append(floor_timers[name]())
            return 0.0

        flat = np.ones(model.nbytes, np.uint8)  # one destination for memcpy and the floors
        floor_timers = {mode: floor_timer(model, mode, model_like(model, flat)) for mode in floors if mode in MODES}
        if "numpy,hot" in floors:
            floor_timers["numpy,hot"] = hot_floor_timer(model, model_like(model, flat))
        if "numpy,busy" in floors:
            floor_timers["numpy,busy"] = busy_floor_timer(model, model_like(model, flat))
        memcpy_timer = handoff.memcpy_timer(model.nbytes, model.buffer.reshape(-1).view(np.uint8), flat)
        for spec in modes:
            mode, _, var = spec.partition(":")
            row = Row(shape, f"weightstream[{spec}]", receivers)
            bucket, buffers = 256 * MiB, 2

            def setup(workdir: str, n: int, bucket: int = bucket, buffers: int = buffers) -> BucketSender:
                return BucketSender(f"ipc://{workdir}/ws/s.sock", receivers=n, bucket_bytes=bucket,
                                    num_buffers=buffers, timeout=600.0)

            def send(sender: BucketSender, v: int) -> None:
                sender.push(model.tensors, version=f"v{v}")

            with variant(var):
                res = harness.run(engine_run.__name__, model, send, setup=setup, teardown=lambda s: s.close(),
                                  receivers=receivers, versions=repeats, options={"mode": mode, "prefetch": 2},
                                  paired=lambda mode=mode: yardsticks(mode))
            row.seconds, row.verified = res.seconds, res.verified and not res.mismatches
            row.error = res.error or (f"{res.mismatches} tensor digests mismatched" if res.mismatches else None)
            rows.append(row)
            log(f"   {row.name:<28} median {row.median * 1e3:8.1f} ms  {'ok' if row.verified else 'FAIL ' + str(row.error)}")
    medians = {s: statistics.median(t) for s, t in sweep.items() if t}
    best = min(medians, key=lambda s: medians[s])
    yard = Row(shape, f"handoff[{best >> 20}M]" + ("x2" if receivers > 1 else ""), receivers, seconds=sweep[best],
               extra={"slot_medians_ms": {f"{s >> 20}M": round(m * 1e3, 1) for s, m in medians.items()}})
    bounds = []
    fit = whole_slot(medians, max(a.nbytes for _, a in model.tensors))
    if fit is not None:
        bounds.append(Row(shape, f"handoff[{fit >> 20}M,whole]" + ("x2" if receivers > 1 else ""), receivers,
                          seconds=sweep[fit], yardstick=yard.name))
    for row in rows:  # many small tensors: the engine's own loop is the limit, not the bytes
        mode = row.name[len("weightstream[") : -1].partition(":")[0]
        floor = floors.get(mode) or floors.get("numpy")
        row.yardstick = floor.name if shape == "small" and floor else yard.name
    if "numpy,hot" in floors:
        floors["numpy,hot"].yardstick = yard.name  # the bound on the views rows' ratio
    if "numpy,busy" in floors:  # against what the views rows are measured against
        floors["numpy,busy"].yardstick = floors["numpy"].name if shape == "small" else yard.name
    out = [yard, *bounds, memcpy, *floors.values(), *rows]
    for row in out:
        row.extra["bytes"] = model.nbytes
    return out


def whole_slot(medians: dict[int, float], largest: int) -> int | None:
    """The handoff's best slot size among those that hold a ``largest``-byte tensor whole, given
    each slot size's median; None when the best slot overall already does (the views rows'
    yardstick is then their bound too) or when none does."""
    best = min(medians, key=lambda s: medians[s])
    whole = [s for s in medians if s >= largest]
    if best >= largest or not whole:
        return None
    return min(whole, key=lambda s: medians[s])


def ratio(row: Row, rows: list[Row]) -> float | None:
    for other in rows:
        if other.name == row.yardstick and other.shape == row.shape and other.seconds:
            return other.median / row.median
    return None


def print_table(rows: list[Row]) -> None:
    print()
    print(f"{'shape':<12} {'row':<28} {'rk':>2} {'median ms':>10} {'spread ms':>17} {'GB/s':>6} {'ratio':>6}  against")
    for row in rows:
        if not row.seconds:
            print(f"{row.shape:<12} {row.name:<28} {row.receivers:>2}  FAILED {row.error}")
            continue
        nbytes = row.extra.get("bytes", 0)
        r = ratio(row, rows)
        spread = f"{min(row.seconds) * 1e3:7.1f}-{max(row.seconds) * 1e3:7.1f}"
        gbps = f"{nbytes / row.median / 1e9:6.2f}" if nbytes else f"{'':>6}"
        print(f"{row.shape:<12} {row.name:<28} {row.receivers:>2} {row.median * 1e3:>10.1f} {spread:>17} {gbps} "
              f"{(f'{r:6.2f}' if r else ''):>6}  {row.yardstick}{'' if row.verified else '  FAIL'}")
        if "slot_medians_ms" in row.extra:
            print(f"{'':<12}   slot sweep (median ms): " + " ".join(f"{k}:{v}" for k, v in row.extra["slot_medians_ms"].items()))


def parse_modes(text: str) -> list[str]:
    """``--modes``: a comma list of MODE or MODE:VARIANT (MODE one of :data:`MODES`, VARIANT one of :data:`VARIANTS`)."""
    specs = [spec.partition(":") for spec in text.split(",")]
    names(MODES)(",".join(mode for mode, _, _ in specs))  # refuses an unknown mode, naming it
    unknown = [variant for _, colon, variant in specs if colon and (not variant or variant not in VARIANTS)]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected each MODE or MODE:VARIANT, VARIANT one of {','.join(v for v in VARIANTS if v)}, got "
            f"{', '.join(map(repr, unknown))} in {text!r}"
        )
    return text.split(",")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the bench with ``argv`` (default: the command line); ``prog`` names it in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="large and small, 1 rank, numpy and direct, 5 repeats")
    ap.add_argument("--shapes", type=names(SHAPES), help=f"comma list of {','.join(SHAPES)}")
    ap.add_argument("--modes", type=parse_modes, help=f"comma list of {','.join(MODES)}, each optionally with :VARIANT, "
                    "one of " + ",".join(v for v in VARIANTS if v) + " (e.g. direct:noring)")
    ap.add_argument("--receivers", type=RANKS, help="comma list of rank counts, e.g. 1,2")
    ap.add_argument("--repeats", type=REPEATS, help="timed repeats per row (after one warm-up)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shapes: list[str] = args.shapes or (["large", "small"] if args.quick else list(SHAPES))
    modes: list[str] = args.modes or (["numpy", "direct"] if args.quick else ["numpy", "torch", "direct"])
    receivers: list[int] = args.receivers or ([1] if args.quick else [1, 2])
    repeats: int = args.repeats or (5 if args.quick else 7)
    with segments_removed():
        return _run(shapes, modes, receivers, repeats)


def _run(shapes: list[str], modes: list[str], receivers: list[int], repeats: int) -> int:
    info = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"
    print(info)
    t0 = time.perf_counter()
    rows: list[Row] = []
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for shape in shapes:
        for r in receivers:
            if shape == "small" and r > 1:
                continue
            rows += run_shape(shape, r, modes, repeats, print)
            # written after each shape: a run cut short keeps what it measured
            out.write_text(json.dumps({"machine": info, "argv": sys.argv[1:], "wall_s": time.perf_counter() - t0,
                                       "rows": [asdict(r) | {"median": r.median} for r in rows]}, indent=1))
    print(info)
    print_table(rows)
    print(f"\nwrote {out}  ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r.verified for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
