"""What ``checksum=True`` costs a push: the same model pushed with and without it, in one run.

With checksums the sender digests each bucket (xxh3) once, and each rank digests it twice:
when it arrives, and again after its tensors were applied, before the ACK. Buckets then fill
whole slots (no ring: the digest needs the whole bucket at once). Runs alternate between the
two settings so that a drift of the host's memory bandwidth hits both alike.

    weightstream bench checksum-cost --size-mib 1024 --receivers 1 --rounds 3

From a checkout, ``python -m bench.checksum_cost`` runs the same with the same options.
"""

from __future__ import annotations

import argparse
import statistics

from weightstream import synthetic
from weightstream.protocol.transports.shm.streaming import cpu_model

from . import ws_run
from .options import BUFFERS, MAX_MIB, MAX_RANKS, REPEATS, SIZE_MIB, segments_removed, whole
from .peers import harness

MiB = 1 << 20


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the bench with ``argv`` (default: the command line); ``prog`` names it in usage and errors."""
    ap = argparse.ArgumentParser(prog=prog or "python -m bench.checksum_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=SIZE_MIB, default=1024, help="bytes of the transformer-like model")
    ap.add_argument("--bucket-mib", type=whole(1, MAX_MIB), default=256)
    ap.add_argument("--buffers", type=BUFFERS, default=2)
    ap.add_argument("--receivers", type=whole(1, MAX_RANKS), default=1)
    ap.add_argument("--rounds", type=REPEATS, default=3, help="alternating runs of each setting")
    ap.add_argument("--versions", type=REPEATS, default=3, help="timed versions per run (after one warm-up)")
    args = ap.parse_args(argv)
    with segments_removed():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    model = synthetic.transformer_like(args.size_mib * MiB)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for checksum in (False, True):
            res = harness.run(
                ws_run.__name__, model, ws_run.make_sender(model),
                setup=ws_run.make_setup(args.bucket_mib * MiB, args.buffers, checksum), teardown=ws_run.teardown,
                receivers=args.receivers, versions=args.versions,
            )
            if not res.verified:
                print(f"checksum={checksum}: FAILED ({res.error or f'{res.mismatches} tensors differ'})")
                return 1
            times[checksum].extend(res.seconds)
    gb = model.nbytes / 1e9
    print(f"CPU: {cpu_model()}; {gb:.3f} GB in {len(model.tensors)} tensors, {args.receivers} receiver(s), "
          f"{args.bucket_mib} MiB x {args.buffers} buckets; every byte verified")
    for checksum in (False, True):
        t = times[checksum]
        print(f"  checksum={checksum!s:<5}  best {min(t) * 1e3:7.1f} ms  median {statistics.median(t) * 1e3:7.1f} ms  "
              f"({gb / min(t):.2f} GB/s best)")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"  checksum=True takes {ratio:.2f}x the time of checksum=False (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
