"""What stager refuses, and how: a StagerError naming the key or path, before anything is written,
never a RecursionError, a bare RuntimeError or OSError, garbage, or a file replaced that was not
ours to replace.

* ``save`` refuses up front what ``load`` would refuse (so a save that succeeds is a checkpoint
  that loads), naming the key: nesting past the reader's depth, tensors of more than 64
  dimensions, ints too long for the tree, views reaching past their storage.
* Staging checks that every view fits inside its storage (a freed or shrunk storage behind a
  view gave garbage).
* Cycles and deep nesting, nested tensors, read-only storage directories, files of other users.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import stager
from helpers import assert_same_tree
from stager import tree


def _sync_stager():
    return stager.DefaultStager(stager.StagingOptions(use_async_staging=False))


def _nest(depth: int, leaf, kind=dict):
    """``leaf`` under ``depth`` containers: root is depth 0, so ``leaf`` sits at depth ``depth``."""
    value = leaf
    for _ in range(depth):
        value = {"a": value} if kind is dict else [value]
    return value


def _shrunk_view():
    base = torch.arange(1000.0)
    view = base[:]  # shares the storage, which is then freed behind the view
    base.untyped_storage().resize_(0)
    return view


def _error_of(attempt) -> str:
    """What ``attempt()`` raised, as "Type: message", with its traceback dropped: a failing
    assertion must not make pytest print the arguments of the frames it went through (the
    repr of a view over a freed storage reads freed memory; a 100,000-deep dict's repr
    recurses too deeply)."""
    try:
        attempt()
    except BaseException as err:  # the type is what the test checks
        return f"{type(err).__name__}: {str(err)[:2000]}"
    return "no error"


# (name, a function making the state_dict, the key path the error must name, a word it must say)
_RenamedTuple = collections.namedtuple("Renamed", ["ok", "_bad"], rename=True)  # a field named "_1"
_REFUSED = [
    ("nesting past the reader's depth", lambda: _nest(tree.MAX_DEPTH, "leaf"), "root" + ".a" * tree.MAX_DEPTH,
     "levels"),
    ("a 65-dimension tensor", lambda: {"model": {"w": torch.zeros([1] * 65)}}, "root.model.w", "65 dimensions"),
    ("an int of 71 digits", lambda: {"opt": {"step": 10**70}}, "root.opt.step", "int"),
    ("a negative int of 65 characters", lambda: {"x": -(10**63)}, "root.x", "int"),
    ("a storage freed behind a view", lambda: {"m": {"v": _shrunk_view()}}, "root.m.v", "freed or shrunk"),
    ("a torch.Size with a negative entry", lambda: {"s": torch.Size([-1, 3])}, "root.s", "pickle"),
    ("a namedtuple a reader cannot rebuild", lambda: {"t": _RenamedTuple(1, 2)}, "root.t", "namedtuple"),
]


@pytest.mark.parametrize("name, make, key, word", _REFUSED, ids=[case[0] for case in _REFUSED])
def test_save_refuses_what_load_would_refuse_naming_the_key(tmp_path, name, make, key, word):
    target = tmp_path / "ckpt.stager"
    previous = {"w": torch.arange(4.0)}
    stager.save(previous, target)
    message = _error_of(lambda: stager.save(make(), target))
    assert message.startswith("StagerError: ") and key in message and word in message, message
    assert_same_tree(stager.load(target), previous)  # the previous checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["ckpt.stager"]


def test_what_load_takes_at_the_limits_saves_and_loads(tmp_path):
    """The refusals above are exactly at the reader's limits: one step inside them round-trips."""
    state_dict = {
        "deep": _nest(tree.MAX_DEPTH - 2, "leaf"),  # the leaf at depth MAX_DEPTH - 1
        "deep_tensor": _nest(tree.MAX_DEPTH - 1, torch.ones(2), kind=list),  # a tensor place at MAX_DEPTH
        "dims": torch.arange(2.0).reshape([2] + [1] * (tree.MAX_DIMS - 1)),
        "long_int": -(10**62),  # 64 characters with the sign
        "big_int": 2**200,
    }
    target = tmp_path / "limits.stager"
    stager.save(state_dict, target)
    assert_same_tree(stager.load(target), state_dict)


