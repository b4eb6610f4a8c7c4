"""``stager bench``: stager vs PyTorch's own stagers vs the machine's limits, in one run.

The benchmark is split into sections, one module each (``staging``, ``persistence``,
``replication``, ``recovery``, ``incremental``, ``gpu``). Each exposes
``run(ctx: BenchContext) -> list[Row]``; a section whose module is missing, or that says it can't
run here (``SectionSkipped``), is reported and skipped.
All rows land in one table and one JSON file, with ratios to the limit and to PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback

from .common import BenchContext, Row, SectionSkipped, format_table, parse_size

__all__ = ["BenchContext", "Row", "SectionSkipped", "add_arguments", "run_from_args"]

SECTIONS = ["staging", "persistence", "replication", "recovery", "incremental", "gpu", "training"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="2GB", help="bytes of the synthetic transformer + Adam state_dict (default 2GB)")
    parser.add_argument("--tiny", type=int, default=20_000, help="tensors in the tiny-tensor workload (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per row; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="copy threads (default: all cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--dir", default=None, help="directory for files written by the benchmark (default: a temp dir)")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write the JSON results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_from_args(args: argparse.Namespace) -> int:
    ctx = BenchContext(
        size_bytes=parse_size(args.size),
        tiny_count=args.tiny,
        repeats=max(1, args.repeats),
        threads=args.threads,
        workdir=args.dir,
        progress=not args.no_progress,
    )
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    failed = False
    started = time.time()
    try:
        for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
            if name not in SECTIONS:
                print(f"unknown section {name!r}; known: {', '.join(SECTIONS)}", file=sys.stderr)
                return 2
            try:
                module = importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{__name__}.{name}":
                    raise
                skipped[name] = "not implemented in this build"
                continue
            ctx.log(f"== {name} ==")
            try:
                rows.extend(module.run(ctx))
            except SectionSkipped as reason:
                skipped[name] = str(reason)
            except Exception as err:  # one failed section must not lose the others' rows
                traceback.print_exc()
                skipped[name] = f"failed: {type(err).__name__}: {err}"
                failed = True
    finally:
        ctx.close()
    print(format_table(rows))
    for name, why in skipped.items():
        print(f"[{name}] skipped: {why}")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.time() - started, 1),
        "machine": ctx.machine(),
        "python": platform.python_version(),
        "settings": {"size_bytes": ctx.size_bytes, "tiny": ctx.tiny_count, "repeats": ctx.repeats, "threads": ctx.threads},
        "rows": [row.to_json(rows) for row in rows],
        "skipped": skipped,
    }
    if args.json:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0
