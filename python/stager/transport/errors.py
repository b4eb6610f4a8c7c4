"""The transport's failures: one :class:`TransportError` (a :class:`~stager.StagerError`) with a
``kind`` saying what failed and the ``rank`` it concerns.

The kinds are plain strings, so a caller compares ``err.kind == TIMEOUT``; :data:`FATAL_KINDS` are
those after which messages may still be in flight, which is what breaks a transport for good.
"""

from __future__ import annotations

from .._native import StagerError

#: A peer (or the group, for an all-gather) did not answer before the deadline.
TIMEOUT = "timeout"
#: The backend reported a failure talking to a peer: it exited, crashed, or the link failed.
CONNECTION = "connection"
#: The peer announced that it could not send its state_dict (its message is in the error).
REMOTE = "remote"
#: This rank's state_dict can't be sent (a leaf that needs pickle, an unsupported tensor).
UNSENDABLE = "unsendable"
#: A peer sent something this version does not understand (mismatched versions, corruption).
PROTOCOL = "protocol"
#: This rank failed handling what it received (writing a replica, an in-place target that
#: doesn't fit); the transfer itself completed.
LOCAL = "local"
#: An earlier timeout, lost connection or interrupt left the group unusable.
BROKEN = "broken"
#: Kinds after which messages may still be in flight: the group can't be trusted any more.
FATAL_KINDS = frozenset({TIMEOUT, CONNECTION, PROTOCOL})


class TransportError(StagerError):
    """A failed transfer. ``kind`` says what failed (module constants), ``rank`` the peer it
    concerns (None for the group), ``message`` the reason without the kind-specific prefix."""

    def __init__(self, kind: str, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank
        self.errno = None  # the attributes every StagerError carries
        self.cuda_code = None

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS


def _first_line(err: BaseException) -> str:
    """The first line of an error's text (for a message that quotes the backend's error)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