def test_long_ints_and_odd_sizes_are_pickled_when_allowed(tmp_path):
    state_dict = {"huge": 10**200, "size": torch.Size([-1, 4])}
    target = tmp_path / "pickled.stager"
    stager.save(state_dict, target, allow_pickle=True)
    assert stager.load(target, allow_pickle=True) == state_dict
    with pytest.raises(stager.StagerError, match=r"root\.huge"):
        stager.load(target)


@pytest.mark.parametrize("how", ["sync stage", "async stage", "blocking stager", "save"])
def test_a_view_past_its_storage_is_refused_at_stage_time(tmp_path, how):
    """A 0-byte storage behind a 1000-element view: copying its 0 bytes and viewing 1000
    elements of the host buffer handed out garbage. Every path refuses it, naming the key."""
    def attempt():
        state_dict = {"model": {"ok": torch.ones(3), "v": _shrunk_view()}}
        if how == "sync stage":
            _sync_stager().stage(state_dict)
        elif how == "async stage":
            with stager.DefaultStager() as async_stager:
                async_stager.stage(state_dict).result()
        elif how == "blocking stager":
            stager.BlockingAsyncStager().stage(state_dict)
        else:
            stager.save(state_dict, tmp_path / "x.stager")

    message = _error_of(attempt)
    assert re.match(r"StagerError: .*root\.model\.v\b.*4000.*0 bytes", message), message
    assert not os.listdir(tmp_path)

    def shrunk_not_freed():
        base = torch.arange(10.0)
        view = base[2:]
        base.untyped_storage().resize_(8 * 4)  # 8 elements left: the view's last is element 9
        _sync_stager().stage({"view": view})

    message = _error_of(shrunk_not_freed)
    assert re.match(r"StagerError: .*root\.view\b.*reaches byte 40 of a storage of 32 bytes", message), message


def test_a_view_of_a_dtensor_past_its_storage_names_the_dtensor_key():
    """The local tensor of a LocalShard (or DTensor) is named by the key of its owner."""
    pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.tensor import Shard

    from stager.dtensor import LocalShard, MeshInfo

    def attempt():
        shard = LocalShard(_shrunk_view(), MeshInfo((1,), ("dp",), "cpu", (0,), (0,)), (Shard(0),),
                           torch.Size([1000]), (1,))
        _sync_stager().stage({"layers": [{"w": shard}]})

    message = _error_of(attempt)
    assert re.match(r"StagerError: .*root\.layers\[0\]\.w\b", message), message


def test_cycles_are_stager_errors_naming_the_key(tmp_path):
    looped = {"w": torch.ones(2), "inner": {"x": 1}}
    looped["inner"]["back"] = looped
    in_list = [torch.ones(1)]
    in_list.append({"items": in_list})
    for state_dict, where, outer in [(looped, "root.inner.back", "root"), (in_list, "root[1].items", "root")]:
        with pytest.raises(stager.StagerError, match="cycle") as info:
            stager.save(state_dict, tmp_path / "cycle.stager")
        assert f"{where} is {outer} itself" in str(info.value)
    assert not os.listdir(tmp_path)
    # Staging keeps the cycle, as deepcopy does: the staged dict refers to itself.
    staged = _sync_stager().stage(looped)
    assert staged["inner"]["back"] is staged and torch.equal(staged["w"], looped["w"])


@pytest.mark.parametrize("kind", [dict, list])
def test_100k_deep_nesting_is_a_stager_error_naming_the_path(tmp_path, kind):
    first = ".a.a.a" if kind is dict else "[0][0][0]"
    for how in ("save", "stage", "blocking stager"):
        def attempt(how=how):
            state_dict = _nest(100_000, torch.ones(1), kind=kind)
            if how == "save":
                stager.save(state_dict, tmp_path / "deep.stager")
            elif how == "stage":
                _sync_stager().stage(state_dict)
            else:
                stager.BlockingAsyncStager().stage(state_dict)

        message = _error_of(attempt)
        assert message.startswith("StagerError: "), message
        assert "nested 99999 containers deep" in message and f"root{first}" in message, message
        assert len(message) < 1000
    assert not os.listdir(tmp_path)


