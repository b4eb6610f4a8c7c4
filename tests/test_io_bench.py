"""`stager bench`'s persistence section runs end to end: the disk's direct limits, the dd reference
rows, and the spread (min / median / max) of every row. No performance assertions: a shared
2-core machine can't promise speeds, only that every row is measured and compared with its limit."""

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-c", "import sys; from stager.cli import main; sys.exit(main())",
           "bench", "--size", "16MB", "--tiny", "100", "--repeats", "2", "--sections", "persistence",
           "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STAGER_BENCH_DIR": str(out.parent)}, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "limit: O_DIRECT write+fsync, 4 in flight" in proc.stdout  # the table was printed
    report = json.loads(out.read_text())
    assert "persistence" not in report["skipped"], report["skipped"]
    return {(r["workload"], r["name"]): r for r in report["rows"] if r["section"] == "persistence"}


def test_limits_are_direct_reads_and_writes_with_dd_as_reference(rows):
    save_limit = rows[("large save", "limit: O_DIRECT write+fsync, 4 in flight")]
    read_limit = rows[("large load (cold cache)", "limit: O_DIRECT cold read, 4 in flight")]
    for limit in (save_limit, read_limit):
        assert limit["seconds_median"] > 0 and limit["limit"] is None
        assert "O_DIRECT" in limit["extra"]["how"]
    stager_save = rows[("large save", "stager.save")]
    assert stager_save["limit"] == save_limit["name"] and stager_save["ratio_to_limit"] > 0
    assert stager_save["baseline"] == "torch.save+fsync+rename+dir fsync"
    stager_load = rows[("large load (cold cache)", "stager.load (verify=True)")]
    assert stager_load["limit"] == read_limit["name"] and stager_load["baseline"] == "torch.load"
    if shutil.which("dd"):
        assert rows[("large save", "dd oflag=direct conv=fsync")]["limit"] == save_limit["name"]
        assert rows[("large load (cold cache)", "dd iflag=direct")]["limit"] == read_limit["name"]


def test_tiny_save_reports_header_and_file_bytes_per_tensor(rows):
    # Issue 15.8: header bytes per tensor are what bound a file of a million tensors.
    row = rows[("tiny save", "stager.save")]
    assert 0 < row["extra"]["header_bytes"] < row["extra"]["file_bytes"]
    assert "header" in row["extra"]["summary"] and "B/tensor" in row["extra"]["summary"]
    assert rows[("tiny save", "torch.save+fsync+rename+dir fsync")]["extra"]["file_bytes"] > 0


def test_every_row_reports_its_spread(rows):
    for (workload, name), row in rows.items():
        if name == "max(stage, write)":
            assert row["extra"]["computed"]
            continue
        assert len(row["seconds_samples"]) == 2, (workload, name)
        note = row["extra"]["summary"]
        assert "min" in note and "med" in note and "max" in note and "spread" in note, note
        if "limit:" in name:
            assert "the disk's own noise" in note, note
