"""The wire: what one transfer's messages look like, derived the same way on both ends.

Per peer and transfer: a fixed-size header (:func:`_header`: magic, version, status, lengths, the
incremental ids, and an error message when the sender can't send), the metadata (JSON), the delta
(JSON, incremental sends only), then the *segments* (:func:`segments_of`), each on its own tag.
Tags carry a per-peer sequence number (:data:`_TAG_SEQ_MOD`), so a failed transfer can never feed
stale bytes into the next one. :class:`WireBytes` counts what went over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MAGIC = 0x5354_4752  # "STGR"
_VERSION = 3
_HEADER_BYTES = 1024
# magic, version, status, meta_len, total_nbytes, bucket_bytes, chunk_bytes, nsegments, then for
# incremental sends: sending (this sending's id), base (the id of the earlier sending a delta is
# against, 0: none), delta_len (bytes of the delta message)
_HEADER_FIELDS = 11
_MESSAGE_AT = 128  # the error message (UTF-8) fills the rest of the header
_STATUS_OK = 0
_STATUS_ERROR = 1
_MAX_META_BYTES = 1 << 30
_MAX_DELTA_BYTES = 1 << 30

#: Small storages are coalesced into segments of at least this many bytes.
DEFAULT_BUCKET_BYTES = 4 << 20
#: Large storages are sent in chunks of at most this many bytes.
DEFAULT_CHUNK_BYTES = 16 << 20

_TAG_SEQ_SHIFT = 24
_TAG_SEQ_MOD = 64
_TAG_HEADER = 0
_TAG_META = 1
_TAG_DELTA = 2
_TAG_FIRST_SEGMENT = 3


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range ``[start, end)`` of the plan's buffer layout, sent as one message.

    ``direct`` segments are a chunk of the single storage ``first`` (``last == first + 1``);
    the others cover storages ``first .. last - 1`` entirely (plus alignment padding)."""

    start: int
    end: int
    first: int
    last: int
    direct: bool

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def segments_of(storages: list, bucket_bytes: int, chunk_bytes: int) -> list[Segment]:
    """Cuts the storages (``.offset``/``.nbytes`` in layout order) into segments; deterministic,
    so both ends of a transfer agree from the metadata alone."""
    out: list[Segment] = []
    group_first = -1
    group_start = group_end = 0

    def flush(upto: int) -> None:
        nonlocal group_first
        if group_first >= 0:
            out.append(Segment(group_start, group_end, group_first, upto, False))
            group_first = -1

    for index, storage in enumerate(storages):
        nbytes = storage.nbytes
        if not nbytes:
            continue
        if nbytes >= bucket_bytes:
            flush(index)
            pieces = max(1, math.ceil(nbytes / chunk_bytes))
            step = -(-nbytes // pieces)
            for begin in range(0, nbytes, step):
                out.append(Segment(storage.offset + begin, storage.offset + min(nbytes, begin + step),
                                   index, index + 1, True))
            continue
        if group_first < 0:
            group_first = index
            group_start = storage.offset
        group_end = storage.offset + nbytes
        if group_end - group_start >= bucket_bytes:
            flush(index + 1)
    flush(len(storages))
    return out


@dataclass
class WireBytes:
    """Bytes of the messages one transport sent (or received), by kind: ``header`` (the fixed
    1 KiB header per peer and transfer), ``metadata`` (the structure, and the delta of an
    incremental send), ``data`` (the state_dicts' storage bytes: segments) and ``control`` (this
    rank's share of the small all-gathers replication and restore agree through). Counted when
    posted."""

    header: int = 0
    metadata: int = 0
    data: int = 0
    control: int = 0

    @property
    def total(self) -> int:
        return self.header + self.metadata + self.data + self.control

    def copy(self) -> WireBytes:
        return WireBytes(self.header, self.metadata, self.data, self.control)

    def __sub__(self, other: WireBytes) -> WireBytes:
        return WireBytes(self.header - other.header, self.metadata - other.metadata, self.data - other.data,
                         self.control - other.control)


def _header(status: int, meta_len: int, total: int, nsegments: int, bucket: int = 0, chunk: int = 0,
            *, sending: int = 0, base: int = 0, delta_len: int = 0, message: str = "") -> torch.Tensor:
    header = torch.zeros(_HEADER_BYTES, dtype=torch.uint8)
    fields = torch.tensor([_MAGIC, _VERSION, status, meta_len, total, bucket, chunk, nsegments, sending, base,
                           delta_len], dtype=torch.int64)
    header[:_HEADER_FIELDS * 8] = fields.view(torch.uint8)
    text = message.encode("utf-8", errors="replace")[:_HEADER_BYTES - _MESSAGE_AT]
    if text:
        header[_MESSAGE_AT:_MESSAGE_AT + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return header


def _read_header(header: torch.Tensor) -> tuple[list[int], str]:
    fields = [int(v) for v in header[:_HEADER_FIELDS * 8].view(torch.int64).tolist()]
    message = header[_MESSAGE_AT:].numpy().tobytes().rstrip(b"\0").decode("utf-8", errors="replace")
    return fields, message


def _storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
