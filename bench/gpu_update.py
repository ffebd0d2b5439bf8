"""End-to-end GPU weight update: weightstream cuda_ipc vs the copy limit vs per-tensor IPC handles.

A bf16 model of Llama-3-8B-like shapes, scaled by layer count to ``--gib``, lives on the GPU
of this (sender) process; a spawned receiver holds the same shapes on the GPU, allocated
before the first update (a preallocated model, as an inference engine holds it).

- limit: in one process, params -> bucket-sized slot -> params with torch (two D2D copies of
  every byte, what any transport through a shared slot must at least do).
- weightstream: BucketSender(transport="cuda_ipc") -> ReceiverDaemon(TorchModuleSink).
- per-tensor handles: torch.multiprocessing.reductions.reduce_tensor per param, handles sent
  to the receiver, which rebuilds each tensor and copy_()s it (the usual colocated approach).

All three run in the same process and the same run, so their ratios compare like with like.
Every version changes the first element of every tensor, and after the last one each
receiver's tensors are compared with the sender's (a device digest per tensor): a method that
moved the wrong bytes, or skipped a version, says ``bytes WRONG``.

Usage: python bench/gpu_update.py [--gib 16] [--repeats 3] [--bucket-mib 512] [--out DIR]
Smoke: python bench/gpu_update.py --gib 0.25 --repeats 1
CPU rehearsal of the plumbing (shm, host tensors, dimensions / 16; its figures mean nothing):
       python bench/gpu_update.py --device cpu --scale 16 --gib 0.02 --repeats 1 --bucket-mib 4
Writes gpu_update.json to --out, else to $OUT if set, else to bench/results/, after each method
(a run stopped by a time limit keeps what it measured, with "complete": false). Exits 1 if a
method failed or moved wrong bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

LLAMA3_8B = (4096, 14336, 128256, 1024)  # hidden, intermediate, vocabulary, key/value width

TRANSPORT = {"cuda": "cuda_ipc", "cpu": "shm"}
LIMIT = "limit (2 D2D copies, 1 process)"
WEIGHTSTREAM = "weightstream {transport}"
HANDLES = "per-tensor IPC handles"


def model_shapes(gib: float, scale: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Embedding + N decoder layers + head, N chosen so the total is about ``gib`` GiB of bf16.

    ``scale`` divides every dimension (CPU rehearsals); 1 is Llama-3-8B's."""
    HIDDEN, INTER, VOCAB, KV = (d // scale for d in LLAMA3_8B)
    layer = [
        ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        ("self_attn.k_proj.weight", (KV, HIDDEN)),
        ("self_attn.v_proj.weight", (KV, HIDDEN)),
        ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        ("mlp.gate_proj.weight", (INTER, HIDDEN)),
        ("mlp.up_proj.weight", (INTER, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, INTER)),
        ("input_layernorm.weight", (HIDDEN,)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
    ]
    per_layer = sum(2 * _numel(s) for _, s in layer)
    ends = 2 * 2 * VOCAB * HIDDEN + 2 * HIDDEN
    target = int(gib * (1 << 30))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if target >= ends + per_layer:
        shapes += [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN))]
        shapes.append(("model.norm.weight", (HIDDEN,)))
        layers = max(1, (target - ends) // per_layer)
    else:  # smoke sizes: layers only
        layers = max(1, target // per_layer)
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{n}", s) for n, s in layer]
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def build(shapes: list[tuple[str, tuple[int, ...]]], fill: bool, device: str) -> dict[str, Any]:
    import torch

    out = {}
    for name, shape in shapes:
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        if fill:
            t.uniform_(-1, 1)
        out[name] = t
    return out


def as_module(params: dict[str, Any]) -> Any:
    import torch

    root = torch.nn.Module()
    for name, t in params.items():
        owner = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def mark(params: dict[str, Any], version: int) -> None:
    """Make version ``version`` differ from the others in every tensor (its first element)."""
    for t in params.values():
        t.view(-1)[:1].fill_(float(version + 1))  # small integers are exact in bf16


def digests(tensors: dict[str, Any]) -> dict[str, int]:
    """A 64-bit digest per tensor: weightstream's device digest on the GPU, xxh3 on the host."""
    import torch

    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.device.type == "cuda":
            from weightstream.protocol.transports.cuda_ipc.slots import device_digest

            torch.cuda.synchronize()
            out[name] = device_digest(t.data_ptr(), t.numel() * t.element_size(), t.device.index)
        else:
            import xxhash

            out[name] = xxhash.xxh3_64_intdigest(t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def compare(want: dict[str, int], got: dict[str, int]) -> str | None:
    """None if equal, else what differs (a few names)."""
    bad = sorted(n for n in want.keys() | got.keys() if want.get(n) != got.get(n))
    return None if not bad else f"{len(bad)} of {len(want)} tensors differ, e.g. {bad[:3]}"


# --- receiver processes -------------------------------------------------------------------------


def ws_receiver(
    endpoint: str, shapes: list[tuple[str, tuple[int, ...]]], device: str, versions: list[str], done: Any
) -> None:
    try:
        from weightstream import ReceiverDaemon
        from weightstream.receiver.sinks import TorchModuleSink

        params = build(shapes, fill=False, device=device)  # allocated before the first update
        module = as_module(params)
        daemon = ReceiverDaemon(endpoint, TorchModuleSink(module), rank=0)
        daemon.start()
        try:
            # only the last: the sender pushes back to back, so an earlier one may already be
            # superseded by the time this thread looks (pushes are ordered; the last implies all)
            daemon.wait_for_version(versions[-1], timeout=600)
            sync(device)
            done.put(("ok", digests(dict(module.state_dict()))))
        finally:
            daemon.stop()
    except BaseException:  # reported to the sender, which fails the method with it
        done.put(("error", traceback.format_exc()))


def handle_receiver(shapes: list[tuple[str, tuple[int, ...]]], device: str, inbox: Any, outbox: Any) -> None:
    try:
        params = build(shapes, fill=False, device=device)
        outbox.put(("ready", None))
        while True:
            msg = inbox.get(timeout=600)  # a lost trainer fails the run rather than hanging it
            if msg is None:
                outbox.put(("ok", digests(params)))
                return
            for name, (rebuild, args) in msg:
                src = rebuild(*args)  # opens (or reuses, via torch's cache) the sender's IPC handle
                params[name].copy_(src)
                del src
            sync(device)
            outbox.put(("applied", None))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


def _get(box: Any, proc: Any, timeout: float, what: str) -> tuple[str, Any]:
    """The next message from a receiver; fails at once if it died or reported an error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            kind, value = box.get(timeout=0.5)
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the receiver process exited (code {proc.exitcode}) while the sender waited for {what}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} from the receiver within {timeout:.0f}s") from None
            continue
        if kind == "error":
            raise RuntimeError(f"the receiver failed:\n{value}")
        return kind, value


def _stop(proc: Any) -> None:
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=10)


# --- measurements -------------------------------------------------------------------------------


def limit(params: dict[str, Any], device: str, bucket: int, repeats: int) -> tuple[list[float], str | None]:
    """params -> bucket-sized slot -> params, in one process: the two D2D copies a transport must do."""
    import torch

    slot = torch.empty(bucket, dtype=torch.uint8, device=device)
    dst = {n: torch.empty_like(t) for n, t in params.items()}
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for name, t in params.items():
            flat = t.view(-1).view(torch.uint8)
            out = dst[name].view(-1).view(torch.uint8)
            for at in range(0, flat.numel(), bucket):
                piece = flat[at : at + bucket]
                slot[: piece.numel()].copy_(piece)
                out[at : at + piece.numel()].copy_(slot[: piece.numel()])
        sync(device)
        times.append(time.perf_counter() - start)
    wrong = [n for n, t in params.items() if not torch.equal(t, dst[n])]
    del dst, slot
    if device == "cuda":
        torch.cuda.empty_cache()
    return times[1:], (f"{len(wrong)} tensors differ, e.g. {wrong[:3]}" if wrong else None)  # run 0 warms up


def weightstream_run(
    params: dict[str, Any], shapes: list[tuple[str, tuple[int, ...]]], device: str, bucket: int, repeats: int
) -> tuple[list[float], str | None]:
    from weightstream import BucketSender, PeerTimeout

    ctx = mp.get_context("spawn")
    versions = [f"v{i}" for i in range(repeats + 1)]
    tmp = tempfile.mkdtemp(prefix="ws-bench-")  # 0700, ours: the endpoint's directory is checked
    endpoint = f"ipc://{tmp}/sock/x.sock"
    done = ctx.Queue()
    proc = ctx.Process(target=ws_receiver, args=(endpoint, shapes, device, versions, done), daemon=True)
    proc.start()
    times = []
    try:
        with BucketSender(endpoint, transport=TRANSPORT[device], bucket_bytes=bucket, timeout=600) as sender:
            deadline = time.monotonic() + 300
            while True:  # the receiver allocates its model first; fail fast if it died doing so
                try:
                    sender.wait_for_receivers(timeout=1.0)
                    break
                except PeerTimeout:
                    if proc.is_alive() and time.monotonic() < deadline:
                        continue
                    try:
                        kind, value = done.get_nowait()
                    except queue_mod.Empty:
                        kind, value = "", ""
                    why = (
                        value
                        if kind == "error"
                        else (f"it exited with code {proc.exitcode}" if not proc.is_alive() else "timed out after 300s")
                    )
                    raise RuntimeError(f"the receiver never connected: {why}") from None
            for i, v in enumerate(versions):
                mark(params, i)
                report = sender.push(list(params.items()), v)
                times.append(report.seconds)
            _, got = _get(done, proc, 300, "its digests")
        wrong = compare(digests(params), got)
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return times[1:], wrong  # v0 warms up (first mapping, receiver allocator)


def handles_run(
    params: dict[str, Any], shapes: list[tuple[str, tuple[int, ...]]], device: str, repeats: int
) -> tuple[list[float], str | None]:
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = torch.multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=handle_receiver, args=(shapes, device, inbox, outbox), daemon=True)
    proc.start()
    times = []
    try:
        _get(outbox, proc, 300, "ready")
        for i in range(repeats + 1):
            mark(params, i)
            sync(device)
            start = time.perf_counter()
            inbox.put([(name, reduce_tensor(t)) for name, t in params.items()])
            _get(outbox, proc, 600, "an applied version")
            times.append(time.perf_counter() - start)
        inbox.put(None)
        _, got = _get(outbox, proc, 300, "its digests")
        wrong = compare(digests(params), got)
    finally:
        _stop(proc)
    return times[1:], wrong


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=16.0, help="model size in GiB of bf16 (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per method (after one warm-up)")
    ap.add_argument("--bucket-mib", type=int, default=512, help="weightstream bucket size (MiB)")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: limit,weightstream,handles")
    ap.add_argument("--out", default=None, help="folder for gpu_update.json (default: $OUT, else bench/results)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: rehearse the plumbing on a CPU machine (shm, host tensors); its figures mean nothing")  # fmt: skip
    ap.add_argument("--scale", type=int, default=1, help="divide every model dimension by this (CPU rehearsals)")
    args = ap.parse_args()

    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--device cpu rehearses it)", file=sys.stderr)
        return 1
    skip = set(filter(None, args.skip.split(",")))
    bucket = args.bucket_mib << 20
    shapes = model_shapes(args.gib, args.scale)
    params = build(shapes, fill=True, device=device)
    total = sum(t.numel() * t.element_size() for t in params.values())
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        free, whole = torch.cuda.mem_get_info()
        room = f"{free / (1 << 30):.1f} of {whole / (1 << 30):.1f} GiB free after it"
    else:
        gpu, room = f"CPU REHEARSAL ({platform.processor() or platform.machine()})", "host memory"
    print(f"model: {len(params)} tensors, {total / (1 << 30):.2f} GiB bf16 on {gpu} ({room}; each method "
          f"needs about {(total + 2 * bucket) / (1 << 30):.1f} GiB more)", flush=True)  # fmt: skip

    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "bench": "gpu_update",
        "gpu": gpu,
        "device": device,
        "torch": torch.__version__,
        "host": platform.node(),
        "bytes": total,
        "tensors": len(params),
        "bucket_bytes": bucket,
        "repeats": args.repeats,
        "results": [],
        "ratios": {},
        "complete": False,
    }

    def save() -> None:
        (out_dir / "gpu_update.json").write_text(json.dumps(doc, indent=2))

    methods = [
        ("limit", LIMIT, lambda: limit(params, device, bucket, args.repeats)),
        (
            "weightstream",
            WEIGHTSTREAM.format(transport=TRANSPORT[device]),
            lambda: weightstream_run(params, shapes, device, bucket, args.repeats),
        ),
        ("handles", HANDLES, lambda: handles_run(params, shapes, device, args.repeats)),
    ]
    medians: dict[str, float] = {}
    ok = True
    print(f"\n{'method':36} {'median s':>9} {'GB/s':>8} {'x limit':>8}  bytes", flush=True)
    for key, method, run in methods:
        if key in skip:
            continue
        started = time.perf_counter()
        try:
            times, wrong = run()
        except Exception as exc:  # one method failing must not lose the others' figures
            ok = False
            print(f"{method:36} FAILED after {time.perf_counter() - started:.1f}s: {exc}", flush=True)
            traceback.print_exc()
            doc["results"].append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
            save()
            continue
        med = statistics.median(times)
        medians[key] = med
        lim = medians.get("limit")
        ratio = med / lim if lim else float("nan")
        ok = ok and wrong is None
        print(f"{method:36} {med:9.4f} {total / med / 1e9:8.1f} {ratio:8.2f}  {'ok' if wrong is None else 'WRONG: ' + wrong}",
              flush=True)  # fmt: skip
        doc["results"].append({
            "method": method, "seconds": times, "median_s": med, "gbps": total / med / 1e9,
            "x_limit": ratio if lim else None, "verified": wrong is None, "mismatch": wrong,
        })  # fmt: skip
        save()
    if "limit" in medians:
        for key, name in (("weightstream", "weightstream_x_limit"), ("handles", "handles_x_limit")):
            if key in medians:
                doc["ratios"][name] = medians[key] / medians["limit"]
    if "weightstream" in medians and "handles" in medians:
        doc["ratios"]["weightstream_speedup_vs_handles"] = medians["handles"] / medians["weightstream"]
    for name, value in doc["ratios"].items():
        print(f"{name}: {value:.2f}")
    doc["complete"] = True
    save()
    print(f"\nwrote {out_dir / 'gpu_update.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
