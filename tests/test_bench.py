"""`stager bench`'s staging section runs end to end and writes the rows it promises.

No performance assertions: a shared 2-core CI machine can't promise speeds, only that every row is
measured, positive and compared with what it should be compared with.
"""

import json
import math
import os
import subprocess
import sys

import pytest

import stager._native as native

MEMORIES = ("private", "shared")


def expected_rows(workload):
    names = {
        "limit: copy into touched memory",
        "limit: copy into fresh private memory",
        "limit: copy into fresh shared memory",
        "stager BlockingAsyncStager",
        "torch BlockingAsyncStager",
    }
    for memory in MEMORIES:
        for kind in ("repeat", "first call", "first call after reserve()"):
            names.add(f"stager DefaultStager {memory} {kind}")
        for kind in ("repeat", "first call"):
            names.add(f"torch DefaultStager {memory} {kind}")
    if workload == "tiny":
        names.add("torch _foreach_copy_ floor")
    else:
        for who in ("stager", "torch"):
            names.add(f"{who} DefaultStager async: stage() returns Future")
            names.add(f"{who} DefaultStager async: stage with caller's Python loop running")
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-c", "import sys; from stager.cli import main; sys.exit(main())",
           "bench", "--size", "32MB", "--tiny", "500", "--repeats", "1", "--sections", "staging",
           "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STAGER_BENCH_DIR": str(out.parent)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "limit: copy into touched memory" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def rows_of(report, workload):
    return {row["name"]: row for row in report["rows"] if row["section"] == "staging" and row["workload"] == workload}


def test_report_has_settings_and_no_skipped_staging(report):
    assert report["settings"]["tiny"] == 500
    assert report["settings"]["size_bytes"] == 32_000_000
    assert "staging" not in report["skipped"]


@pytest.mark.parametrize("workload", ["large", "tiny"])
def test_every_expected_row_is_measured_with_positive_times(report, workload):
    rows = rows_of(report, workload)
    missing = expected_rows(workload) - set(rows)
    # PyTorch may fail on some machines (e.g. EMFILE with shared memory); then the stager row says so.
    for name in list(missing):
        if name.startswith("torch "):
            stager_name = name.replace("torch ", "stager ", 1)
            assert "baseline_failed" in rows[stager_name].get("extra", {}), name
            missing.discard(name)
    assert not missing, missing
    for name, row in rows.items():
        assert row["seconds_median"] > 0 and math.isfinite(row["seconds_median"]), name
        assert row["seconds_samples"] and all(s > 0 for s in row["seconds_samples"]), name


@pytest.mark.parametrize("workload", ["large", "tiny"])
def test_stager_rows_have_ratios_to_limit_and_pytorch(report, workload):
    rows = rows_of(report, workload)
    floor = "torch _foreach_copy_ floor"  # per tensor, tiny rows are held against PyTorch's C++ floor
    for memory in MEMORIES:
        for kind, limit in (("repeat", "limit: copy into touched memory"),
                            ("first call", f"limit: copy into fresh {memory} memory"),
                            ("first call after reserve()", "limit: copy into touched memory")):
            limit = floor if workload == "tiny" else limit
            row = rows[f"stager DefaultStager {memory} {kind}"]
            assert row["limit"] == limit
            assert row["ratio_to_limit"] > 0
            assert row["gb_per_s"] > 0 and row["us_per_tensor"] > 0
            assert row["nbytes"] > 0 and row["ntensors"] > 0
            if "baseline_failed" not in row.get("extra", {}):
                assert row["speedup_vs_baseline"] > 0
    assert rows["stager BlockingAsyncStager"]["speedup_vs_baseline"] > 0


def test_async_rows_report_future_latency_and_caller_loop_speed(report):
    rows = rows_of(report, "large")
    for who in ("stager", "torch"):
        future = rows[f"{who} DefaultStager async: stage() returns Future"]
        assert future["extra"]["ms"] > 0
        loop = rows[f"{who} DefaultStager async: stage with caller's Python loop running"]
        # A small stage can finish before the loop's first chunk: 0 % is a real reading then.
        assert 0 <= loop["extra"]["caller_loop_speed_vs_alone"] <= 1.5
        assert 0 <= loop["extra"]["caller_seconds_lost"] <= loop["seconds_median"] * 1.01
        assert loop["extra"]["loop_alone_iterations_per_s"] > 0


def test_busy_rows_compare_first_calls_and_repeat_calls_beside_busy_processes(report):
    rows = rows_of(report, "large, 2 busy processes")
    first = rows["stager DefaultStager private first call"]
    assert first["baseline"] == "torch DefaultStager private first call" and first["speedup_vs_baseline"] > 0
    assert rows["torch DefaultStager private first call"]["seconds_median"] > 0
    repeat = rows["stager DefaultStager private repeat"]
    assert repeat["extra"]["vs_idle_repeat"] > 0 and repeat["extra"]["idle_samples"]


