"""The CUDA path: pinned pool, device-to-host copies on stager's own streams, ordered after the
caller's stream.

Tests marked ``gpu`` need a CUDA device (conftest skips them elsewhere); the others check what the
contract promises on a machine without CUDA: detection never raises, GPU-only options are no-ops.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import Future

import pytest
import torch

import stager
from helpers import FLOAT8, all_dtype_tensors, assert_same_tree, same_storage
from stager import _native
from stager.device import capture_order, device_copier, native_cuda_available


def stage(s, sd):
    result = s.stage(sd)
    return result.result(timeout=120) if isinstance(result, Future) else result


# ---- without CUDA (run everywhere) -------------------------------------------------------------


def test_detection_never_raises_and_is_consistent():
    available = _native.cuda_available()
    assert isinstance(available, bool)
    assert (_native.cuda_device_count() > 0) == available
    assert (_native.cuda_unavailable_reason() is None) == available
    assert isinstance(_native.cuda_active_devices(), list)
    assert isinstance(native_cuda_available(), bool)


@pytest.mark.skipif(_native.cuda_available(), reason="checks the CUDA-absent behaviour")
def test_without_cuda_gpu_only_options_are_no_ops():
    assert "CUDA" in _native.cuda_unavailable_reason() or "cuda" in _native.cuda_unavailable_reason()
    pool = _native.HostPool(pinned=True)
    assert pool.pinned is False
    assert pool.acquire(4096).pinned is False
    with pytest.raises(stager.StagerError, match="CUDA"):
        _native.DeviceCopier()
    assert capture_order() == {}
    sd = {"w": torch.randn(64, 32), "b": torch.randn(32), "step": 3}
    for options in (
        stager.StagingOptions(use_pinned_memory=True, use_non_blocking_copy=True),
        stager.StagingOptions(use_pinned_memory=True, use_non_blocking_copy=False, use_async_staging=False),
    ):
        with stager.DefaultStager(options) as s:
            s.reserve(1 << 20)
            assert_same_tree(stage(s, sd), sd)
            assert s._engine.pool.pinned is False


def test_disable_env_turns_cuda_off():
    code = textwrap.dedent(
        """
        import stager._native as n
        assert n.cuda_available() is False
        assert "STAGER_DISABLE_CUDA" in n.cuda_unavailable_reason()
        assert n.HostPool(pinned=True).pinned is False
        print("OK")
        """
    )
    env = dict(os.environ, STAGER_DISABLE_CUDA="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ---- with CUDA ---------------------------------------------------------------------------------

gpu = pytest.mark.gpu

STAGERS = {
    "default-async": lambda: stager.DefaultStager(),
    "default-sync": lambda: stager.DefaultStager(stager.StagingOptions(use_async_staging=False)),
    "default-blocking-copy": lambda: stager.DefaultStager(
        stager.StagingOptions(use_async_staging=False, use_non_blocking_copy=False)
    ),
    "default-pageable": lambda: stager.DefaultStager(
        stager.StagingOptions(use_pinned_memory=False, use_shared_memory=False)
    ),
    "blocking": lambda: stager.BlockingAsyncStager(),
    "blocking-cached": lambda: stager.BlockingAsyncStager(cache_staged_state_dict=True),
}


def gpu_state_dict(device="cuda"):
    weight = torch.randn(256, 128, device=device)
    return {
        "model": {
            "weight": weight,
            "weight_t": weight.t(),
            "row": weight[7],
            "strided": torch.arange(1000.0, device=device)[::7],
            "big": torch.randn((40 << 20) // 4, device=device),  # 40 MB: several chunks and events
            "empty": torch.empty(0, 3, device=device),
            "scalar": torch.tensor(2.5, device=device),
        },
        "optim": {"state": {0: {"step": torch.tensor(11.0), "exp_avg": torch.randn(256, 128, device=device)}}},
        "cpu": {"table": torch.randn(300, 7), "ids": torch.arange(50)},
        "meta": {"epoch": 4, "name": "gpu"},
    }


@gpu
@pytest.mark.parametrize("make", STAGERS.values(), ids=STAGERS.keys())
def test_values_equal_after_staging_from_gpu(make):
    sd = gpu_state_dict()
    s = make()
    try:
        staged = stage(s, sd)
    finally:
        s.close()
    assert_same_tree(staged, sd)
    model = staged["model"]
    assert same_storage(model["weight"], model["weight_t"])
    assert same_storage(model["weight"], model["row"])
    assert not same_storage(model["weight"], model["big"])


@gpu
def test_pool_is_pinned_once_and_reused():
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False)) as s:
        pool = s._engine.pool
        assert pool.pinned
        sd = {"w": torch.randn(3 << 20, device="cuda")}
        first = stage(s, sd)
        assert first["w"].is_pinned()
        del first
        for _ in range(3):
            again = stage(s, sd)
            assert again["w"].is_pinned()
            assert torch.equal(again["w"], sd["w"].cpu())
            del again
        stats = s.pool_stats()
        assert stats["allocations"] == 1 and stats["reuses"] == 3, stats


@gpu
def test_reserve_pre_pins_the_first_stage():
    sd = {"w": torch.randn(16 << 20, device="cuda"), "b": torch.randn(1000, device="cuda")}
    from stager.plan import plan_state_dict

    nbytes = plan_state_dict(sd).total_nbytes
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False)) as s:
        s.reserve(nbytes)
        s._engine.pool.finish_reservations()
        stats = s.pool_stats()
        assert stats["allocations"] == 1 and stats["free_bytes"] >= nbytes, stats
        staged = stage(s, sd)
        assert staged["w"].is_pinned()
        stats = s.pool_stats()
        assert stats["allocations"] == 1 and stats["reuses"] == 1, stats
        assert_same_tree(staged, sd)


def _busy(stream, n=8192, rounds=40):
    """Queues a long matmul chain on `stream`: the GPU stays busy for a while (hundreds of ms)."""
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        a = torch.randn(n, n, device=stream.device) / n**0.5
        b = a.clone()
        for _ in range(rounds):
            b = torch.mm(a, b)
    return b


@gpu
@pytest.mark.parametrize("side_stream", [False, True], ids=["current-stream", "side-stream"])
@pytest.mark.parametrize("make", [STAGERS["default-async"], STAGERS["default-sync"], STAGERS["blocking"]],
                         ids=["default-async", "default-sync", "blocking"])
def test_copy_waits_for_kernels_still_running_on_the_callers_stream(make, side_stream):
    torch.backends.cuda.matmul.allow_tf32 = False
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    target = torch.zeros(8 << 20, device="cuda")
    torch.cuda.synchronize()
    s = make()
    try:
        with torch.cuda.stream(stream):
            _busy(stream)
            target.fill_(42.0)  # queued behind the chain, just before stage()
            written = torch.cuda.Event()
            written.record(stream)
            pending_at_stage = not written.query()
            result = s.stage({"t": target})
        staged = result.result(timeout=120) if isinstance(result, Future) else result
    finally:
        s.close()
    assert pending_at_stage, "the matmul chain finished before stage(): the test proves nothing here"
    assert torch.all(staged["t"] == 42.0), "copied before the caller's kernels finished"


@gpu
@pytest.mark.parametrize("make", STAGERS.values(), ids=STAGERS.keys())
def test_writes_after_stage_do_not_leak_into_the_staged_copy(make):
    sd = {"w": torch.full((4 << 20,), 1.0, device="cuda"), "v": torch.arange(1000.0, device="cuda")[::3]}
    s = make()
    try:
        staged = stage(s, sd)  # a Future's result() is "stage complete"
        with torch.no_grad():
            sd["w"].add_(5.0)
            sd["v"].mul_(-1.0)
        torch.cuda.synchronize()
        assert torch.all(staged["w"] == 1.0)
        assert torch.equal(staged["v"], torch.arange(1000.0)[::3])
        later = stage(s, sd)
        assert torch.all(later["w"] == 6.0)
        assert torch.all(staged["w"] == 1.0), "a later stage overwrote an earlier result"
    finally:
        s.close()


@gpu
def test_mixed_cpu_and_gpu_dict_and_every_dtype():
    sd = {}
    for key, tensor in all_dtype_tensors().items():
        sd[f"cpu.{key}"] = tensor
        try:
            sd[f"gpu.{key}"] = tensor.to("cuda")
        except (RuntimeError, TypeError):  # a dtype this build can't move to CUDA
            continue
    assert "gpu.torch.bfloat16" in sd
    assert any(str(d) in k for d in FLOAT8 for k in sd if k.startswith("gpu.")), "no float8 on GPU"
    with stager.DefaultStager() as s:
        staged = stage(s, sd)
    for key, tensor in sd.items():
        assert staged[key].dtype == tensor.dtype, key
        assert torch.equal(staged[key].view(torch.uint8), tensor.cpu().view(torch.uint8)), key


@gpu
def test_completion_is_reported_per_storage():
    from stager.plan import plan_state_dict

    sd = {f"t{i}": torch.full(((i + 1) << 18,), float(i), device="cuda") for i in range(12)}
    plan = plan_state_dict(sd)
    pool = _native.HostPool(pinned=True)
    buffer = pool.acquire(plan.total_nbytes)
    storages = plan.device_storages
    copier = device_copier()
    marks = [copier.mark(0, torch.cuda.current_stream(0).cuda_stream)]
    job = _native.Completion(len(storages))
    copier.submit(buffer, job, plan.table.cuda_copies, marks, plan.table)
    seen = []
    while (index := job.next_completed(timeout=60)) is not None:
        seen.append(index)
    assert sorted(seen) == list(range(len(storages)))
    job.wait()
    staged = plan.materialize(buffer)
    assert_same_tree(staged, sd)


@gpu
def test_device_copier_rejects_bad_requests():
    copier = device_copier()
    buffer = _native.HostPool().acquire(4096)
    mark = copier.mark(0, torch.cuda.current_stream(0).cuda_stream)
    t = torch.zeros(1024, device="cuda")
    with pytest.raises(stager.StagerError, match="does not fit"):
        copier.submit(buffer, _native.Completion(1), [(0, 0, t.data_ptr(), 1024, 4096)], [mark], [t])
    with pytest.raises(stager.StagerError, match="mark"):
        copier.submit(buffer, _native.Completion(1), [(0, 0, t.data_ptr(), 0, 4096)], [], [t])
    with pytest.raises(stager.StagerError, match="device"):
        copier.submit(buffer, _native.Completion(1), [(0, torch.cuda.device_count(), t.data_ptr(), 0, 4096)], [mark], [t])


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_devices_in_one_state_dict():
    torch.backends.cuda.matmul.allow_tf32 = False
    sd = {"a": torch.randn(1 << 20, device="cuda:0"), "b": torch.zeros(8 << 20, device="cuda:1"),
          "c": torch.randn(100, device="cuda:1"), "cpu": torch.ones(3)}
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    with stager.DefaultStager() as s:
        stream1 = torch.cuda.current_stream(1)
        _busy(stream1)
        with torch.cuda.device(1):
            sd["b"].fill_(7.0)  # on device 1's current stream, behind the chain
        staged = stage(s, sd)
    assert torch.all(staged["b"] == 7.0)
    assert_same_tree(staged, sd)


DCP_SCRIPT = textwrap.dedent(
    """
    import os, socket, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    import stager

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def main(kind, path):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).cuda()
        optim = torch.optim.Adam(model.parameters())
        model(torch.randn(32, 64, device="cuda")).sum().backward()
        optim.step()
        state = {"model": model.state_dict(), "optim": optim.state_dict()}
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        async_stager = stager.DefaultStager()
        response = dcp.async_save(state, checkpoint_id=path, async_stager=async_stager,
                                  async_checkpointer_type=getattr(AsyncCheckpointerType, kind))
        upload = getattr(response, "upload_completion", response)
        if getattr(response, "staging_completion", None) is not None:
            response.staging_completion.result()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100.0)  # training goes on; the checkpoint must not see it
        upload.result(timeout=180)
        async_stager.close()
        target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
        dcp.load(target, checkpoint_id=path)
        for key, value in expected.items():
            assert torch.equal(target["model"][key], value), key
        dist.destroy_process_group()
        print("DCP-GPU-OK")

    main(*sys.argv[1:])
    """
)


@gpu
@pytest.mark.parametrize("kind", ["THREAD", "PROCESS"])
def test_dcp_async_save_round_trip_from_gpu(tmp_path, kind):
    result = subprocess.run(
        [sys.executable, "-c", DCP_SCRIPT, kind, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0 and "DCP-GPU-OK" in result.stdout, result.stdout + result.stderr


# ---- the CUDA plumbing against a stand-in driver (run everywhere a C compiler is) -----------------

FAKE_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, os, sys
    import torch
    import stager
    from stager import _native

    class Counters(ctypes.Structure):
        _fields_ = [(name, ctypes.c_long) for name in
                    ("registered", "unregistered", "copies", "copied_bytes", "events_alive", "streams_alive",
                     "waits", "errors")]

    lib = ctypes.CDLL(os.path.join(sys.argv[1], "libcuda.so"))
    lib.fake_cuda_counters.restype = ctypes.POINTER(Counters)
    counters = lib.fake_cuda_counters().contents

    def current_context():
        ctx = ctypes.c_void_p()
        assert lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
        return ctx.value

    assert _native.cuda_available() and _native.cuda_device_count() == 1, _native.cuda_unavailable_reason()
    assert _native.cuda_active_devices() == []  # nothing retained a context yet

    # Pinned pool: registered once per buffer, kept while recycled, unregistered when unmapped.
    pool = _native.HostPool(pinned=True)
    assert pool.pinned
    buffer = pool.acquire(3 << 20)
    assert buffer.pinned and counters.registered == 1
    del buffer
    buffer = pool.acquire(3 << 20)
    assert counters.registered == 1 and pool.stats()["reuses"] == 1
    pool.reserve(5 << 20, 1)  # pins in the background thread
    pool.finish_reservations()
    assert counters.registered == 2
    del buffer
    pool.trim()
    assert counters.unregistered == 2
    assert current_context() is None, "a context was left pushed on this thread"

    # Device copies: "device memory" is host memory in the stand-in.
    copier = _native.DeviceCopier(2)
    assert counters.streams_alive == 0  # streams are made on first use
    sources = [torch.arange(n, dtype=torch.uint8) for n in (1, 1000, (100 << 20) + 3, 0, 64 << 20)]
    offsets, offset = [], 0
    for s in sources:
        offsets.append(offset)
        offset += -(-s.numel() // 64) * 64
    pool = _native.HostPool(pinned=True)
    target = pool.acquire(offset)
    mark = copier.mark(0, 0)
    assert mark.device == 0 and mark.reached()
    job = _native.Completion(len(sources))
    copier.submit(target, job, [(i, 0, s.data_ptr(), o, s.numel()) for i, (s, o) in enumerate(zip(sources, offsets))],
                  [mark], sources)
    assert counters.streams_alive == 2 and counters.waits == 2
    seen = []
    while (index := job.next_completed(timeout=10)) is not None:
        seen.append(index)
    assert sorted(seen) == list(range(len(sources))), seen
    job.wait()
    assert job.done() and len(job) == len(sources)
    for s, o in zip(sources, offsets):
        assert torch.equal(torch.frombuffer(target, dtype=torch.uint8, count=s.numel(), offset=o), s) if s.numel() else True
    assert counters.copies == 1 + 1 + 4 + 2, counters.copies  # 32 MiB chunks (DEVICE_CHUNK_BYTES): 100 MiB is four
    del mark
    gc.collect()
    assert counters.events_alive == 0, counters.events_alive
    assert current_context() is None

    # Refusals: outside the buffer, overlapping, no mark for the device, unknown device.
    address = sources[1].data_ptr()
    for bad, match in (
        (lambda: copier.submit(target, _native.Completion(1), [(0, 0, address, offset, 1000)], [copier.mark(0, 0)], sources), "does not fit"),
        (lambda: copier.submit(target, _native.Completion(2), [(0, 0, address, 0, 1000), (1, 0, address, 64, 1000)], [copier.mark(0, 0)], sources), "overlap"),
        (lambda: copier.submit(target, _native.Completion(1), [(0, 0, address, 0, 1000)], [], sources), "mark"),
        (lambda: copier.submit(target, _native.Completion(1), [(0, 3, address, 0, 1000)], [copier.mark(0, 0)], sources), "device 3"),
        (lambda: copier.mark(5, 0), "device 5"),
    ):
        try:
            bad()
        except stager.StagerError as err:
            assert match in str(err), (match, str(err))
        else:
            raise AssertionError(f"accepted: {match}")

    # device.py's path for CUDA storages, with a plan whose "CUDA" storages are host memory here.
    from types import SimpleNamespace
    from stager.device import capture_order, start_device_copies
    assert capture_order() == {}  # torch has not initialised CUDA: no CUDA tensor can exist
    cuda0 = torch.device("cuda", 0)
    table = SimpleNamespace(
        has_device_storages=True,
        storage_devices=[cuda0] * len(sources),
        storage_nbytes=[t.numel() for t in sources],
        cuda_copies=[(i, 0, t.data_ptr(), o, t.numel()) for i, (t, o) in enumerate(zip(sources, offsets)) if t.numel()],
    )
    plan = SimpleNamespace(table=table, storages=None)
    target2 = pool.acquire(offset)
    waits = _native.Completion(len(sources))
    start_device_copies(plan, target2, waits, True, {0: copier.mark(0, 0)})
    waits.wait(timeout=30)
    assert waits.done()
    assert bytes(memoryview(target2)) == bytes(memoryview(target))
    waits = _native.Completion(len(sources))
    start_device_copies(plan, target2, waits, False, {0: copier.mark(0, 0)})
    assert waits.done()

    # A stager on CPU tensors with the default options: its pool is pinned now.
    sd = {"w": torch.randn(1000, 100), "b": torch.randn(7)}
    with stager.DefaultStager() as s:
        staged = s.stage(sd).result()
        assert s._engine.pool.pinned
    assert torch.equal(staged["w"], sd["w"]) and torch.equal(staged["b"], sd["b"])
    import stager.device
    stager.device._copier = None  # the process-wide copier device.py made
    del job, copier, waits
    gc.collect()
    assert counters.streams_alive == 0, "the copier's streams outlived it"
    assert counters.errors == 0, f"{counters.errors} driver calls were refused"
    print("FAKE-OK")
    """
)

