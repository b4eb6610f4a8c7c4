"""The ``stager`` command: ``stager bench``, ``stager inspect FILE``, ``stager verify FILE``,
``stager release-shm DIR``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stager", description="Rust-accelerated checkpoint staging for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

    from .bench import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="side-by-side benchmark: stager vs PyTorch's stagers vs the machine's limits")
    add_bench_arguments(bench)

    inspect = commands.add_parser("inspect", help="print the keys, dtypes, shapes, sizes and metadata of a stager file")
    inspect.add_argument("file")
    verify = commands.add_parser("verify", help="check every checksum of a stager file; exit non-zero when damaged")
    verify.add_argument("file")
    release = commands.add_parser("release-shm", help="remove the shared-memory copies (survive_restart) of a "
                                  "storage_dir that no live process holds; prints the bytes freed")
    release.add_argument("storage_dir")

    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import run_from_args

        return run_from_args(args)
    from . import files, segments

    if args.command == "release-shm":
        freed = segments.release_shared_memory(args.storage_dir)
        print(f"released {freed} bytes of shared memory of {args.storage_dir} (in {segments.shm_dir()})")
        return 0
    if segments.is_segment(args.file):
        return segments.inspect_command(args.file, verify=args.command == "verify")
    if args.command == "inspect":
        return files.inspect_command(args.file)
    return files.verify_command(args.file)


if __name__ == "__main__":
    sys.exit(main())
