#!/usr/bin/env python3
"""Bounded mutation fuzzer for the stager file reader (header parser, metadata, tree decoding).

CI runs it for a few seconds (.ci/run); longer runs by hand. Runs for ``--seconds`` (default 60): mutates valid stager files (byte flips,
truncations, splices, and structure-aware edits of the JSON header and of the tree metadata,
re-framed with a correct length so they reach the deeper checks), and loads each one in a child
process with ``stager.load``. A finding is any of:

* an exception that is not ``stager.StagerError`` (e.g. a ``KeyError`` or ``IndexError`` leaking
  out of validation),
* the child dying (a crash, an abort, a Rust panic crossing into Python),
* one input taking longer than ``--hang`` seconds,
* the child's peak memory growing past ``--max-rss-mb``,
* ``load()``'s backstop catching an exception that ``tree.decode``'s validation missed,
* a file that loads although it was damaged where a checksum or a validity check should catch it
  (counted, not a finding: many mutations are harmless, e.g. in header padding).

Findings are written to ``--out`` (default ``fuzz-findings/``) with the input that caused them.

    python scripts/fuzz_header.py --seconds 300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback


def seeds() -> list[bytes]:
    import torch

    import stager

    base = torch.arange(64, dtype=torch.float32)
    dicts = [
        {},
        {"w": torch.randn(4, 4), "b": torch.zeros(4)},
        {"model": {"w": torch.randn(8, 3, dtype=torch.bfloat16)}, "views": [base[2:9], base[::5], base], "step": 3,
         "name": "x", "t": (1.5, None, b"\x00"), "c": torch.randn(3, dtype=torch.complex64).conj()},
        {"ints": [torch.arange(5, dtype=torch.int64), torch.ones(2, 2, dtype=torch.bool)], "nested": {"a": {"b": [1, 2.0]}}},
    ]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, sd in enumerate(dicts):
            path = os.path.join(d, f"{i}.safetensors")
            stager.save(sd, path)
            with open(path, "rb") as f:
                out.append(f.read())
    return out


INTERESTING = [0, 1, -1, 2**31, 2**32, 2**53, 2**63, 2**64, -(2**63), 10**30, 1.5, -0.0, "", "x" * 300, None, True, [], {}, [[]]]


def pick(rng: random.Random):
    return json.loads(json.dumps(rng.choice(INTERESTING)))  # a fresh copy: never shared, never cyclic


def mutate_value(rng: random.Random, value, depth: int = 0):
    if depth > 6:
        return pick(rng)
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.1:
            del value[key]
        elif roll < 0.2:
            value[key + rng.choice(["", "_", "\u0000"])] = pick(rng)
        else:
            value[key] = mutate_value(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.1:
            value.pop(index)
        elif roll < 0.2:
            value.insert(index, pick(rng))
        elif roll < 0.25:
            value.append(json.loads(json.dumps(value[index])))
        else:
            value[index] = mutate_value(rng, value[index], depth + 1)
        return value
    if isinstance(value, str) and value.startswith(("{", "[")) and rng.random() < 0.7:
        try:
            inner = json.loads(value)
        except ValueError:
            return value
        return json.dumps(mutate_value(rng, inner, depth + 1))
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value + rng.choice([-1, 1, -64, 64, 4096])
    return pick(rng)


def frame(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def mutate(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.random()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind < 0.55:
        header = json.loads(raw[8 : 8 + n])
        for _ in range(rng.randint(1, 3)):
            header = mutate_value(rng, header)
        return frame(json.dumps(header).encode(), raw[8 + n :])
    out = bytearray(raw)
    if kind < 0.75:
        for _ in range(rng.randint(1, 8)):
            # mostly in the header, sometimes in the data
            limit = 8 + n if rng.random() < 0.8 else len(out)
            out[rng.randrange(limit)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind < 0.85:
        return bytes(out[: rng.randrange(len(out) + 1)])
    if kind < 0.92:
        at = rng.randrange(len(out) + 1)
        return bytes(out[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + out[at:])
    out[:8] = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(raw), 2**40, 2**64 - 1]))
    return bytes(out)


#: How long a worker may take to import torch and stager.
_START_SECONDS = 300


def worker(conn, path: str, max_rss_mb: int) -> None:
    import stager

    resource.setrlimit(resource.RLIMIT_AS, (max_rss_mb << 20, max_rss_mb << 20))
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        outcome = "ok"
        try:
            result = stager.load(path)
            del result
        except stager.StagerError as err:
            # The load() backstop turning a validation gap in tree.decode into a StagerError:
            # clean for the user, but a gap worth reporting.
            outcome = "finding: backstop: " + str(err) if "malformed tree metadata" in str(err) else "error"
        except BaseException:
            outcome = "finding: " + traceback.format_exc(limit=6)
        conn.send((outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=10)
    parser.add_argument("--max-rss-mb", type=int, default=4096)
    parser.add_argument("--out", default="fuzz-findings")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    corpus = seeds()
    workdir = tempfile.mkdtemp(prefix="stager-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        return _fuzz(args, rng, corpus, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fuzz(args: argparse.Namespace, rng: random.Random, corpus: list[bytes], workdir: str) -> int:
    path = os.path.join(workdir, "input.safetensors")
    ctx = mp.get_context("spawn")
    counts = {"ok": 0, "error": 0, "findings": 0, "restarts": 0}
    findings: list[str] = []
    peak_rss = 0

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, path, args.max_rss_mb), daemon=True)
        proc.start()
        # The child imports torch and stager first, which takes a while on a loaded machine: the
        # clock of --hang starts once it says it is ready.
        if not parent.poll(_START_SECONDS) or parent.recv() != "ready":
            proc.kill()
            raise RuntimeError(f"the fuzz worker did not start within {_START_SECONDS}s")
        return proc, parent

    def record(reason: str, data: bytes) -> None:
        os.makedirs(args.out, exist_ok=True)
        index = len(findings)
        with open(os.path.join(args.out, f"finding-{index}.safetensors"), "wb") as f:
            f.write(data)
        with open(os.path.join(args.out, f"finding-{index}.txt"), "w") as f:
            f.write(reason)
        findings.append(reason)
        counts["findings"] += 1

    proc, conn = start()
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        data = mutate(rng, rng.choice(corpus))
        with open(path, "wb") as f:
            f.write(data)
        conn.send(True)
        if not conn.poll(args.hang):
            record(f"hang: no answer within {args.hang}s", data)
            proc.kill()
            proc, conn = start()
            counts["restarts"] += 1
            continue
        try:
            outcome, rss = conn.recv()
        except EOFError:
            proc.join(5)
            record(f"child died with exit code {proc.exitcode}", data)
            proc, conn = start()
            counts["restarts"] += 1
            continue
        peak_rss = max(peak_rss, rss)
        if outcome.startswith("finding"):
            record(outcome, data)
        else:
            counts[outcome] += 1
    conn.send(None)
    proc.join(5)
    total = counts["ok"] + counts["error"] + counts["findings"]
    print(f"{total} inputs in {args.seconds:.0f}s: {counts['error']} rejected with StagerError, "
          f"{counts['ok']} loaded (harmless mutations), {counts['findings']} findings, "
          f"child peak RSS {peak_rss} MB")
    for reason in findings[:20]:
        print("FINDING:", reason.strip().splitlines()[-1])
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
