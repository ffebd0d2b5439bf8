"""A trainer that pushes its model to inference ranks after every step.

    python examples/trainer.py --endpoint ipc:///tmp/ws-$UID/gpu0.sock --ranks 2 --steps 3

Start the ranks (examples/rank.py) before or after it: they connect to the sender and
reconnect on their own. Each push returns once every rank committed the step, or raises
with each rank's outcome in ``exc.report``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from model import build_model  # examples/model.py, beside this script

from weightstream import BucketSender, WeightstreamError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="ipc:///path/to/socket (a directory only you can reach)")
    ap.add_argument("--ranks", type=int, default=1, help="inference ranks to wait for")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bucket-mib", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = build_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with BucketSender(args.endpoint, receivers=args.ranks, bucket_bytes=args.bucket_mib << 20, timeout=120) as sender:
        for step in range(1, args.steps + 1):
            # one (fake) training step: the weights change
            loss = model(torch.randint(0, 64, (4, 8))).logits.float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            try:
                # the buffers too (rotary inv_freq): a rank built on the meta device has none of its own
                report = sender.push([*model.named_parameters(), *model.named_buffers()], version=f"step_{step}")
            except WeightstreamError as exc:
                print(f"step {step}: push failed: {exc}")
                for rank, result in (exc.report.receivers.items() if exc.report else ()):
                    print(f"  rank {rank}: {result.outcome} (model intact: {result.model_intact}) {result.error or ''}")
                return 1
            print(f"step {step}: {report.bytes / 1e6:.1f} MB in {report.tensors} tensors to "
                  f"{len(report.receivers)} rank(s) in {report.seconds * 1e3:.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
