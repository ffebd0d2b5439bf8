"""A FastDeploy-style Paddle inference rank: a main model and an MTP draft, updated by the trainer,
snapshotted on every commit and restored from the newest snapshot when it restarts.

    python examples/paddle_trainer.py --endpoint ipc:///tmp/ws-$UID/fd.sock --model-dir /tmp/fd/model \\
        --trainer-dir /tmp/fd/trainer --steps 3                        # first: it writes the model dir
    python examples/fastdeploy_rank.py --endpoint ipc:///tmp/ws-$UID/fd.sock --model-dir /tmp/fd/model \\
        --snapshot-dir /tmp/fd/snapshots --rank 0 --steps 3

One stream feeds both models: ``PrefixRouter({"mtp.": draft}, default=main)`` sends the
trainer's ``mtp.*`` tensors to the draft (prefix stripped) and the rest to the main model, and a
``Tee`` also hands every tensor to a ``SnapshotWriter``, which publishes each committed version
under ``--snapshot-dir`` atomically (safetensors parts, then ``version.yaml``).

On start the rank builds its models without data (``paddle.LazyGuard``) and bootstraps before it
connects: it reads ``step`` from ``version.yaml`` in the model dir and restores the newest
snapshot with ``daemon.restore(snapshot_dir)`` when there is one at least that new (a restart,
even after ``kill -9``), else the model dir's own weights. No sender is needed for either. Then it
serves the trainer's pushes (versions are the trainer's steps, as ``version.yaml`` says them).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import yaml
from paddle_model import MainModel, MTPDraft, build_models  # examples/paddle_model.py, beside this script
from rich.console import Console
from rich.progress import DownloadColumn, Progress

from weightstream import ReceiverDaemon, WeightstreamError
from weightstream.receiver.sinks import PaddleLayerSink, PrefixRouter
from weightstream.receiver.snapshot_writer import SnapshotWriter, Tee

VersionHook = Callable[[str, MainModel, MTPDraft], None]


def read_step(directory: Path) -> str:
    """``step`` of ``directory/version.yaml`` (FastDeploy's convention), as a version string."""
    path = directory / "version.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WeightstreamError(
            f"{path}: expected a readable YAML file with 'step: N', got {type(exc).__name__}: {exc}; "
            "fix: point --model-dir at a model dir (examples/paddle_trainer.py writes one)"
        ) from None
    if not isinstance(data, dict) or isinstance(data.get("step"), bool) or not isinstance(data.get("step"), (int, str)):
        raise WeightstreamError(f"{path}: expected a mapping with 'step: N', got {data!r}; fix: write 'step: 0'")
    return str(data["step"])


def _newer_or_same(a: str, b: str) -> bool:
    return int(a) >= int(b) if a.isdigit() and b.isdigit() else a == b


def bootstrap(daemon: ReceiverDaemon, model_dir: Path, snapshot_dir: Path) -> tuple[str, str]:
    """Load the newest weights this rank can find without a sender; return (their version, where from).
    On a terminal a progress bar follows the restore by bytes (``restore(progress=...)``)."""
    base = read_step(model_dir)
    if (snapshot_dir / "version.yaml").is_file() and _newer_or_same(read_step(snapshot_dir), base):
        where, source = snapshot_dir, "snapshot"  # the newest committed version
    else:
        where, source = model_dir, "model dir"  # the checkpoint every rank starts from
    # (a restore skips the Tee's SnapshotWriter: what it reads is on disk already)
    console = Console(stderr=True)
    if not console.is_terminal:
        return daemon.restore(where), source
    with Progress(*Progress.get_default_columns(), DownloadColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"restoring from the {source}", total=None)
        return daemon.restore(where, progress=lambda done, total: bar.update(task, completed=done, total=total)), source


def run(
    endpoint: str, *, rank: int, model_dir: Path, snapshot_dir: Path, steps: int, timeout: float = 120.0,
    on_version: VersionHook | None = None,
) -> int:
    """Bootstrap, then serve until version ``steps`` is committed. ``on_version(version, main, draft)``
    runs after the bootstrap (before the rank connects) and after each committed version."""
    main, draft = build_models(seed=None, lazy=True)
    with SnapshotWriter(snapshot_dir, rank) as writer:
        sink = Tee(PrefixRouter({"mtp.": PaddleLayerSink(draft)}, default=PaddleLayerSink(main)), writer)
        daemon = ReceiverDaemon(endpoint, sink, rank=rank)
        version, source = bootstrap(daemon, model_dir, snapshot_dir)
        print(f"rank {rank}: bootstrapped step {version} from the {source} "
              f"(model intact: {daemon.status.model_intact})", flush=True)
        if on_version is not None:
            on_version(version, main, draft)
        if not version.isdigit():
            raise WeightstreamError(
                f"rank {rank}: expected a step number as the version, got {version!r}; fix: 'step: N' in version.yaml"
            )
        with daemon:
            for step in range(int(version) + 1, steps + 1):
                daemon.wait_for_version(str(step), timeout)
                print(f"rank {rank}: serving step {step} (model intact: {daemon.status.model_intact})", flush=True)
                if on_version is not None:
                    on_version(str(step), main, draft)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="the trainer's ipc:// endpoint")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, required=True, help="version.yaml and the starting weights")
    ap.add_argument("--snapshot-dir", type=Path, required=True, help="this rank's snapshots (created if missing)")
    ap.add_argument("--steps", type=int, default=3, help="serve until this step is committed")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return run(args.endpoint, rank=args.rank, model_dir=args.model_dir, snapshot_dir=args.snapshot_dir,
               steps=args.steps, timeout=args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
