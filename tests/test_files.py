"""stager.save / stager.load: round trips, safetensors compatibility, durability under SIGKILL
and file-size limits, hostile files, and the inspect / verify commands."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import pytest
import torch

import stager
from helpers import all_dtype_tensors, assert_same_tree, same_storage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "attacks"))
import make_attacks

Point = collections.namedtuple("Point", ["x", "y"])


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).numpy()) == bytes(
        b.contiguous().view(torch.uint8).numpy()
    )


def _no_temp_files(directory) -> bool:
    return not [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_every_dtype_round_trips_and_opens_in_safetensors(tmp_path):
    from safetensors import safe_open

    sd = all_dtype_tensors()
    path = tmp_path / "dtypes.safetensors"
    stager.save(sd, path)
    out = stager.load(path)
    assert list(out) == list(sd)
    for key, tensor in sd.items():
        assert _bytes_equal(out[key], tensor), key
        assert out[key].stride() == tensor.stride()
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key, tensor in sd.items():
            if tensor.dtype in stager.files.SAFETENSORS_DTYPES:
                assert key in keys, key
                assert _bytes_equal(f.get_tensor(key), tensor), key
    assert _no_temp_files(tmp_path)


def test_nested_containers_views_and_leaves(tmp_path):
    base = torch.arange(40, dtype=torch.float64)
    complex_base = torch.randn(6, dtype=torch.complex64)
    sd = OrderedDict(
        model=OrderedDict([("layer.weight", torch.randn(4, 5)), ("layer.bias", torch.randn(5))]),
        views={"row": base[3:9], "strided": base[::3], "matrix": base[:36].view(6, 6).t(), "whole": base},
        conj=complex_base.conj(),
        lists=[torch.ones(2), [torch.zeros(1), (torch.full((2,), 3.0), "s")]],
        point=Point(torch.tensor(1), 2.5),
        leaves={"none": None, "flag": True, 7: "int key", "big": 2**70, "f": float("inf"), "c": 1 + 2j,
                "b": b"\x00\xff", "dt": torch.bfloat16, "dev": torch.device("cpu"), "size": torch.Size([2, 3])},
        empty={}, empty_tensor=torch.empty(0, 3), scalar=torch.tensor(5, dtype=torch.int64),
    )
    sd["alias"] = sd["model"]["layer.bias"]
    path = tmp_path / "nested.safetensors"
    stager.save(sd, path)
    out = stager.load(path)
    point = out.pop("point")  # namedtuples come back as an equivalent type made from the file
    assert type(point).__name__ == "Point" and point._fields == ("x", "y") and point == sd.pop("point")
    assert_same_tree(out, sd)
    views = out["views"]
    assert same_storage(views["row"], views["whole"]) and same_storage(views["strided"], views["matrix"])
    assert out["alias"] is out["model"]["layer.bias"]
    assert out["conj"].is_conj() and torch.equal(out["conj"], sd["conj"])


def test_empty_dict_and_tensorless(tmp_path):
    for value in ({}, {"a": 1, "b": [None, "x"]}, OrderedDict()):
        stager.save(value, tmp_path / "e.safetensors")
        out = stager.load(tmp_path / "e.safetensors")
        assert out == value and type(out) is type(value)


def test_pickle_needs_opt_in_both_ways(tmp_path):
    sd = {"w": torch.ones(2), "obj": Point}  # a class: not a plain value
    with pytest.raises(stager.StagerError, match="allow_pickle"):
        stager.save(sd, tmp_path / "p.safetensors")
    assert not os.path.exists(tmp_path / "p.safetensors")
    stager.save(sd, tmp_path / "p.safetensors", allow_pickle=True)
    with pytest.raises(stager.StagerError, match="refusing to unpickle"):
        stager.load(tmp_path / "p.safetensors")
    assert stager.load(tmp_path / "p.safetensors", allow_pickle=True)["obj"] is Point


def test_model_and_optimizer_resume(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randn(32, 8)

    def step(m, o):
        o.zero_grad()
        m(data).pow(2).mean().backward()
        o.step()

    for _ in range(3):
        step(model, optim)
    stager.save({"model": model.state_dict(), "optim": optim.state_dict(), "epoch": 3}, tmp_path / "ckpt.safetensors")
    step(model, optim)  # the reference continues

    resumed = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    resumed_optim = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    ckpt = stager.load(tmp_path / "ckpt.safetensors")
    assert ckpt["epoch"] == 3
    resumed.load_state_dict(ckpt["model"])
    resumed_optim.load_state_dict(ckpt["optim"])
    step(resumed, resumed_optim)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_staged_dict_and_pipelined_save(tmp_path):
    sd = {f"t{i}": torch.randn(1000 + i) for i in range(50)}
    sd["big"] = torch.randn(3_000_000)
    with stager.DefaultStager(stager.StagingOptions(use_async_staging=False)) as s:
        staged = s.stage(sd)
        stager.save(staged, tmp_path / "staged.safetensors")
        stager.save(sd, tmp_path / "pipelined.safetensors", stager=s)
    for name in ("staged", "pipelined"):
        assert_same_tree(stager.load(tmp_path / f"{name}.safetensors"), sd)
    assert _no_temp_files(tmp_path)


def test_corrupted_byte_is_detected_naming_the_checksum(tmp_path):
    sd = {"w": torch.randn(1000)}
    path = tmp_path / "c.safetensors"
    stager.save(sd, path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(stager.StagerError, match=r"crc32c checksum mismatch.*'w'|crc32c checksum mismatch.*\"w\""):
        stager.load(path)
    out = stager.load(path, verify=False)  # the caller may still read it on purpose
    assert not torch.equal(out["w"], sd["w"])


def test_errors_name_the_path_and_keep_the_previous_file(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "x.safetensors"
    with pytest.raises(stager.StagerError, match=str(missing)):
        stager.save({"w": torch.ones(3)}, missing)
    with pytest.raises(stager.StagerError, match="opening"):
        stager.load(tmp_path / "absent.safetensors")


def test_read_only_directory(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    target = directory / "x.safetensors"
    stager.save({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)

        def undo():
            os.chmod(directory, 0o755)
    else:  # root ignores permission bits: make the directory immutable instead
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a read-only directory")

        def undo():
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    try:
        with pytest.raises(stager.StagerError) as info:
            stager.save({"w": torch.ones(4)}, target)
    finally:
        undo()
    message = str(info.value)
    assert str(target) in message, message
    assert "Permission denied" in message or "not permitted" in message, message
    assert target.read_bytes() == before
    assert _no_temp_files(directory)


def test_file_size_limit_keeps_previous_file(tmp_path):
    target = tmp_path / "limited.safetensors"
    small = {"w": torch.arange(10.0)}
    stager.save(small, target)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, torch, stager
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            stager.save({{"w": torch.ones(1 << 20)}}, {str(target)!r})
        except stager.StagerError as err:
            print("ERROR", err)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # SIGXFSZ is ignored by Python: EFBIG, not a kill
    assert "ERROR" in result.stdout and str(target) in result.stdout, result.stdout
    assert "too large" in result.stdout.lower(), result.stdout
    assert target.read_bytes() == before
    assert_same_tree(stager.load(target), small)
    assert _no_temp_files(tmp_path)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, stager
    path = sys.argv[1]
    version = 0
    sds = [{"version": v, "w": torch.full((4 << 20,), float(v)), "b": [torch.full((1000,), float(v))] * 3}
           for v in range(1, 3)]
    print("ready", flush=True)
    while True:
        version = version % 2 + 1
        stager.save(sds[version - 1], path)
    """
)


