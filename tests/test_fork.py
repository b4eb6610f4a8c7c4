"""stager after os.fork(): copy workers and reservation threads don't survive a fork, so a forked
child (DataLoader workers, multiprocessing's "fork" start method, dcp's PROCESS checkpointer under
fork) must never hang in a wait. Inherited stagers keep working in the child, new ones too, the
parent's results are untouched by what the child stages, and an engine object made in the parent
refuses work in the child at once with a StagerError saying it was forked.

The forks happen inside a subprocess (never in pytest itself), and the child is killed and the
test failed if it does not exit within its bound.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time, traceback
    import torch
    import stager
    from stager import _native

    # GNU OpenMP's thread pool does not survive fork(): torch's own parallel ops (torch.equal on
    # large tensors) would hang in the child. That is torch's limit, not stager's: stay serial.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Large enough for the copy workers (not the inline path), plus tiny tensors and a view.
    base = torch.randn(3 << 20)
    big = {"w": base, "view": base[10:1000], "b": torch.randn(10), "tiny": [torch.randn(3) for _ in range(200)]}
    expected = {"w": base.clone(), "b": big["b"].clone()}

    def check(out):
        assert torch.equal(out["w"], expected["w"]) and torch.equal(out["b"], expected["b"])
        assert out["view"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()
        assert torch.equal(out["view"], expected["w"][10:1000])

    async_stager = stager.DefaultStager(stager.StagingOptions(use_shared_memory=False, num_threads=2))
    sync_stager = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, use_shared_memory=False,
                                                             num_threads=2))
    shared_stager = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, use_shared_memory=True,
                                                               num_threads=2))
    blocking = stager.BlockingAsyncStager()
    parent_results = [async_stager.stage(big).result(), sync_stager.stage(big), shared_stager.stage(big),
                      blocking.stage(big)]
    dropped = shared_stager.stage(big)
    del dropped  # its shared memory is free in the parent's pool at fork time
    raw_engine = _native.CopyEngine(2)
    async_stager.reserve(256 << 20)  # a reservation thread still running when the fork happens

    def child_work(where):
        for out in parent_results:  # inherited results stay readable
            check(out)
        check(async_stager.stage(big).result(timeout=60))
        check(sync_stager.stage(big))
        shared_in_child = shared_stager.stage(big)
        check(shared_in_child)
        check(blocking.stage(big))
        with stager.DefaultStager(stager.StagingOptions(num_threads=2)) as fresh:
            check(fresh.stage(big).result(timeout=60))
        path = os.path.join(sys.argv[1], f"{where}.stager")
        stager.save(big, path, stager=sync_stager)
        check(stager.load(path))
        # An engine object from the parent: refused at once, not queued for threads that are gone.
        table = _native.describe_tensors([base])
        target = _native.HostPool().acquire(table.total_nbytes)
        try:
            raw_engine.submit_table(target, table, _native.Completion(1))
        except stager.StagerError as err:
            assert err.kind == "forked" and "fork" in str(err), (err.kind, str(err))
        else:
            raise AssertionError("an engine from the parent accepted work in the child")
        # The child writes into the shared result it staged; the parent's must not see it.
        shared_in_child["w"].fill_(-1.0)

    def run_child(where):
        try:
            child_work(where)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)

    def wait_bounded(pid, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"

    pid = os.fork()
    if pid == 0:
        run_child("os_fork")
    assert (code := wait_bounded(pid, 150)) == 0, f"os.fork child: {code}"

    process = multiprocessing.get_context("fork").Process(target=run_child, args=("mp_fork",))
    process.start()
    process.join(150)
    if process.is_alive():
        process.kill()
        raise AssertionError("multiprocessing fork child hung")
    assert process.exitcode == 0, process.exitcode

    for out in parent_results:  # nothing the children staged changed the parent's results
        check(out)
    check(async_stager.stage(big).result(timeout=60))  # and the parent's stagers still work
    check(shared_stager.stage(big))
    print("FORK-OK")
    """
)


@pytest.mark.timeout(400)
def test_forked_children_stage_without_hanging(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=360)
    assert result.returncode == 0 and "FORK-OK" in result.stdout, result.stdout + result.stderr


INCREMENTAL_SCRIPT = textwrap.dedent(
    """
    import os, time, torch, stager
    s = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, skip_unchanged=True))
    w = torch.randn(1000)
    s.stage({"w": w})
    s._engine._incremental_lock.acquire()  # as if another thread were mid-stage at the fork
    pid = os.fork()
    if pid == 0:
        with torch.no_grad():
            w.add_(1.0)
        out = s.stage({"w": w})
        os._exit(0 if torch.equal(out["w"], w) else 1)
    deadline = time.time() + 120
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("CHILD", os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("CHILD hung")
    """
)


@pytest.mark.timeout(300)
def test_a_forked_child_stages_incrementally_while_a_parent_thread_held_the_stage_lock():
    result = subprocess.run([sys.executable, "-c", INCREMENTAL_SCRIPT], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "CHILD 0" in result.stdout, result.stdout + result.stderr
