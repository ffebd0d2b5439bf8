"""End-to-end GPU weight update: weightstream cuda_ipc vs the copy limit vs per-tensor IPC handles.

A bf16 model of Llama-3-8B-like shapes, scaled by layer count to ``--gib``, lives on the GPU
of this (sender) process; one spawned receiver holds the same shapes on the GPU.

- weightstream: BucketSender(transport="cuda_ipc") -> ReceiverDaemon(TorchModuleSink).
- limit: in one process, params -> slot -> params with torch (two D2D copies of every byte).
- per-tensor handles: torch.multiprocessing.reductions.reduce_tensor per param, handles sent
  to the receiver, which rebuilds each tensor and copy_()s it (the usual colocated approach).

Usage: python bench/gpu_update.py [--gib 16] [--repeats 3] [--bucket-mib 512]
Smoke: python bench/gpu_update.py --gib 0.25 --repeats 1
Writes JSON to $OUT/gpu_update.json if OUT is set, else bench/results/gpu_update.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HIDDEN, INTER, VOCAB, KV = 4096, 14336, 128256, 1024  # Llama-3-8B


def model_shapes(gib: float) -> list[tuple[str, tuple[int, ...]]]:
    """Embedding + N decoder layers + head, N chosen so the total is about ``gib`` GiB of bf16."""
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


def build(shapes: list[tuple[str, tuple[int, ...]]], fill: bool) -> dict[str, Any]:
    import torch

    out = {}
    for name, shape in shapes:
        t = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
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


# --- receiver processes -------------------------------------------------------------------------


def ws_receiver(endpoint: str, gib: float, versions: list[str], done: Any) -> None:
    import torch

    from weightstream import ReceiverDaemon
    from weightstream.receiver.sinks import TorchModuleSink

    module = as_module(build(model_shapes(gib), fill=False))
    daemon = ReceiverDaemon(endpoint, TorchModuleSink(module), rank=0)
    daemon.start()
    try:
        for v in versions:
            daemon.wait_for_version(v, timeout=600)
        torch.cuda.synchronize()
        done.put("ok")
    finally:
        daemon.stop()


def handle_receiver(gib: float, inbox: Any, outbox: Any) -> None:
    import torch

    params = build(model_shapes(gib), fill=False)
    outbox.put("ready")
    while True:
        msg = inbox.get(timeout=600)  # a lost trainer fails the run rather than hanging it
        if msg is None:
            return
        for name, (rebuild, args) in msg:
            src = rebuild(*args)  # opens (or reuses, via torch's cache) the sender's IPC handle
            params[name].copy_(src)
            del src
        torch.cuda.synchronize()
        outbox.put("ok")


# --- measurements -------------------------------------------------------------------------------


def limit(params: dict[str, Any], bucket: int, repeats: int) -> list[float]:
    """params -> bucket-sized slot -> params, in one process: the two D2D copies a transport must do."""
    import torch

    slot = torch.empty(bucket, dtype=torch.uint8, device="cuda")
    dst = {n: torch.empty_like(t) for n, t in params.items()}
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for name, t in params.items():
            flat = t.view(-1).view(torch.uint8)
            for at in range(0, flat.numel(), bucket):
                piece = flat[at : at + bucket]
                slot[: piece.numel()].copy_(piece)
                dst[name].view(-1).view(torch.uint8)[at : at + piece.numel()].copy_(slot[: piece.numel()])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del dst, slot
    torch.cuda.empty_cache()
    return times[1:]  # the first run warms the allocator


def weightstream_run(params: dict[str, Any], gib: float, bucket: int, repeats: int) -> list[float]:
    from weightstream import BucketSender

    ctx = mp.get_context("spawn")
    versions = [f"v{i}" for i in range(repeats + 1)]
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='ws-bench-')}/sock/x.sock"
    done = ctx.Queue()
    proc = ctx.Process(target=ws_receiver, args=(endpoint, gib, versions, done), daemon=True)
    proc.start()
    times = []
    try:
        with BucketSender(endpoint, transport="cuda_ipc", bucket_bytes=bucket, timeout=600) as sender:
            sender.wait_for_receivers(timeout=300)
            for v in versions:
                report = sender.push(list(params.items()), v)
                times.append(report.seconds)
        done.get(timeout=120)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return times[1:]  # v0 warms up (first mapping, receiver allocator)


def handles_run(params: dict[str, Any], gib: float, repeats: int) -> list[float]:
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    ctx = torch.multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=handle_receiver, args=(gib, inbox, outbox), daemon=True)
    proc.start()
    times = []
    try:
        outbox.get(timeout=300)
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            inbox.put([(name, reduce_tensor(t)) for name, t in params.items()])
            outbox.get(timeout=600)
            times.append(time.perf_counter() - start)
        inbox.put(None)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=16.0, help="model size in GiB of bf16 (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per method (after one warm-up)")
    ap.add_argument("--bucket-mib", type=int, default=512, help="weightstream bucket size (MiB)")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: limit,weightstream,handles")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    skip = set(filter(None, args.skip.split(",")))
    bucket = args.bucket_mib << 20
    shapes = model_shapes(args.gib)
    params = build(shapes, fill=True)
    total = sum(t.numel() * t.element_size() for t in params.values())
    print(f"model: {len(params)} tensors, {total / (1 << 30):.2f} GiB bf16 on {torch.cuda.get_device_name()}")

    results: dict[str, list[float]] = {}
    if "limit" not in skip:
        results["limit (2 D2D copies, 1 process)"] = limit(params, bucket, args.repeats)
    if "weightstream" not in skip:
        results["weightstream cuda_ipc"] = weightstream_run(params, args.gib, bucket, args.repeats)
    if "handles" not in skip:
        results["per-tensor IPC handles"] = handles_run(params, args.gib, args.repeats)

    rows = []
    lim = statistics.median(next(iter(results.values()))) if "limit" not in skip else None
    print(f"\n{'method':36} {'median s':>9} {'GB/s':>8} {'x limit':>8}")
    for method, times in results.items():
        med = statistics.median(times)
        gbps = total / med / 1e9
        ratio = med / lim if lim else float("nan")
        print(f"{method:36} {med:9.3f} {gbps:8.1f} {ratio:8.2f}")
        rows.append({"method": method, "seconds": times, "median_s": med, "gbps": gbps, "x_limit": ratio})

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "gpu_update",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "bytes": total,
        "tensors": len(params),
        "bucket_bytes": bucket,
        "repeats": args.repeats,
        "results": rows,
    }
    (out_dir / "gpu_update.json").write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out_dir / 'gpu_update.json'}")


if __name__ == "__main__":
    main()