def test_sigkill_at_random_moments_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "k.safetensors"
    stager.save({"version": 0, "w": torch.zeros(4 << 20), "b": [torch.zeros(1000)] * 3}, target)
    rng = random.Random(1234)
    seen = set()
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        out = stager.load(target)  # verify=True: complete and uncorrupted
        version = out["version"]
        seen.add(version)
        assert torch.equal(out["w"], torch.full((4 << 20,), float(version)))
        assert out["b"][0] is out["b"][2] and torch.equal(out["b"][1], torch.full((1000,), float(version)))
        for name in os.listdir(tmp_path):  # a killed save may leave its temp file, never a torn target
            if name.endswith(".tmp"):
                os.unlink(tmp_path / name)
    assert seen - {0}, "no save completed before a kill"


@pytest.fixture(scope="module")
def attack_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("attacks")
    return make_attacks.build(str(directory))


@pytest.mark.parametrize("name", sorted(make_attacks.CASES))
def test_hostile_file_fails_cleanly(attack_files, name, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv(make_attacks.MARKER_ENV, str(marker))
    path, expected = attack_files[name]
    with pytest.raises(stager.StagerError) as info:
        stager.load(path)
    assert expected in str(info.value), str(info.value)
    assert not marker.exists(), "a pickle ran while loading"
    assert stager.files.verify_command(path) == 1


def test_special_files_are_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, tmp_path, "/dev/zero"):
        with pytest.raises(stager.StagerError):
            stager.load(path)


def test_hostile_corpus_is_complete(attack_files):
    assert len(attack_files) >= 40


