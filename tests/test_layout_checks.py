"""The engine is the one validator of untrusted layouts: the tensor records of a file's tree or a
peer's message reach ``TensorTable.from_layout`` (rust/table.rs) after Python has decoded the
JSON around them, and the engine refuses every record that does not fit, with a StagerError
naming the tensor (never an OverflowError, a TypeError, or a table over bytes it does not own).
The hostile-file corpus (tests/attacks) covers the same checks through whole files."""

from __future__ import annotations

import pytest
import torch

import stager
from stager import _native, tree


def _table(records, storages=(16,)):
    return _native.TensorTable.from_layout(list(storages), records)


def _record(storage=0, dtype="float32", shape=(4,), stride=None, offset=0, conj=False, neg=False):
    return (storage, dtype, list(shape), None if stride is None else list(stride), offset, conj, neg)


def test_every_torch_dtype_is_named_by_the_engine_with_its_size():
    dtypes = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    for name, dtype in dtypes.items():
        table = _table([_record(dtype=name, shape=(2,))], storages=(dtype.itemsize * 2,))
        assert table.tensor_dtypes[0] is dtype, name
        # Two elements of the dtype: the engine's itemsize is torch's.
        too_small = dtype.itemsize * 2 - 1
        with pytest.raises(stager.StagerError, match="reaches past its storage"):
            _table([_record(dtype=name, shape=(2,))], storages=(too_small,))


def test_tables_from_records_rebuild_views_and_flags():
    table = _table([_record(), _record(shape=(2,), offset=2), _record(dtype="complex64", shape=(1,), storage=1,
                                                                        conj=True, neg=True)],
                   storages=(16, 8))
    assert table.tensor_shapes == [torch.Size([4]), torch.Size([2]), torch.Size([1])]
    assert table.tensor_strides == [(1,), (1,), (1,)]
    assert table.tensor_offsets == [0, 2, 0]
    whole, conj, neg = 1, 2, 4
    assert list(table.tensor_flags) == [whole, 0, whole | conj | neg]
    assert table.storage_users == [2, 1]
    assert table.storage_at(70) == 1 and table.storage_at(20) is None


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(storage=1), "tensor 0 refers to storage 1 of 1"),
        (_record(storage=-1), "storage must be >= 0"),
        (_record(storage=2**70), "storage is out of range"),
        (_record(storage=True), "storage must be an integer, got bool"),
        (_record(dtype="object"), "unknown dtype 'object'"),
        (_record(dtype=["float32"]), "unknown dtype"),
        (_record(shape=(True,)), "shape must be an integer, got bool"),
        (_record(shape=(2**64,)), "shape is out of range"),
        (_record(shape=(-1,)), "shape must be >= 0"),
        (_record(stride=(-1,)), "stride must be >= 0"),
        (_record(stride=(1, 1)), "mismatched shape/stride"),
        (_record(offset=5), "reaches past its storage of 16 bytes"),
        (_record(offset=-1), "offset must be >= 0"),
        (_record(shape=(2**62, 2**62)), "reaches past"),
        (_record(shape=(1,) * 65), "65 dimensions"),
        (_record(conj=True), "conjugated but not complex"),
        ((0, "float32", [4]), "must be (storage, dtype"),
    ],
)
def test_hostile_records_are_refused_naming_the_tensor(record, message):
    with pytest.raises(stager.StagerError, match="invalid checkpoint metadata") as info:
        _table([record])
    assert message in str(info.value), str(info.value)


def test_decode_hands_the_bounds_to_the_engine():
    meta = {"version": 2, "tree": 0, "tensors": [["float32", [4], None, 1, 0]], "storages": [16]}
    with pytest.raises(stager.StagerError, match=r"invalid checkpoint metadata: tensor 0 \(float32 \[4\], "
                                                 r"stride \[1\], offset 1\) reaches past its storage of 16 bytes"):
        tree.decode(meta)
    meta["tensors"][0][3] = 0
    plan = tree.decode(meta)
    assert plan.total_nbytes >= 16
