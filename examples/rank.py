"""An inference rank that serves whatever step the trainer last committed.

    python examples/rank.py --endpoint ipc:///tmp/ws-$UID/gpu0.sock --rank 0 --steps 3

The model is built on the meta device (no memory, no init) and filled by the first push;
``TorchModuleSink`` loads by state-dict name, tied weights and buffers included.
"""

from __future__ import annotations

import argparse
import logging

import torch
from model import PROMPT, build_model  # examples/model.py, beside this script

from weightstream import ReceiverDaemon
from weightstream.receiver.sinks import TorchModuleSink


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3, help="serve until this step is committed")
    ap.add_argument("--meta", action="store_true", help="build the model on the meta device (filled by the first push)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = build_model(seed=None if args.meta else 100 + args.rank, meta=args.meta)
    with ReceiverDaemon(args.endpoint, TorchModuleSink(model), rank=args.rank) as daemon:
        for step in range(1, args.steps + 1):
            daemon.wait_for_version(f"step_{step}", timeout=120)
            with torch.no_grad():
                tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=4, do_sample=False, pad_token_id=0)
            # what it serves: step_{step}, or a newer step if it started after the trainer moved on
            print(f"rank {args.rank}: serving {daemon.committed_version} (model intact: {daemon.status.model_intact}); "
                  f"generated {tokens[0, len(PROMPT[0]):].tolist()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