def test_tiny_workload_counts_every_tensor(report):
    rows = rows_of(report, "tiny")
    assert rows["stager DefaultStager private repeat"]["ntensors"] == 500


def test_tiny_result_memory_rows_report_rss_per_tensor(report):
    # Issue 15.8: the resident memory a staged result of tiny tensors costs, stager's and PyTorch's.
    rows = rows_of(report, "tiny result memory")
    for name in ("stager DefaultStager result", "torch DefaultStager result"):
        assert rows[name]["ntensors"] == 20_000
        assert all(v > 0 for v in rows[name]["extra"]["rss_bytes_per_tensor"]), rows[name]
        assert "B/tensor" in rows[name]["extra"]["summary"]


@pytest.mark.parametrize("target", ["touched", "private", "shared"])
def test_copy_limit_binding_returns_one_time_per_sample(target):
    seconds = native.copy_limit_seconds(1 << 20, 2, target, 3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_copy_limit_binding_copies_from_a_callers_buffer_and_rejects_bad_input():
    numpy = pytest.importorskip("numpy")
    source = numpy.full(1 << 20, 7, dtype=numpy.uint8)
    assert len(native.copy_limit_seconds(source.nbytes, 2, "private", 2, source)) == 2
    with pytest.raises(native.StagerError, match="at least"):
        native.copy_limit_seconds(source.nbytes + 1, 2, "touched", 1, source)
    with pytest.raises(native.StagerError, match="unknown copy-limit target"):
        native.copy_limit_seconds(1024, 2, "gpu", 1)


def test_recovery_section_measures_every_tier_and_leaves_no_segment(tmp_path, shm_dir):
    """The recovery rows of issue #18 (own shared memory, holders' shared memory, disk, memory,
    PyTorch's path) are measured for 2 and 4 ranks, and the run's segments are all released."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-c", "import sys; from stager.cli import main; sys.exit(main())",
           "bench", "--size", "8MB", "--tiny", "100", "--repeats", "1", "--sections", "recovery",
           "--dir", str(tmp_path / "work"), "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [row for row in json.loads(out.read_text())["rows"] if row["section"] == "recovery"]
    for world in (2, 4):
        names = {row["name"] for row in rows if row["workload"] == f"restore, {world} ranks"}
        assert {"stager restore() (restarted, survive_restart: own copies in shared memory)",
                "stager restore() (restarted, node replaced: holders' shared memory)",
                "stager restore() (restarted: copies on disk)",
                "PyTorch: torch.load replica + PGTransport",
                "stager restore(into=model) (restarted, survive_restart: own copies in shared memory)",
                "limit: memory copy of one buffer", "limit: cold direct read, then gloo exchange"} <= names
    assert all(row["seconds_median"] > 0 for row in rows)
    for world in (2, 4):
        peaks = {row["name"]: row["extra"] for row in rows if row["workload"] == f"peak host memory, {world} ranks"}
        assert len(peaks) == 2 and all(extra["peak_host_bytes"] > 0 for extra in peaks.values()), peaks
    assert os.listdir(shm_dir) == []


def test_bounded_rows_compare_the_streamed_save_with_the_unbounded_one(tmp_path):
    # The persistence section's rows for a state 4x the budget (bench/bounded.py), on a tiny state.
    from stager.bench import bounded, persistence
    from stager.bench.common import BenchContext

    ctx = BenchContext(size_bytes=8_000_000, tiny_count=10, repeats=1, threads=1, workdir=str(tmp_path),
                       progress=False)
    sd = ctx.large_state_dict()
    nbytes = ctx.nbytes_of(sd)

    def row(workload, name, samples, **kwargs):
        return ctx.row("persistence", workload, name, samples, nbytes=nbytes, **kwargs)

    rows = {r.name: r for r in bounded.rows(ctx, sd, nbytes, persistence._interleaved, row)}
    assert set(rows) == {bounded.UNBOUNDED, bounded.BOUNDED, bounded.WAIT_UNBOUNDED, bounded.WAIT_BOUNDED}
    assert all(r.seconds > 0 for r in rows.values())
    assert rows[bounded.BOUNDED].baseline == bounded.UNBOUNDED
    assert rows[bounded.WAIT_BOUNDED].baseline == bounded.WAIT_UNBOUNDED
    streamed = rows[bounded.BOUNDED].extra
    assert streamed["peak_bytes"] <= streamed["budget_bytes"] < nbytes
    assert streamed["host_memory_over_budget"]["max"] > 0
    assert os.listdir(tmp_path) == []  # the checkpoints are removed