def test_nested_tensors_stage_through_torch_and_are_refused_by_save_naming_the_key(tmp_path):
    with pytest.warns(UserWarning, match="nested"):
        nested = torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0)])
    state_dict = {"plain": torch.ones(2), "block": {"nested": nested}}
    staged = _sync_stager().stage(state_dict)
    assert staged["block"]["nested"].is_nested
    for got, want in zip(staged["block"]["nested"].unbind(), nested.unbind()):
        assert torch.equal(got, want)
    with pytest.raises(stager.StagerError, match=r"root\.block\.nested"):
        stager.save(state_dict, tmp_path / "nested.stager")
    assert not os.listdir(tmp_path)


# ---- directories and files that are not ours ------------------------------------------------------


@pytest.fixture
def read_only_mount(tmp_path):
    """A small tmpfs mounted read-only (with one directory made before), unmounted afterwards."""
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        (mount / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_replication_stager_on_a_read_only_filesystem_names_the_path(read_only_mount):
    for storage_dir, why in [(read_only_mount / "new" / "replicas", "Read-only file system"),
                             (read_only_mount / "existing", "not writable")]:
        with pytest.raises(stager.StagerError) as info:
            stager.ReplicationStager(storage_dir=str(storage_dir))
        message = str(info.value)
        assert str(storage_dir) in message and why in message and "EROFS" in message, message
    # Without persistence nothing is written there: an existing read-only directory is fine.
    stager.ReplicationStager(storage_dir=str(read_only_mount / "existing"), persist_format=None)


OTHER_USER_SCRIPT = textwrap.dedent(
    """
    import os, sys, pwd, torch, stager
    nobody = pwd.getpwnam("nobody")
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    directory = sys.argv[1]
    try:
        torch.save({"w": torch.ones(2)}, os.path.join(directory, "roots.pt"))
    except (PermissionError, RuntimeError) as err:  # torch's zip writer says "cannot be opened"
        print("TORCH-REFUSES", err)
    for name in ("roots.stager", "link.stager"):
        try:
            stager.save({"w": torch.ones(2)}, os.path.join(directory, name))
        except stager.StagerError as err:
            print("REFUSED", name, err.errno, err)
    stager.save({"w": torch.ones(2)}, os.path.join(directory, "mine.stager"))  # a new file is ours
    stager.save({"w": torch.full((2,), 2.0)}, os.path.join(directory, "mine.stager"))  # and replaceable
    print("SAVED")
    """
)


@pytest.fixture
def world_writable_dir():
    """A directory every user may write (mode 0777, no sticky bit) in a fresh 0755 directory
    under /tmp (pytest's tmp_path is private to root); removed afterwards."""
    outer = tempfile.mkdtemp(prefix="stager-shared-")
    try:
        os.chmod(outer, 0o755)
        shared = os.path.join(outer, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        yield pathlib.Path(shared)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def test_a_file_this_user_could_not_open_for_writing_is_not_replaced(world_writable_dir):
    """In a world-writable directory (no sticky bit), a rename by another user would replace
    root's mode-0444 file and change its owner; torch.save (open for writing) refuses it, and so
    does stager, through a symlink too."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    shared = world_writable_dir
    for name in ("roots.stager", "roots.pt"):
        stager.save({"w": torch.zeros(2)}, shared / name)
        os.chmod(shared / name, 0o444)
    os.symlink("roots.stager", shared / "link.stager")
    before = (shared / "roots.stager").read_bytes()
    result = subprocess.run([sys.executable, "-c", OTHER_USER_SCRIPT, str(shared)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "SAVED" in result.stdout, result.stdout + result.stderr
    assert "TORCH-REFUSES" in result.stdout, result.stdout
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2, result.stdout
    for line, name in zip(refused, ("roots.stager", "link.stager")):
        assert f" {name} 13 " in line and str(shared / name) in line and "could not open for writing" in line, line
    stat = os.stat(shared / "roots.stager")
    assert stat.st_uid == 0 and stat.st_mode & 0o777 == 0o444
    assert (shared / "roots.stager").read_bytes() == before
    assert not [name for name in os.listdir(shared) if name.endswith(".tmp")]
    assert torch.equal(stager.load(shared / "mine.stager")["w"], torch.full((2,), 2.0))
