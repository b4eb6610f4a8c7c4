"""Hostile stager files, like safetensors' ``attacks/``: each case is a file that must make
``stager.load`` (and ``stager verify``) fail with a clean ``StagerError`` saying what is wrong —
never a crash, a hang, a huge allocation or code execution.

The corpus is generated from one valid file so it follows the format as it evolves:
``python tests/attacks/make_attacks.py DIR`` writes every case into DIR (``<name>.safetensors``)
with ``expected.txt`` listing the message each must produce; the tests call :func:`build`.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Callable

import torch

import stager

MARKER_ENV = "STAGER_ATTACK_MARKER"


class Exploit:
    """A pickle that, if ever unpickled, creates the file named by $STAGER_ATTACK_MARKER."""

    def __reduce__(self):
        return (open, (os.environ.get(MARKER_ENV, "/tmp/stager-attack-marker"), "w"))


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | bytes, data: bytes) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _edit_header(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def apply(raw: bytes) -> bytes:
        header, data = _split(raw)
        edit(header)
        return _join(header, data)

    return apply


# Where each field sits in a version-2 tensor record (python/stager/tree.py).
_FIELD = {"dtype": 0, "shape": 1, "stride": 2, "offset": 3, "storage": 4}


def _set_tensor(tree: dict, index: int, field: str, value) -> None:
    tree["tensors"][index][_FIELD[field]] = value


def _edit_tree(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def apply(header: dict) -> None:
        tree = json.loads(header["__metadata__"]["stager.tree"])
        edit(tree)
        header["__metadata__"]["stager.tree"] = json.dumps(tree)

    return _edit_header(apply)


def _set_meta(key: str, value: object) -> Callable[[bytes], bytes]:
    return _edit_header(lambda h: h["__metadata__"].__setitem__(key, value))


def _first_entry(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0])


def _flip_last_data_byte(raw: bytes) -> bytes:
    out = bytearray(raw)
    out[-1] ^= 0x40
    return bytes(out)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _pickle_file() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    return buffer.getvalue()


#: name -> (how to make the file from the valid one, words the error must contain)
CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda raw: b"", "too few"),
    "seven_bytes": (lambda raw: raw[:7], "too few"),
    "header_len_absurd": (lambda raw: struct.pack("<Q", 2**63) + raw[8:], "absurd"),
    "header_len_past_eof": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "truncated"),
    "header_not_json": (lambda raw: _join(b"{not json at all" + b" " * 40, b""), "not valid JSON"),
    "header_not_object": (lambda raw: _join(b"[1, 2, 3]", b""), "JSON object"),
    "header_not_utf8": (lambda raw: _join(b'{"\xff\xfe": 1}', b""), "UTF-8"),
    "header_deeply_nested": (lambda raw: _join(('{"a":' + _deep(100_000) + "}").encode(), b""), "JSON"),
    "truncated_data": (lambda raw: raw[:-100], "truncated"),
    "truncated_in_header": (lambda raw: raw[:40], "truncated"),
    "trailing_bytes": (lambda raw: raw + b"\0" * 16, "trailing"),
    "unknown_dtype": (_edit_header(lambda h: _first_entry(h).__setitem__("dtype", "F128")), "unknown dtype"),
    "shape_mismatch": (_edit_header(lambda h: _first_entry(h).__setitem__("shape", [10**6])), "needs"),
    "shape_overflow": (_edit_header(lambda h: _first_entry(h).__setitem__("shape", [2**40, 2**40, 2**40])), "overflows"),
    "negative_offset": (_edit_header(lambda h: _first_entry(h).__setitem__("data_offsets", [-8, 0])), "non-negative"),
    "offsets_reversed": (_edit_header(lambda h: _first_entry(h).__setitem__("data_offsets", _first_entry(h)["data_offsets"][::-1])), "end before"),
    "overlapping_ranges": (
        _edit_header(lambda h: h.__setitem__("evil", {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]})),
        "overlaps",
    ),
    "gap_in_data": (
        _edit_header(lambda h: [e.__setitem__("data_offsets", [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]) for k, e in h.items() if k != "__metadata__"]),
        "gap",
    ),
    "metadata_not_strings": (_set_meta("stager.version", 1), "not a string"),
    "plain_safetensors": (_edit_header(lambda h: h.__setitem__("__metadata__", {"format": "pt"})), "no stager metadata"),
    "unsupported_version": (_set_meta("stager.version", "99"), "unsupported"),
    "storages_not_list": (_set_meta("stager.storages", "{"), "stager.storages"),
    "storage_names_missing_entry": (_edit_header(lambda h: h["__metadata__"].__setitem__("stager.storages", json.dumps(["nope"] + json.loads(h["__metadata__"]["stager.storages"])[1:]))), "lacks"),
    "storage_claimed_twice": (_edit_header(lambda h: h["__metadata__"].__setitem__("stager.storages", json.dumps([json.loads(h["__metadata__"]["stager.storages"])[0]] * len(json.loads(h["__metadata__"]["stager.storages"]))))), "two storages"),
    "crc_count_mismatch": (_edit_header(lambda h: h["__metadata__"].__setitem__("stager.crc32c", h["__metadata__"]["stager.crc32c"] + ",00000000")), "checksums"),
    "crc_not_hex": (_edit_header(lambda h: h["__metadata__"].__setitem__("stager.crc32c", "zz" + h["__metadata__"]["stager.crc32c"][2:])), "hex"),
    "flipped_data_byte": (_flip_last_data_byte, "crc32c checksum mismatch"),
    "tree_not_json": (_set_meta("stager.tree", "{'python': 'literal'}"), "not valid JSON"),
    "tree_deeply_nested": (_set_meta("stager.tree", _deep(200_000)), "JSON"),
    "tree_nodes_too_deep": (
        _edit_tree(lambda t: t.__setitem__("tree", json.loads('{"t":"list","items":[' * 300 + "]}" * 300))),
        "deeper",
    ),
    "tree_wrong_version": (_edit_tree(lambda t: t.__setitem__("version", 7)), "unsupported version"),
    "tree_view_past_storage": (_edit_tree(lambda t: _set_tensor(t, 0, "offset", 10**9)), "reaches past"),
    "tree_huge_shape": (_edit_tree(lambda t: _set_tensor(t, 0, "shape", [2**62] * len(t["tensors"][0][_FIELD["shape"]]))), "reaches past"),
    "tree_negative_stride": (_edit_tree(lambda t: _set_tensor(t, 0, "stride", [-1] * len(t["tensors"][0][_FIELD["shape"]]))), "stride"),
    "tree_bad_dtype": (_edit_tree(lambda t: _set_tensor(t, 0, "dtype", "object")), "unknown dtype"),
    "tree_storage_out_of_range": (_edit_tree(lambda t: _set_tensor(t, 0, "storage", 10**6)), "refers to storage"),
    "tree_tensor_record_short": (_edit_tree(lambda t: t["tensors"][0].pop()), "must be [dtype"),
    "tree_tensor_bad_flags": (_edit_tree(lambda t: t["tensors"][0].append(99)), "bad flags"),
    "tree_conj_not_complex": (_edit_tree(lambda t: t["tensors"][0].append(1)), "not complex"),
    "tree_tensor_place_negative": (_edit_tree(lambda t: t.__setitem__("tree", -1)), "refers to tensor"),
    "tree_tensor_out_of_range": (_edit_tree(lambda t: t.__setitem__("tree", {"t": "tensor", "i": 10**6})), "refers to tensor"),
    "tree_absurd_storage_size": (_edit_tree(lambda t: t["storages"].__setitem__(0, 10**15)), "bytes"),
    "tree_storage_size_mismatch": (_edit_tree(lambda t: t["storages"].__setitem__(2, t["storages"][2] - 8)), "holds"),
    "tree_storage_size_negative": (_edit_tree(lambda t: t["storages"].__setitem__(0, -8)), "byte count"),
    "tree_missing_storage": (_edit_tree(lambda t: t["storages"].pop()), "storage"),
    "tree_key_not_object": (  # found by scripts/fuzz_header.py
        _edit_tree(lambda t: t.__setitem__("tree", {"t": "dict", "items": [[7, {"t": "none"}]]})),
        "value must be an object",
    ),
    "tree_dtype_not_string": (_edit_tree(lambda t: _set_tensor(t, 0, "dtype", ["float32"])), "unknown dtype"),  # fuzz
    "tree_unknown_node": (_edit_tree(lambda t: t.__setitem__("tree", {"t": "exec", "v": "import os"})), "unknown node type"),
    "tree_pickle_leaf": (
        _edit_tree(lambda t: t.__setitem__("tree", {"t": "pickle", "v": __import__("base64").b64encode(pickle.dumps(Exploit())).decode()})),
        "refusing to unpickle",
    ),
    "torch_save_pickle_renamed": (lambda raw: _pickle_file(), "zip archive"),
    "raw_pickle_renamed": (lambda raw: pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "pickle"),
}


def valid_state_dict() -> dict:
    torch.manual_seed(0)
    base = torch.arange(64, dtype=torch.float32)
    return {
        "model": {"w": torch.randn(16, 8), "b": torch.zeros(8)},
        "views": [base[4:20], base[::4]],
        "step": 7,
        "name": "attack-base",
    }


def build(directory: str) -> dict[str, tuple[str, str]]:
    """Writes every case into ``directory``; returns name -> (path, expected words)."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "valid.safetensors")
    stager.save(valid_state_dict(), base)
    with open(base, "rb") as f:
        raw = f.read()
    out = {}
    for name, (make, expected) in CASES.items():
        path = os.path.join(directory, f"{name}.safetensors")
        with open(path, "wb") as f:
            f.write(make(raw))
        out[name] = (path, expected)
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "attack-files"
    cases = build(target)
    with open(os.path.join(target, "expected.txt"), "w") as f:
        for name, (_, expected) in cases.items():
            f.write(f"{name}\t{expected}\n")
    print(f"wrote {len(cases)} hostile files to {target}")