def _cli(capsys, *args):
    from stager.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_cli_inspect_and_verify(tmp_path, capsys):
    path = tmp_path / "cli.safetensors"
    stager.save({"model": {"w": torch.randn(3, 4, dtype=torch.bfloat16)}, "step": 12}, path)
    result = _cli(capsys, "inspect", str(path))
    assert result.returncode == 0, result.stderr
    for words in ("model.w", "bfloat16", "[3, 4]", "crc32c", "step: 12", "format: stager"):
        assert words in result.stdout, (words, result.stdout)
    result = _cli(capsys, "verify", str(path))
    assert result.returncode == 0 and "OK" in result.stdout
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = _cli(capsys, "verify", str(path))
    assert result.returncode == 1 and "crc32c checksum mismatch" in result.stderr, result.stderr
    path.write_bytes(bytes(raw[:-3]))
    result = _cli(capsys, "verify", str(path))
    assert result.returncode == 1 and "truncated" in result.stderr, result.stderr
    result = _cli(capsys, "inspect", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 1 and "missing.safetensors" in result.stderr


def test_cli_verify_exit_code_from_the_command_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x80\x04not a stager file")
    result = subprocess.run([sys.executable, "-m", "stager.cli", "verify", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "pickle" in result.stderr, result.stderr


def test_temp_files_of_a_killed_save_are_cleaned_by_the_next_save(tmp_path):
    path = tmp_path / "ckpt.stager"
    # What a save killed mid-write leaves: its temp file, named after a process that is gone.
    stale = tmp_path / "ckpt.stager.2147483646.0.tmp"
    stale.write_bytes(b"partial")
    stager.save({"w": torch.ones(3)}, path)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.stager"]


def _tree_of(path) -> tuple[dict, dict, bytes]:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["stager.tree"]), raw[8 + n :]


def test_header_over_the_safetensors_limit_is_written_read_and_flagged(tmp_path, capsys):
    # Issue 15.8: a dict whose header is over safetensors' 100 MB limit used to be refused by save.
    # Long keys get there with few tensors: each name is stored three times (entry, tree, storages).
    prefix = "k" * 2500
    sd = {f"{prefix}.{i}": torch.full((2,), float(i)) for i in range(16_000)}
    path = tmp_path / "big-header.safetensors"
    stager.save(sd, path)
    header_nbytes = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_nbytes > stager._native.SAFETENSORS_MAX_HEADER_BYTES
    assert_same_tree(stager.load(path), sd)
    result = _cli(capsys, "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "safetensors readers will refuse this file" in result.stdout
    import safetensors

    with pytest.raises(Exception, match=r"(?i)header"):
        safetensors.safe_open(str(path), framework="pt")
    result = _cli(capsys, "verify", str(path))
    assert result.returncode == 0, result.stderr
    # A file under the limit says nothing of the kind.
    small = tmp_path / "small.safetensors"
    stager.save({"w": torch.ones(3)}, small)
    assert "refuse" not in _cli(capsys, "inspect", str(small)).stdout


def test_header_per_tensor_is_compact(tmp_path):
    # Issue 15.8: the header of many tiny tensors was ~361 bytes per tensor (349 MB for a million);
    # version 2 of the tree writes bare keys, bare tensor places and array records.
    sd = {f"block{i // 8}.param{i % 8}": torch.randn(4 + i % 29) for i in range(5000)}
    path = tmp_path / "tiny.safetensors"
    stager.save(sd, path)
    header_nbytes = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_nbytes / len(sd) < 260, header_nbytes / len(sd)
    _, meta, _ = _tree_of(path)
    assert meta["version"] == 2 and meta["tree"]["items"][0] == ["block0.param0", 0]


def test_version_1_tree_still_loads(tmp_path):
    # Files written before the compact tree (version 1: every node an object) load unchanged.
    import json
    import struct

    base = torch.randn(64, dtype=torch.complex64)
    sd = {
        "w": torch.randn(4, 3).t(),
        "views": [base[2:10], base[::4].conj()],
        7: torch.zeros(2, 1, 3)[:, :, 1:],
        "neg": torch._neg_view(torch.ones(3)),
        "step": 3,
    }
    path = tmp_path / "v2.safetensors"
    stager.save(sd, path)
    header, meta, data = _tree_of(path)

    def v1(node):
        if type(node) is int:
            return {"t": "tensor", "i": node}
        if isinstance(node, dict) and "items" in node:
            items = node["items"]
            if node["t"] in ("dict", "odict"):
                items = [[{"t": "str", "v": k} if type(k) is str else k, v1(v)] for k, v in items]
            else:
                items = [v1(v) for v in items]
            return {**node, "items": items}
        return node

    def record(entry):
        dtype, shape, stride, offset, storage, *flags = entry
        out = {"dtype": dtype, "shape": shape, "stride": stride or torch.empty(shape).stride(),
               "offset": offset, "storage": storage}
        if flags and flags[0] & 1:
            out["conj"] = True
        if flags and flags[0] & 2:
            out["neg"] = True
        return out

    old = {"version": 1, "tree": v1(meta["tree"]), "tensors": [record(t) for t in meta["tensors"]],
           "storages": [{"nbytes": n} for n in meta["storages"]]}
    assert old["tree"] != meta["tree"]
    header["__metadata__"]["stager.tree"] = json.dumps(old)
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 4096)  # keep the data section where the entries say
    old_path = tmp_path / "v1.safetensors"
    old_path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    loaded = stager.load(old_path)
    assert_same_tree(loaded, sd)
    assert loaded["w"].stride() == sd["w"].stride() and loaded["views"][1].is_conj()
