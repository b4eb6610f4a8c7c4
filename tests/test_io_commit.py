"""The one atomic commit behind every persisted file: only regular files are replaced (symlinks
followed), temp files of killed writers (save, streamed replica, torch replica) are swept by the
next save or stage in the directory while live writers' temps and files that are not ours stay,
and a full disk surfaces as a StagerError naming the path and ENOSPC.

Real processes are SIGKILLed while their temp file exists; real gloo groups on 127.0.0.1; a real
1 MiB tmpfs for the full disk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import stager
from helpers import assert_same_tree
from stager import files

TEMP_SUFFIX = ".stager.tmp"


def temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# ---- only regular files are replaced ----------------------------------------------------------


def _special_files(tmp_path):
    fifo = tmp_path / "fifo.stager"
    os.mkfifo(fifo)
    sock_path = tmp_path / "socket.stager"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    directory = tmp_path / "dir.stager"
    directory.mkdir()
    cases = [(str(fifo), "FIFO", stat.S_ISFIFO), (str(sock_path), "socket", stat.S_ISSOCK),
             (str(directory), "directory", stat.S_ISDIR)]
    if os.geteuid() == 0:  # only root could replace it: the case the issue found
        cases.append(("/dev/null", "character device", stat.S_ISCHR))
    return cases, sock


@pytest.mark.parametrize("writer", ["save", "torch"])
def test_special_files_are_refused_and_left_alone(tmp_path, writer):
    cases, sock = _special_files(tmp_path)
    try:
        for path, kind, is_kind in cases:
            with pytest.raises(stager.StagerError) as info:
                if writer == "save":
                    stager.save({"w": torch.ones(8)}, path)
                else:
                    files.durable_torch_save({"w": torch.ones(8)}, path)
            message = str(info.value)
            assert path in message and kind in message and "regular file" in message, message
            assert is_kind(os.lstat(path).st_mode), f"{path} was replaced"
        assert temps(tmp_path) == []
        assert temps("/dev") == []
    finally:
        sock.close()


def test_symlinks_are_followed_and_their_targets_replaced_in_place(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    links = tmp_path / "links"
    links.mkdir()
    target = real_dir / "ckpt.stager"
    stager.save({"w": torch.zeros(4)}, target)
    os.symlink("../real/ckpt.stager", links / "latest.stager")
    sd = {"w": torch.arange(4.0), "n": 3}
    stager.save(sd, links / "latest.stager")
    assert os.path.islink(links / "latest.stager")
    assert_same_tree(stager.load(target), sd)
    assert_same_tree(stager.load(links / "latest.stager"), sd)
    # torch.save writes through a link the same way.
    torch_target = real_dir / "replica.pt"
    os.symlink("../real/replica.pt", links / "replica.pt")  # dangling: created like open("wb")
    files.durable_torch_save({"w": torch.ones(2)}, links / "replica.pt")
    assert os.path.islink(links / "replica.pt")
    with open(torch_target, "rb") as f:
        assert torch.equal(torch.load(f, weights_only=True)["w"], torch.ones(2))
    # A chain that ends in a device is refused, naming the link and where it leads.
    os.symlink("/dev/null", links / "null.stager")
    with pytest.raises(stager.StagerError, match=r"null\.stager.*links to /dev/null, which is a character device"):
        stager.save(sd, links / "null.stager")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert temps(real_dir) == [] and temps(links) == []


# ---- the sweep ----------------------------------------------------------------------------------


HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from stager import _native
    file = _native.AtomicFile(sys.argv[1])
    import os
    os.write(file.fileno(), b"a live writer's bytes")
    print(file.temp_path, flush=True)
    time.sleep(600)
    """
)


def test_sweep_keeps_live_writers_and_foreign_files_and_removes_dead_temps(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path / "held.bin")],
                              stdout=subprocess.PIPE, text=True)
    try:
        live_temp = holder.stdout.readline().strip()
        assert live_temp.endswith(TEMP_SUFFIX) and os.path.exists(live_temp)
        # Not ours: other names, a FIFO that looks like ours, a 0.1-style temp of a live pid.
        foreign = ["notes.tmp", "data.1.2.tmp", "ckpt.stager.tmp", "x.safetensors.tmp"]
        for name in foreign:
            (tmp_path / name).write_bytes(b"user data")
        os.mkfifo(tmp_path / "q.7.8.stager.tmp")
        # Debris of dead writers, of other final names: ours by pattern, and nobody holds its lock
        # (the pid in the name is this very process, alive: liveness is the lock, not the pid).
        dead = [f"other.stager.{os.getpid()}.99{TEMP_SUFFIX}", f"rank_1_replica_partner_0.pt.4242.0{TEMP_SUFFIX}"]
        for name in dead:
            (tmp_path / name).write_bytes(b"partial")
        stager.save({"w": torch.ones(3)}, tmp_path / "new.stager")
        left = set(os.listdir(tmp_path))
        assert os.path.basename(live_temp) in left
        assert not left & set(dead), left
        assert set(foreign) | {"q.7.8.stager.tmp", "new.stager"} <= left
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    # Its writer is gone: the next save removes its temp file.
    assert os.path.exists(live_temp)
    stager.save({"w": torch.ones(3)}, tmp_path / "new.stager")
    assert not os.path.exists(live_temp)
    assert temps(tmp_path) == sorted(["notes.tmp", "data.1.2.tmp", "ckpt.stager.tmp", "x.safetensors.tmp",
                                      "q.7.8.stager.tmp"])


