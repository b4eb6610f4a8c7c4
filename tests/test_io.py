"""The I/O engine: direct I/O where the filesystem supports it (and the buffered fallback where it
does not), reads into pooled memory, zeroed padding, fused checksums, on real files.

Whether the bytes bypassed the page cache is read from the kernel (``mincore`` over a mapping of
the file), not from stager: a direct write or read leaves the file's data pages uncached.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stager
from helpers import assert_same_tree
from stager import _native
from stager.engine import process_pool

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

PAGE = mmap.PAGESIZE


def cached_fraction(path) -> float:
    """The fraction of the file's pages that are in the page cache."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            pages = (size + PAGE - 1) // PAGE
            residency = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, residency) == 0, ctypes.get_errno()
            return sum(r & 1 for r in residency) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def _probe_mode(directory) -> str:
    probe = os.path.join(directory, "probe.bin")
    with open(probe, "wb") as f:
        f.write(b"x")
    try:
        return _native.io_mode(probe)
    finally:
        os.unlink(probe)


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a filesystem with direct I/O (the test machine's disk)."""
    if _probe_mode(tmp_path) == "direct":
        yield str(tmp_path)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if _probe_mode(here) != "direct":
        pytest.skip("no directory on a filesystem with direct I/O here (tmp and tests/ are not)")
    directory = os.path.join(here, f".io-test-{os.getpid()}")
    os.makedirs(directory, exist_ok=True)
    yield directory
    subprocess.run(["rm", "-rf", directory], check=False)


@pytest.fixture
def memory_dir():
    """A directory on tmpfs, where direct I/O is not used."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    import tempfile

    directory = tempfile.mkdtemp(dir="/dev/shm", prefix="stager-io-test-")
    yield directory
    subprocess.run(["rm", "-rf", directory], check=False)


def _mixed_state_dict() -> dict:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(300_001, generator=gen)
    return {
        "big": torch.randn(3 << 20, generator=gen),  # 12 MiB: several requests
        "odd": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=gen),
        "tiny": [torch.randn(i + 1, generator=gen) for i in range(200)],
        "view": base[7:1000],
        "base": base,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0),
        "step": 12,
    }


def test_disk_is_written_and_read_direct(disk_dir):
    sd = _mixed_state_dict()
    path = os.path.join(disk_dir, "direct.stager")
    stager.save(sd, path)
    assert _native.io_mode(path) == "direct"
    # The kernel saw the bytes go straight to the device: none of them is in the page cache.
    assert cached_fraction(path) == 0.0
    out = stager.load(path)
    assert_same_tree(out, sd)
    # A cold load read the data directly too (at most the header went through the cache).
    assert cached_fraction(path) < 0.05
    # Through a stager: the staged buffer goes to the device as one run.
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False, use_shared_memory=False)) as s:
        stager.save(sd, path, stager=s)
    assert cached_fraction(path) == 0.0
    assert_same_tree(stager.load(path), sd)
    assert not [n for n in os.listdir(disk_dir) if n.endswith(".tmp")]


def test_tmpfs_falls_back_to_buffered_io(memory_dir):
    sd = _mixed_state_dict()
    path = os.path.join(memory_dir, "buffered.stager")
    stager.save(sd, path)
    assert _native.io_mode(path) == "buffered"
    assert_same_tree(stager.load(path), sd)
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False, use_shared_memory=False)) as s:
        stager.save(sd, path, stager=s)
    assert_same_tree(stager.load(path), sd)
    assert os.listdir(memory_dir) == ["buffered.stager"]


def test_environment_switch_forces_buffered_io_on_the_disk(disk_dir):
    path = os.path.join(disk_dir, "env.stager")
    script = textwrap.dedent(
        f"""
        import torch, stager
        sd = {{"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3)}}
        stager.save(sd, {path!r})
        print(stager._native.io_mode({path!r}))
        out = stager.load({path!r})
        assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])
        """
    )
    env = dict(os.environ, STAGER_DIRECT_IO="0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "buffered"
    # Buffered: the file went through the page cache (fdatasync writes it back, keeps it cached).
    assert cached_fraction(path) > 0.9


def test_warm_repeat_load_maps_no_new_memory(disk_dir):
    sd = _mixed_state_dict()
    path = os.path.join(disk_dir, "warm.stager")
    stager.save(sd, path)
    pool = process_pool(False)
    out = stager.load(path)
    assert_same_tree(out, sd)
    del out  # its buffer goes back to the process-wide pool, pages kept
    before = pool.stats()
    for _ in range(3):
        out = stager.load(path)
        assert_same_tree(out, sd)
        del out
    after = pool.stats()
    assert after["allocations"] == before["allocations"], (before, after)
    assert after["allocated_bytes"] == before["allocated_bytes"], (before, after)
    assert after["reuses"] >= before["reuses"] + 3


def _padding_bytes(path) -> list[bytes]:
    """The bytes of every padding entry of a stager file."""
    file = _native.CheckpointFile(str(path))
    start = file.data_start
    raw = open(path, "rb").read()
    return [raw[start + begin:start + end] for name, _, _, begin, end in file.entries
            if name.startswith("__stager__.pad.")]


def test_padding_never_carries_stale_pool_bytes(disk_dir, memory_dir):
    options = stager.StagingOptions(use_async_staging=False, use_shared_memory=False)
    # Odd sizes: 64-byte padding after every storage, in the staged buffer and in the file.
    sd = {f"t{i}": torch.ones(i * 3 + 1, dtype=torch.uint8) for i in range(300)}
    sd["large"] = torch.ones((1 << 20) + 5, dtype=torch.uint8)
    for directory in (disk_dir, memory_dir):
        with stager.DefaultStager(options) as s:
            # Fill the pool's buffer with 0xAB everywhere, then give it back.
            filler = s.stage({"x": torch.full((4 << 20,), 0xAB, dtype=torch.uint8)})
            del filler
            reuses = s._engine.pool.stats()["reuses"]
            pipelined = os.path.join(directory, "pipelined.stager")
            stager.save(sd, pipelined, stager=s)  # the writer gets the staged buffer itself
            assert s._engine.pool.stats()["reuses"] == reuses + 1  # it was the stale buffer
            staged = s.stage(sd)  # the stale buffer again, as a dict of tensors into it
            from_staged = os.path.join(directory, "staged.stager")
            stager.save(staged, from_staged)
        for path in (pipelined, from_staged):
            padding = _padding_bytes(path)
            assert len(padding) >= 250  # every storage whose size is not a multiple of 64
            assert all(chunk == bytes(len(chunk)) for chunk in padding), path
            assert_same_tree(stager.load(path), sd)


def test_flipped_byte_is_caught_on_direct_and_buffered_reads(disk_dir, memory_dir):
    sd = {"a": torch.randn(1 << 20), "b": torch.randn(1000)}
    for directory in (disk_dir, memory_dir):
        path = os.path.join(directory, "flip.stager")
        stager.save(sd, path)
        file = _native.CheckpointFile(path)
        entry, offset, nbytes, _ = file.layout()[1][0]
        with open(path, "r+b") as f:
            f.seek(offset + nbytes // 2)
            byte = f.read(1)
            f.seek(offset + nbytes // 2)
            f.write(bytes([byte[0] ^ 0x10]))
            f.flush()
            os.fsync(f.fileno())
        if directory == disk_dir:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so the load reads the device
            os.close(fd)
        with pytest.raises(stager.StagerError, match=f"crc32c checksum mismatch in storage 0 .*{entry}"):
            stager.load(path)
        assert stager.files.verify_command(path) == 1
