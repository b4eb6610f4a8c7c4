"""The bindings' rule, tested at the boundary: no input from Python aborts the process, panics or
leaks a raw OverflowError / TypeError; every bad value is a StagerError naming what was wrong.

Each battery runs in a subprocess, so an abort (rc 134) or a hang fails the test instead of taking
pytest down with it.
"""

import subprocess
import sys
import textwrap

BATTERY = textwrap.dedent(
    """
    import torch
    import stager
    from stager import _native

    HUGE = [2**31, 2**63, 2**64, 2**70, 2**200]
    NEGATIVE = [-1, -(2**63), -(2**70)]
    WRONG_TYPE = [1.5, "3", None, True, [1]]

    def refused(call, *needles):
        try:
            call()
        except stager.StagerError as err:
            text = str(err)
            assert all(n in text for n in needles), (needles, text)
            assert err.kind in ("invalid_argument", "error"), (err.kind, text)
            return
        except BaseException as err:  # OverflowError, TypeError, PanicException...
            raise AssertionError(f"{call} raised {type(err).__name__}: {err}") from err
        raise AssertionError(f"{call} was accepted")

    # Options (issue: num_threads=2**31 aborted the process; 2**70 bytes raised OverflowError).
    for value in HUGE[:1] + NEGATIVE + [0, 1.5, True]:
        refused(lambda: stager.StagingOptions(num_threads=value), "num_threads")
    for value in HUGE[3:] + NEGATIVE + [1.5, "8"]:
        refused(lambda: stager.StagingOptions(memory_budget_bytes=value), "memory_budget_bytes")
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False)) as s:
        for value in NEGATIVE + HUGE[3:] + WRONG_TYPE:
            refused(lambda: s.reserve(value), "nbytes")
        assert s.stage({"w": torch.ones(3)})["w"].sum() == 3  # still usable

    # Pool.
    for value in NEGATIVE + HUGE[2:] + [1.5, "3", True]:  # None is valid: no budget
        refused(lambda: _native.HostPool(budget_bytes=value), "memory_budget_bytes")
    pool = _native.HostPool()
    for value in NEGATIVE + HUGE[3:] + WRONG_TYPE:
        refused(lambda: pool.acquire(value), "nbytes")
    refused(lambda: pool.acquire(2**63 - 1), "address space")
    refused(lambda: pool.reserve(1 << 20, 0), "threads")
    pool.reserve(1 << 20, 2**62)  # absurd thread counts are clamped, not spawned
    pool.finish_reservations()

    # Engines.
    for value in [0, 2**31, 2**70, -1, 1.5]:
        refused(lambda: _native.CopyEngine(value), "num_threads")
    refused(lambda: _native.CopyEngine(1, 40), "niceness")
    refused(lambda: _native.CopyEngine(1, -3), "niceness")

    # Completion.
    for value in NEGATIVE + HUGE[3:] + WRONG_TYPE:
        refused(lambda: _native.Completion(value), "len")
    done = _native.Completion(3)
    for value in [3, -1, 2**70, 1.5]:
        refused(lambda: done.mark_complete(value), "request index")
        refused(lambda: done.wait(value, timeout=0), "request index")
    for timeout in [-1.0, float("nan"), float("-inf")]:
        refused(lambda: done.wait(timeout=timeout), "timeout")
    assert _native.Completion(0).wait(timeout=float("inf"))  # "no deadline" is not an error
    refused(lambda: _native.Completion(0).mark_complete(0), "no requests")

    # Copies into a buffer.
    engine = _native.CopyEngine(2)
    target = pool.acquire(4096)
    source = torch.ones(1024, dtype=torch.uint8)
    src = source.untyped_storage()
    for copies, needle in [
        ([(0, src, 0, 4000, 1024)], "does not fit"),
        ([(0, src, 0, 0, 1024), (1, src, 0, 512, 1024)], "overlap"),
        ([(0, src, 0, 2**70, 1)], "target offset"),
        ([(0, src, 1000, 0, 100)], "of a 1024-byte source storage"),
        ([(0, src, -1, 0, 8)], "source offset"),
        ([(5, src, 0, 0, 8)], "request 5"),
        ([(0, "not a storage", 0, 0, 8)], "torch.UntypedStorage"),
        ([(0, src, 0, 0, 8), (0, src, 0, 8, 8)], "two copies"),
    ]:
        refused(lambda: engine.submit(target, _native.Completion(2), copies), needle)

    # Tables from metadata.
    refused(lambda: _native.TensorTable.from_layout([-1], []), "storage nbytes")
    # Records as tree.py hands them over: (storage, dtype name, shape, stride, offset, conj, neg).
    refused(lambda: _native.TensorTable.from_layout([8], [(3, "float32", [2], [1], 0, False, False)]), "storage 3")
    refused(lambda: _native.TensorTable.from_layout([8], [(0, "float32", [2], [1], 0, True, False)]), "not complex")
    refused(lambda: _native.TensorTable.from_layout([8], [(0, "float32", [4], [1], 0, False, False)]), "past its storage")
    refused(lambda: _native.TensorTable.from_layout([8], [(0, "float32")]), "must be (storage")
    table = _native.TensorTable.from_layout([8], [(0, "float32", [2], [1], 0, False, False)])
    refused(lambda: table.materialize(pool.acquire(4)), "smaller")
    refused(lambda: table.materialize(pool.acquire(8), {5: torch.UntypedStorage(8)}), "replacement storage index")
    refused(lambda: table.materialize(pool.acquire(8), {0: torch.UntypedStorage(4)}), "replacement for storage 0")

    # Limits.
    refused(lambda: _native.copy_limit_seconds(-1, 1, "touched"), "nbytes")
    refused(lambda: _native.copy_limit_seconds(1024, 2**40, "touched"), "threads")
    refused(lambda: _native.copy_limit_seconds(1024, 1, "nowhere"), "unknown copy-limit target")

    # CUDA without a GPU: a clear StagerError, never a panic.
    if not _native.cuda_available():
        try:
            _native.DeviceCopier()
        except stager.StagerError as err:
            assert err.kind == "cuda", err.kind
        else:
            raise AssertionError("DeviceCopier without CUDA")
    refused(lambda: _native.DeviceCopier(0), "streams_per_device")
    refused(lambda: _native.DeviceCopier(2**40), "streams_per_device")
    print("BOUNDARY-OK")
    """
)


def test_every_bad_value_is_a_stager_error_never_an_abort():
    result = subprocess.run([sys.executable, "-c", BATTERY], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "BOUNDARY-OK" in result.stdout, (result.returncode, result.stdout + result.stderr)


ERRNO_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, stager
    target = os.path.join(sys.argv[1], "missing", "x.stager")
    try:
        stager.save({"w": torch.ones(4)}, target)
    except stager.StagerError as err:
        import errno
        assert err.kind == "io" and err.errno == errno.ENOENT, (err.kind, err.errno, str(err))
        assert target in str(err)
    else:
        raise AssertionError("saved into a missing directory")
    print("ERRNO-OK")
    """
)


def test_io_errors_carry_their_errno(tmp_path):
    result = subprocess.run([sys.executable, "-c", ERRNO_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ERRNO-OK" in result.stdout, result.stdout + result.stderr
