"""Assertions and file helpers shared by the test modules: what "a staged dict equals the input" means, and damaging a stored buffer."""

from collections.abc import Mapping

import torch

from stager import _native


def assert_same_tree(staged, source, path="root"):
    """Same nesting, container types, keys, and for tensors: CPU, detached, same dtype, shape,
    stride, storage offset, conj bit and values; non-tensor leaves equal."""
    assert type(staged) is type(source) or (
        isinstance(source, torch.Tensor) and type(staged) is torch.Tensor
    ), f"{path}: {type(staged)} != {type(source)}"
    if isinstance(source, torch.Tensor):
        assert staged.device.type == "cpu", path
        assert not staged.requires_grad and staged.grad_fn is None, path
        assert staged.dtype == source.dtype, path
        assert staged.shape == source.shape, path
        assert staged.stride() == source.stride(), path
        assert staged.storage_offset() == source.storage_offset(), path
        assert staged.is_conj() == source.is_conj(), path
        expected = source.detach().cpu()
        assert torch.equal(staged.view(torch.uint8) if staged.dtype.itemsize == 1 and staged.dtype != torch.bool else staged,
                           expected.view(torch.uint8) if expected.dtype.itemsize == 1 and expected.dtype != torch.bool else expected) \
            if staged.dtype not in FLOAT8 else torch.equal(staged.view(torch.uint8), expected.view(torch.uint8)), path
    elif isinstance(source, Mapping):
        assert list(staged.keys()) == list(source.keys()), path
        for key in source:
            assert_same_tree(staged[key], source[key], f"{path}.{key}")
    elif isinstance(source, (list, tuple)):
        assert len(staged) == len(source), path
        for index, (a, b) in enumerate(zip(staged, source)):
            assert_same_tree(a, b, f"{path}[{index}]")
    else:
        assert staged == source, path


FLOAT8 = {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
}


def same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def all_dtype_tensors():
    """One small tensor of every dtype torch can make on CPU, with non-trivial bytes."""
    out = {}
    for dtype in [
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
        *[getattr(torch, n) for n in ("uint16", "uint32", "uint64", "complex32") if hasattr(torch, n)],
        *sorted(FLOAT8, key=str),
    ]:
        raw = torch.randint(0, 255, (6 * dtype.itemsize,), dtype=torch.uint8)
        if dtype == torch.bool:
            raw = raw % 2
        out[str(dtype)] = raw.view(dtype).reshape(2, 3)
    return out


def flip_byte(path):
    """Flips one byte in the middle of the largest stored buffer of a .stager file."""
    _, storages = _native.CheckpointFile(str(path)).layout()
    _, offset, nbytes, _ = max(storages, key=lambda s: s[2])
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x5A]))