FAKE_FAILURE_SCRIPT = textwrap.dedent(
    """
    import torch
    import stager
    from stager import _native

    copier = _native.DeviceCopier(1)
    pool = _native.HostPool(pinned=True)
    target = pool.acquire(3 << 20)
    sources = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(3)]
    try:
        done = _native.Completion(3)
        copier.submit(target, done, [(i, 0, s.data_ptr(), i << 20, 1 << 20) for i, s in enumerate(sources)],
                      [copier.mark(0, 0)], sources)
        done.wait(timeout=30)
    except stager.StagerError as err:
        assert "cuMemcpyDtoHAsync" in str(err) and "INVALID_VALUE" in str(err), str(err)
    else:
        raise AssertionError("a failed copy was not reported")
    print("FAKE-FAILURE-OK")
    """
)


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory):
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the stand-in driver")
    folder = tmp_path_factory.mktemp("fake_cuda")
    source = os.path.join(os.path.dirname(__file__), "fake_cuda.c")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(folder / "libcuda.so"), source, "-lpthread"],
                   check=True, capture_output=True, timeout=120)
    return folder


@pytest.mark.parametrize("script, expected", [(FAKE_SCRIPT, "FAKE-OK"), (FAKE_FAILURE_SCRIPT, "FAKE-FAILURE-OK")],
                         ids=["happy-path", "failed-copy"])
