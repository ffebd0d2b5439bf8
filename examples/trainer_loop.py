"""A trainer loop that pushes its weights after every step, gathering one parameter at a time.

    python examples/trainer_loop.py --endpoint ipc:///tmp/ws-$UID/gpu0.sock --ranks 2 --steps 3 --shards 4

The trainer holds every parameter as ``--shards`` row blocks, as FSDP or tensor-parallel ranks
hold theirs, and never a whole copy of the model. Each push is lazy: ``push(gen(), specs=specs)``
with the full shapes known up front, and ``gen()`` gathers ONE parameter (its row blocks
concatenated), yields it and lets it go before gathering the next, so a push needs one gathered
parameter of memory, not a model's worth.

The weights are those of the small Hugging Face Llama in examples/model.py, sent by Hugging Face
name: start the ranks with examples/rank.py (loads by state-dict name) or examples/vllm_worker.py
(a vLLM-shaped engine: fused qkv_proj/gate_up_proj), before or after the trainer:

    python examples/rank.py --endpoint ipc:///tmp/ws-$UID/gpu0.sock --rank 0 --steps 3
    python examples/vllm_worker.py --endpoint ipc:///tmp/ws-$UID/gpu0.sock --rank 1 --steps 3

A failed push (a rank refused the version, died, or timed out) leaves every rank on the version it
committed before; the loop prints each rank's outcome from ``exc.report`` and trains on: the next
push carries every weight again. ``--max-failures`` failed pushes in a row end the run (exit 1).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from model import build_model  # examples/model.py, beside this script
from torch.multiprocessing.reductions import StorageWeakRef

from weightstream import BucketSender, ConfigError, PushReport, WeightstreamError

Specs = dict[str, tuple[str, tuple[int, ...]]]


class GatherTracker:
    """Counts gathered parameters whose memory is still alive, and the most at once.

    Tracked by storage, not by tensor object: a view of a tensor (the sender's byte view, say)
    keeps its memory alive after the tensor object itself is gone.
    """

    def __init__(self) -> None:
        self._live: list[tuple[StorageWeakRef, int]] = []
        self.peak_count = 0
        self.peak_bytes = 0

    def reset(self) -> None:
        self._prune()
        self.peak_count = self.peak_bytes = 0

    def gathered(self, tensor: torch.Tensor) -> None:
        self._prune()
        self._live.append((StorageWeakRef(tensor.untyped_storage()), tensor.nbytes))  # type: ignore[no-untyped-call]
        self.peak_count = max(self.peak_count, len(self._live))
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self._live))

    def alive(self) -> int:
        self._prune()
        return len(self._live)

    def _prune(self) -> None:
        self._live = [(ref, n) for ref, n in self._live if not ref.expired()]  # type: ignore[no-untyped-call]


class ShardedParams:
    """Each parameter as ``shards`` row blocks, each in its own memory (as on separate ranks)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], shards: int) -> None:
        if shards < 1:
            raise ConfigError(f"shards: expected >= 1, got {shards}; fix: e.g. --shards 4")
        self.shards: dict[str, list[torch.Tensor]] = {}
        self._specs: Specs = {}
        for name, tensor in named:
            data = tensor.detach()
            blocks = data.chunk(shards, dim=0) if data.dim() else (data,)
            self.shards[name] = [block.clone() for block in blocks]
            self._specs[name] = (str(data.dtype).removeprefix("torch."), tuple(data.shape))

    def specs(self) -> Specs:
        """``{name: (dtype, full shape)}`` in the order :meth:`gathered` yields them."""
        return dict(self._specs)

    def optimizer_step(self, step: int, lr: float = 1e-2) -> None:
        """A stand-in for a sharded optimizer step: each rank updates its own row blocks."""
        noise = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for blocks in self.shards.values():
                for block in blocks:
                    block.add_(torch.randn(block.shape, generator=noise, dtype=block.dtype), alpha=lr)

    def gathered(self, tracker: GatherTracker | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, full tensor)`` one parameter at a time (an all-gather under FSDP)."""
        for name, blocks in self.shards.items():
            full = torch.cat(blocks) if len(blocks) > 1 else blocks[0].clone()
            if tracker is not None:
                tracker.gathered(full)
            yield name, full
            del full  # the sender copied its bytes before asking for the next one


StepHook = Callable[[int, PushReport | None, ShardedParams, GatherTracker], None]


def run(
    endpoint: str, *, ranks: int, steps: int, shards: int, bucket_bytes: int = 64 << 20, timeout: float = 120.0,
    max_failures: int = 3, on_step: StepHook | None = None,
) -> int:
    """Train (a stand-in step) and push after every step; 0 when the last push committed, else 1.

    ``on_step(step, report, params, tracker)`` runs after every push, failed ones included
    (``report.committed`` False, or None when the push failed before it began).
    """
    params = ShardedParams(build_model(seed=0).named_parameters(), shards)  # the whole model is dropped here
    specs = params.specs()
    tracker = GatherTracker()
    failures = 0
    with BucketSender(endpoint, receivers=ranks, bucket_bytes=bucket_bytes, timeout=timeout) as sender:
        for step in range(1, steps + 1):
            params.optimizer_step(step)
            tracker.reset()
            report: PushReport | None
            try:
                report = sender.push(params.gathered(tracker), version=f"step_{step}", specs=specs)
            except WeightstreamError as exc:
                failures += 1
                report = exc.report
                print(f"step {step}: push failed ({failures} in a row): {type(exc).__name__}: {exc}", flush=True)
                for rank, result in sorted(report.receivers.items()) if report is not None else ():
                    print(f"  rank {rank}: {result.outcome} (model intact: {result.model_intact}) {result.error or ''}",
                          flush=True)
                if on_step is not None:
                    on_step(step, report, params, tracker)
                if failures >= max_failures:
                    return 1
                continue
            failures = 0
            print(f"step {step}: {report.bytes / 1e6:.2f} MB in {report.tensors} tensors, {report.buckets} bucket(s) "
                  f"to {len(report.receivers)} rank(s) in {report.seconds * 1e3:.0f} ms ({report.gbps:.2f} GB/s); "
                  f"gathered at most {tracker.peak_count} param(s) at once ({tracker.peak_bytes / 1e6:.2f} MB)", flush=True)
            for rank, result in sorted(report.receivers.items()):
                print(f"  rank {rank}: {result.outcome} via {result.transport}, {result.seconds * 1e3:.0f} ms", flush=True)
            if on_step is not None:
                on_step(step, report, params, tracker)
    return 0 if failures == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="ipc:///path/to/socket (a directory only you can reach)")
    ap.add_argument("--ranks", type=int, default=1, help="inference ranks each push waits for")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shards", type=int, default=4, help="row blocks per parameter (the trainer's FSDP/TP size)")
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a push may take, waiting for ranks included")
    ap.add_argument("--max-failures", type=int, default=3, help="failed pushes in a row before giving up")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return run(args.endpoint, ranks=args.ranks, steps=args.steps, shards=args.shards, bucket_bytes=args.bucket_mib << 20,
               timeout=args.timeout, max_failures=args.max_failures)


if __name__ == "__main__":
    raise SystemExit(main())
