"""The transport's failures: one :class:`TransportError` (a :class:`~stager.StagerError`) with a
``kind`` saying what failed and the ``rank`` it concerns.

The kinds are plain strings shared with the engine's (:mod:`stager.errors`), so a caller compares
``err.kind == TIMEOUT`` or catches the kind's class; :data:`FATAL_KINDS` are those after which
messages may still be in flight, which is what breaks a transport for good.
"""

from __future__ import annotations

from .._native import StagerError
from ..errors import BROKEN, CONNECTION, LOCAL, PROTOCOL, REMOTE, TIMEOUT, UNSENDABLE, StagerTimeoutError

# The kinds (shared with the engine's in stager.errors; "timeout" is the engine's kind too):
# TIMEOUT: a peer (or the group, for an all-gather) did not answer before the deadline.
# CONNECTION: the backend reported a failure talking to a peer: it exited, crashed, or the link failed.
# REMOTE: the peer announced that it could not send its state_dict (its message is in the error).
# UNSENDABLE: this rank's state_dict can't be sent (a leaf that needs pickle, an unsupported tensor).
# PROTOCOL: a peer sent something this version does not understand (mismatched versions, corruption).
# LOCAL: this rank failed handling what it received (writing a replica, an in-place target that
#   doesn't fit); the transfer itself completed.
# BROKEN: an earlier timeout, lost connection or interrupt left the group unusable.
__all__ = [
    "BROKEN", "CONNECTION", "FATAL_KINDS", "LOCAL", "PROTOCOL", "REMOTE", "TIMEOUT", "UNSENDABLE",
    "BrokenGroupError", "LocalHandlingError", "PeerConnectionError", "ProtocolError", "RemoteError",
    "TransportError", "TransportTimeoutError", "UnsendableError",
]

#: Kinds after which messages may still be in flight: the group can't be trusted any more.
FATAL_KINDS = frozenset({TIMEOUT, CONNECTION, PROTOCOL})


class TransportError(StagerError):
    """A failed transfer. ``kind`` says what failed (module constants), ``rank`` the peer it
    concerns (None for the group), ``message`` the reason without the kind-specific prefix.

    ``TransportError(kind, message, rank)`` makes the subclass of ``kind`` (a timeout is also a
    :class:`stager.errors.StagerTimeoutError`, like the engine's own timeouts)."""

    def __new__(cls, kind: str, message: str, rank: int | None = None) -> TransportError:
        if cls is TransportError:
            cls = _CLASS_OF.get(kind, TransportError)
        return super().__new__(cls, message)

    def __init__(self, kind: str, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank
        self.errno = None  # the attributes every StagerError carries
        self.cuda_code = None

    def __reduce__(self) -> tuple:  # (pickled with its kind and rank, e.g. to another process)
        return TransportError, (self.kind, str(self), self.rank)

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS


class TransportTimeoutError(TransportError, StagerTimeoutError):
    """Kind ``timeout``."""


class PeerConnectionError(TransportError):
    """Kind ``connection``."""


class RemoteError(TransportError):
    """Kind ``remote``."""


class UnsendableError(TransportError):
    """Kind ``unsendable``."""


class ProtocolError(TransportError):
    """Kind ``protocol``."""


class LocalHandlingError(TransportError):
    """Kind ``local``."""


class BrokenGroupError(TransportError):
    """Kind ``broken``."""


_CLASS_OF: dict[str, type[TransportError]] = {
    TIMEOUT: TransportTimeoutError,
    CONNECTION: PeerConnectionError,
    REMOTE: RemoteError,
    UNSENDABLE: UnsendableError,
    PROTOCOL: ProtocolError,
    LOCAL: LocalHandlingError,
    BROKEN: BrokenGroupError,
}


def _first_line(err: BaseException) -> str:
    """The first line of an error's text (for a message that quotes the backend's error)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
