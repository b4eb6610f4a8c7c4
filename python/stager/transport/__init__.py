"""Transport: state_dicts over a ``torch.distributed`` process group, full duplex, bounded waits.

:class:`PGTransport` is a drop-in for ``torch.distributed.checkpoint._pg_transport.PGTransport``
(same constructor, ``send_checkpoint(dst_ranks, state_dict)``, ``recv_checkpoint(src_rank)``,
in-place receive into the tensors of the ``state_dict`` callable) built on the process group's
point-to-point ``send``/``recv``. What it does differently:

* **One pass, no pickle.** The dict is planned once (:mod:`stager.plan`); its structure travels as
  length-prefixed JSON from :func:`stager.tree.encode` and is validated by
  :func:`stager.tree.decode` on arrival. Views of one storage send that storage once and come back
  sharing one storage.
* **Buckets.** The storages' bytes are laid out as in the plan's host buffer and cut into
  *segments*: runs of small storages coalesced into one contiguous range (at least
  ``bucket_bytes``), and large storages sent straight from their own memory in chunks of at most
  ``chunk_bytes``. Sender and receiver derive the same segments from the metadata.
* **Straight into the pool.** Received bytes land in a buffer of the process-wide host pool (or,
  for in-place receives, in the target tensors' storages): no per-tensor allocation, no extra copy.
* **Many peers, full duplex.** :meth:`PGTransport.transfer` posts every receive and every send of
  a round at once (any number of destinations, each with its own state_dict or a shared one, and
  any number of sources), so all directions are on the wire together.
* **Bounded, interruptible, typed.** gloo's point-to-point works only complete when waited on, and
  a wait that times out breaks the whole group. So helper threads wait for the works (one per
  peer and direction, up to the deadline plus a grace) while the calling thread takes their
  completions in short slices against its own deadline: a peer that never answers is *known* to
  have timed out, without reading any message, and Ctrl-C raises ``KeyboardInterrupt`` at once.
  Every failure is a :class:`TransportError` (a :class:`~stager.StagerError`) with a ``kind``
  (:data:`TIMEOUT`, :data:`CONNECTION`, :data:`REMOTE`, :data:`UNSENDABLE`, :data:`PROTOCOL`,
  :data:`LOCAL`, :data:`BROKEN`) and the ``rank`` it concerns.
* **No failure waits for a timeout.** A state_dict that can't be sent (a leaf that needs pickle,
  an unsupported tensor) is announced in the fixed-size header every receiver posts first, with
  the key that failed; the receivers raise at once and nothing is left unmatched. A receiver whose
  own handling fails (a replica file that can't be written, an in-place target that doesn't fit)
  keeps receiving, so both sides stay in step, and reports the failure at the end.
* **Incremental** (``transfer(..., incremental=...)``, what ``ReplicationStager(skip_unchanged=True)``
  uses): a sender whose previous sending the holder still has sends only the storages that changed
  since, and the holder builds the new state_dict from its copy of the previous one plus those
  bytes. See :class:`Incremental` for who decides what, and when.
* **Counted.** :attr:`PGTransport.sent` and :attr:`PGTransport.received` count the bytes of every
  message by kind (:class:`WireBytes`: headers, metadata, state_dict bytes, all-gathers).
* **Broken stays broken.** After a timeout, a lost connection or an interrupt, point-to-point
  messages may still be in flight: every later call raises :data:`BROKEN` at once, saying the
  process group must be re-created (instead of repeating the first error).

Order of operations of one transfer (per peer): header (1 KiB: fields + an error message) →
metadata (JSON) [→ delta (JSON) when the holder takes an incremental send] → segments, each on its
own tag. Tags carry a per-peer sequence number, so a
failed transfer can never feed stale bytes into the next one. :meth:`PGTransport.allgather_bytes`
is the same machinery for the small all-gathers replication and restore agree through.

Thread Safety:
    One call at a time per transport object; the process group is used from the calling thread
    (and the helper threads that wait for its works).

The package, one module per concept, data flowing down the list: :mod:`~stager.transport.errors`
(the kinds and :class:`TransportError`), :mod:`~stager.transport.wire` (header, tags, segments),
:mod:`~stager.transport.waits` (bounded waits), :mod:`~stager.transport.delta` (the incremental
protocol), :mod:`~stager.transport.outgoing` and :mod:`~stager.transport.incoming` (the two sides
of one state_dict), :mod:`~stager.transport.pg` (:class:`PGTransport`, which runs the rounds).
"""

from __future__ import annotations

from .delta import Incremental, Offer, ReceivedStorages
from .errors import BROKEN, CONNECTION, FATAL_KINDS, LOCAL, PROTOCOL, REMOTE, TIMEOUT, UNSENDABLE, TransportError
from .incoming import Incoming
from .pg import PGTransport
from .wire import DEFAULT_BUCKET_BYTES, DEFAULT_CHUNK_BYTES, Segment, WireBytes, segments_of

# The internals tests reach (and monkeypatch: the classes are the same objects as in their modules).
from .delta import _decode_delta, _delta_layout, _encode_delta  # noqa: F401  # isort: skip
from .pg import _release_groups_at_exit  # noqa: F401  # isort: skip
from .waits import _as_timedelta, _Waits  # noqa: F401  # isort: skip
from .wire import _TAG_FIRST_SEGMENT  # noqa: F401  # isort: skip

__all__ = [
    "BROKEN", "CONNECTION", "DEFAULT_BUCKET_BYTES", "DEFAULT_CHUNK_BYTES", "FATAL_KINDS", "LOCAL", "PROTOCOL",
    "REMOTE", "TIMEOUT", "UNSENDABLE",
    "Incoming", "Incremental", "Offer", "PGTransport", "ReceivedStorages", "Segment", "TransportError", "WireBytes",
    "segments_of",
]