def test_cuda_plumbing_against_a_stand_in_driver(fake_cuda, script, expected):
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake_cuda))
    env.pop("STAGER_DISABLE_CUDA", None)
    if "FAILURE" in expected:
        env["FAKE_CUDA_FAIL_COPY_AFTER"] = "1"  # the second copy fails
    result = subprocess.run([sys.executable, "-c", script, str(fake_cuda)], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and expected in result.stdout, result.stdout + result.stderr


@gpu
def test_skip_unchanged_issues_no_device_copy_for_unchanged_storages():
    sd = {"frozen": torch.randn(1 << 20, device="cuda"), "adapter": torch.randn(1000, device="cuda")}
    options = stager.StagingOptions(use_async_staging=False, skip_unchanged=True)
    with stager.DefaultStager(options) as s:
        first = s.stage(sd)
        sd["adapter"].mul_(2.0)
        second = s.stage(sd)
        tracker = s._engine.unchanged
        assert (tracker.copied_nbytes, tracker.reused_nbytes) == (4000, sd["frozen"].numel() * 4)
        assert second["frozen"].untyped_storage().data_ptr() == first["frozen"].untyped_storage().data_ptr()
        assert torch.equal(second["adapter"], sd["adapter"].cpu())
        assert torch.equal(second["frozen"], sd["frozen"].cpu())
