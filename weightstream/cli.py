"""``weightstream`` command line: ``weightstream demo`` streams a synthetic model and verifies it."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream a synthetic model to receiver processes and verify every byte")
    demo.add_argument("--size-gib", type=float, default=1.0, help="model size in GiB (default 1)")
    demo.add_argument("--receivers", type=int, default=2, help="receiver processes (default 2)")
    demo.add_argument("--versions", type=int, default=3, help="versions to push (default 3)")
    demo.add_argument("--bucket-mib", type=int, default=256, help="bucket size in MiB (default 256)")
    demo.add_argument("--buffers", type=int, default=2, help="bucket slots in flight (default 2)")
    demo.add_argument("--framework", choices=("numpy", "torch", "paddle"), default="numpy",
                      help="tensor type handed to push (default numpy)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        if args.size_gib <= 0 or args.receivers < 1 or args.versions < 1 or args.bucket_mib < 1 or args.buffers < 1:
            print("demo: expected --size-gib > 0 and --receivers/--versions/--bucket-mib/--buffers >= 1", file=sys.stderr)
            return 2
        cfg = DemoConfig(args.size_gib, args.receivers, args.versions, args.bucket_mib, args.buffers, args.framework, args.seed)
        return run_demo(cfg)
    return 2


if __name__ == "__main__":
    sys.exit(main())