SAVE_LOOP = textwrap.dedent(
    """
    import sys, torch, stager
    path = sys.argv[1]
    sds = [{"v": v, "w": torch.full((16 << 20,), float(v))} for v in (1, 2)]
    print("ready", flush=True)
    v = 0
    while True:
        v = 1 - v
        stager.save(sds[v], path)
    """
)


def _kill_when_temp_appears(proc, directory, timeout=60.0) -> list[str]:
    """SIGKILLs ``proc`` as soon as a stager temp file exists in ``directory``; returns the temps
    left after the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited with {proc.returncode} before it was killed")
        if any(n.endswith(TEMP_SUFFIX) for n in os.listdir(directory)):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return [n for n in os.listdir(directory) if n.endswith(TEMP_SUFFIX)]
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no temp file appeared")


def test_sigkill_during_save_leaves_old_or_new_and_the_next_save_sweeps(tmp_path):
    target = tmp_path / "a.stager"
    stager.save({"v": 0, "w": torch.zeros(16 << 20)}, target)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        left = _kill_when_temp_appears(proc, tmp_path)
        proc.stdout.close()
        out = stager.load(target)  # the previous or the new file, complete (checksums verified)
        assert torch.equal(out["w"], torch.full((16 << 20,), float(out["v"])))
        if left:
            break
    assert left, "every kill landed between saves"
    # The next save in this directory, of another file, removes the killed writer's temp.
    stager.save({"w": torch.ones(2)}, tmp_path / "b.stager")
    assert temps(tmp_path) == []


REPLICA_WORKER = textwrap.dedent(
    """
    import datetime, json, sys, torch, torch.distributed as dist, stager
    rank, port, directory, fmt, steps, numel = (int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                                                int(sys.argv[5]), int(sys.argv[6]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    s = stager.ReplicationStager(timeout=datetime.timedelta(seconds=5), storage_dir=directory,
                                 persist_format=fmt)
    sd = {"rank": rank, "w": torch.full((numel,), float(rank + 1)), "b": torch.arange(1000) + rank}
    print("ready", flush=True)
    result = {"rank": rank, "steps": 0}
    try:
        for _ in range(steps):
            s.stage(sd)
            result["steps"] += 1
    except stager.StagerError as err:
        result["error"] = str(err)
        result["errno"] = getattr(err, "errno", None)
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_pair(dirs, fmt, steps, numel):
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", REPLICA_WORKER, str(rank), port, str(dirs[rank]), fmt,
                              str(steps), str(numel)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]


def _result(proc, timeout=120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"rank exited with {proc.returncode} and no result:\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("fmt", ["stager", "torch"])
def test_sigkill_during_a_replica_write_and_the_next_stage_sweeps(tmp_path, fmt):
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    procs = _start_pair(dirs, fmt, steps=1000, numel=8 << 20)
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        left = _kill_when_temp_appears(procs[1], dirs[1])
        assert left, "the replica's temp file vanished before the kill"
        survivor = _result(procs[0])  # the partner fails within its timeout and exits by itself
        assert "error" in survivor, survivor
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    # A restarted pair stages once: rank 1's directory is clean and holds a complete replica.
    procs = _start_pair(dirs, fmt, steps=1, numel=1 << 10)
    results = [_result(proc) for proc in procs]
    assert all(r.get("steps") == 1 for r in results), results
    assert temps(dirs[1]) == [] and temps(dirs[0]) == []
    replica = stager.recover(dirs[1], 0)
    assert torch.equal(replica["w"], torch.full((1 << 10,), 1.0))


# ---- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that fills up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_raises_stager_error_with_path_and_enospc(small_tmpfs):
    small = {"w": torch.arange(10.0)}
    big = {"w": torch.ones(1 << 20)}  # 4 MiB
    for name, writer in (("r.pt", files.durable_torch_save), ("r.stager", stager.save)):
        path = small_tmpfs / name
        writer(small, path)
        before = path.read_bytes()
        with pytest.raises(stager.StagerError) as info:
            writer(big, path)
        message = str(info.value)
        assert str(path) in message and ("ENOSPC" in message or "No space left" in message), message
        assert "inline_container" not in message, message
        if writer is files.durable_torch_save:
            assert info.value.errno == errno.ENOSPC
        assert path.read_bytes() == before
        assert temps(small_tmpfs) == []


def test_full_disk_on_a_torch_replica_names_the_path_and_enospc(tmp_path, small_tmpfs):
    dirs = [tmp_path / "rank0", small_tmpfs]
    dirs[0].mkdir()
    procs = _start_pair(dirs, "torch", steps=1, numel=1 << 20)
    results = [_result(proc) for proc in procs]
    holder = results[1]
    assert "error" in holder, results
    assert "rank_1_replica_partner_0.pt" in holder["error"] and "ENOSPC" in holder["error"], holder
    assert "inline_container" not in holder["error"], holder
    assert "error" in results[0], results  # the source learns its replica was not persisted
    assert temps(small_tmpfs) == []
