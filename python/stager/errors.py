"""The kinds of failure stager reports, one :class:`~stager.StagerError` subclass per kind.

Every error stager raises is a :class:`~stager.StagerError` (a ``RuntimeError``) with a ``kind``
string, ``errno`` (the operating system's error number, or None) and ``cuda_code`` (CUDA's
``CUresult``, or None). The Rust engine and the transport share one set of kinds (:data:`KINDS`),
and each kind has its class here, so a caller can ``except stager.errors.StagerTimeoutError``
whether the engine or a peer timed out. I/O errors stay recognizable the way Python's own are:
a missing file is also a ``FileNotFoundError``, a refused one also a ``PermissionError`` (as
safetensors' and polars' errors do).

The engine's errors are converted at the binding boundary (``rust/python/mod.rs``), which asks
:func:`error_class` for the class of each error's kind and errno.
"""

from __future__ import annotations

import errno as errno_codes

from ._native import StagerError

__all__ = [
    "KINDS",
    "AllocationError",
    "BudgetError",
    "CudaError",
    "ForkedError",
    "InvalidArgumentError",
    "InvalidFileError",
    "RequestFailedError",
    "StagerError",
    "StagerFileNotFoundError",
    "StagerIOError",
    "StagerPermissionError",
    "StagerTimeoutError",
    "error_class",
]

# ---- the kinds (the values of ``StagerError.kind``) ------------------------------------------------

#: Raised from Python without a more precise kind.
ERROR = "error"
#: A stage needs more host memory than ``memory_budget_bytes`` allows.
BUDGET = "budget"
#: The operating system refused memory.
ALLOCATION = "allocation"
#: An argument out of range or inconsistent with the others.
INVALID_ARGUMENT = "invalid_argument"
#: An operating-system error on a file or directory (``errno`` says which).
IO = "io"
#: A file that is not what it claims to be.
INVALID_FILE = "invalid_file"
#: A CUDA driver call failed (``cuda_code`` says how).
CUDA = "cuda"
#: Something, or some peer, did not answer in time.
TIMEOUT = "timeout"
#: An object made before ``fork()`` was used in the child.
FORKED = "forked"
#: A batch of requests ended in failure.
FAILED = "failed"
# The transport's own kinds (:mod:`stager.transport.errors` has their classes and meanings).
CONNECTION = "connection"
REMOTE = "remote"
UNSENDABLE = "unsendable"
PROTOCOL = "protocol"
LOCAL = "local"
BROKEN = "broken"


class BudgetError(StagerError):
    """Kind ``budget``: the memory budget can't hold the stage."""


class AllocationError(StagerError):
    """Kind ``allocation``: the operating system refused host memory."""


class InvalidArgumentError(StagerError):
    """Kind ``invalid_argument``."""


class StagerIOError(StagerError):
    """Kind ``io``: an operating-system error on a file; ``errno`` keeps its number."""


class StagerFileNotFoundError(StagerIOError, FileNotFoundError):
    """Kind ``io`` with ``ENOENT``: also a ``FileNotFoundError``."""


class StagerPermissionError(StagerIOError, PermissionError):
    """Kind ``io`` with ``EACCES`` or ``EPERM``: also a ``PermissionError``."""


class InvalidFileError(StagerError):
    """Kind ``invalid_file``: a checkpoint file (or a dcp data file) that is not what it claims to be."""


class CudaError(StagerError):
    """Kind ``cuda``."""


class StagerTimeoutError(StagerError):
    """Kind ``timeout``: the engine waited too long, or a peer did not answer in time."""


class ForkedError(StagerError):
    """Kind ``forked``: an object made before ``fork()`` used in the child."""


class RequestFailedError(StagerError):
    """Kind ``failed``: a batch of requests (a stage, a write) ended in failure."""


#: kind → its class (the transport-only kinds have theirs in :mod:`stager.transport.errors`).
KINDS: dict[str, type[StagerError]] = {
    ERROR: StagerError,
    BUDGET: BudgetError,
    ALLOCATION: AllocationError,
    INVALID_ARGUMENT: InvalidArgumentError,
    IO: StagerIOError,
    INVALID_FILE: InvalidFileError,
    CUDA: CudaError,
    TIMEOUT: StagerTimeoutError,
    FORKED: ForkedError,
    FAILED: RequestFailedError,
}

_BY_ERRNO: dict[int, type[StagerError]] = {
    errno_codes.ENOENT: StagerFileNotFoundError,
    errno_codes.EACCES: StagerPermissionError,
    errno_codes.EPERM: StagerPermissionError,
}


def error_class(kind: str, errno: int | None = None) -> type[StagerError]:
    """The class of an error of ``kind`` (with ``errno`` for kind ``io``); :class:`StagerError`
    itself for a kind it doesn't know."""
    if kind == IO and errno is not None:
        found = _BY_ERRNO.get(errno)
        if found is not None:
            return found
    return KINDS.get(kind, StagerError)


def make_error(kind: str, message: str, errno: int | None = None) -> StagerError:
    """A new error of ``kind`` saying ``message``, with the attributes every StagerError carries."""
    error = error_class(kind, errno)(message)
    error.kind = kind
    error.errno = errno
    error.cuda_code = None
    return error
