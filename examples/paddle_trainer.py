"""A Paddle trainer for examples/fastdeploy_rank.py: trains a main model and its MTP draft and pushes
both after every step, the draft's tensors under ``mtp.``.

    python examples/paddle_trainer.py --endpoint ipc:///tmp/ws-$UID/fd.sock --model-dir /tmp/fd/model \\
        --trainer-dir /tmp/fd/trainer --ranks 1 --steps 3

Start it first: unless the model dir already has a ``version.yaml``, it writes the checkpoint the
ranks start from there (step 0, the seed-0 weights it trains from). After each step it writes
``version.yaml`` (``step: N``) in ``--trainer-dir``, as a FastDeploy RL trainer does, and
``push`` takes the version from there (``BucketSender(model_dir=...)``). A failed push prints each
rank's outcome from ``exc.report`` and ends the run (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml
from paddle_model import VOCAB, MainModel, MTPDraft, build_models, named_tensors, write_model_dir

from weightstream import BucketSender, WeightstreamError

ModelHook = Callable[[int, MainModel, MTPDraft], None]


def train_step(main: MainModel, draft: MTPDraft, optimizer: paddle.optimizer.Optimizer, step: int) -> float:
    """One step on random tokens: the main model predicts the next token, the draft the one after."""
    ids = paddle.to_tensor(np.random.default_rng(step).integers(0, VOCAB, (4, 12)), dtype="int64")
    logits, hidden = main(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape([-1, VOCAB]), ids[:, 1:].reshape([-1, 1]))
    draft_logits = draft(main, hidden[:, :-2], ids[:, 1:-1])
    loss = loss + F.cross_entropy(draft_logits.reshape([-1, VOCAB]), ids[:, 2:].reshape([-1, 1]))
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return float(loss)


def write_step(directory: Path, step: int) -> None:
    """``directory/version.yaml`` = ``step: N``, replaced atomically (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".version.", dir=directory)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"step": step}, f)
    os.replace(tmp, directory / "version.yaml")


def run(
    endpoint: str, *, model_dir: Path, trainer_dir: Path, ranks: int, steps: int, timeout: float = 120.0,
    on_ready: ModelHook | None = None, on_step: ModelHook | None = None,
) -> int:
    """Write the model dir if needed, then train and push ``steps`` steps; 0 when all committed.
    ``on_ready(0, main, draft)`` runs once the model dir exists, ``on_step(step, ...)`` after each push."""
    main, draft = build_models(seed=0)
    if not (model_dir / "version.yaml").is_file():
        write_model_dir(model_dir, main, draft, step=0, ranks=ranks)
        print(f"wrote the model dir {model_dir} (step 0) for {ranks} rank(s)", flush=True)
    optimizer = paddle.optimizer.SGD(learning_rate=0.05, parameters=[*main.parameters(), *draft.parameters()])
    if on_ready is not None:
        on_ready(0, main, draft)
    with BucketSender(endpoint, receivers=ranks, model_dir=trainer_dir, timeout=timeout) as sender:
        for step in range(1, steps + 1):
            loss = train_step(main, draft, optimizer, step)
            write_step(trainer_dir, step)
            try:
                report = sender.push(named_tensors(main, draft))  # version: step of trainer_dir/version.yaml
            except WeightstreamError as exc:
                print(f"step {step}: push failed: {type(exc).__name__}: {exc}", flush=True)
                for rank, result in sorted(exc.report.receivers.items()) if exc.report is not None else ():
                    print(f"  rank {rank}: {result.outcome} (model intact: {result.model_intact}) {result.error or ''}")
                return 1
            print(f"step {step}: loss {loss:.3f}; version {report.version}: {report.bytes / 1e6:.2f} MB in "
                  f"{report.tensors} tensors to {len(report.receivers)} rank(s) in {report.seconds * 1e3:.0f} ms", flush=True)
            if on_step is not None:
                on_step(step, main, draft)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="ipc:///path/to/socket (a directory only you can reach)")
    ap.add_argument("--model-dir", type=Path, required=True, help="the checkpoint the ranks start from (written if missing)")
    ap.add_argument("--trainer-dir", type=Path, required=True, help="where the trainer writes version.yaml each step")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a push may take, waiting for ranks included")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return run(args.endpoint, model_dir=args.model_dir, trainer_dir=args.trainer_dir, ranks=args.ranks,
               steps=args.steps, timeout=args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
