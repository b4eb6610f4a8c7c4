"""stager: Rust-accelerated checkpoint staging for PyTorch.

Drop-in replacements for ``torch.distributed.checkpoint.staging``'s stagers, backed by a Rust
engine that owns (pinned, optionally shared) host memory, copies on worker threads without the
GIL, and writes files durably.
"""

from . import errors as errors  # StagerError's subclasses, one per kind
from ._native import StagerError
from ._native import __version__ as __version__
from .dtensor import LocalShard, MeshInfo
from .enable import disable, enable
from .files import load, save
from .filesystem import FileSystemReader, FileSystemWriter
from .options import StagingOptions
from .replica_files import Replica, find_replicas, recover
from .replication import ReplicationStager
from .segments import release_shared_memory
from .stagers import BlockingAsyncStager, DefaultStager
from .transport import PGTransport

__all__ = [
    "BlockingAsyncStager",
    "DefaultStager",
    "FileSystemReader",
    "FileSystemWriter",
    "LocalShard",
    "MeshInfo",
    "PGTransport",
    "Replica",
    "ReplicationStager",
    "StagerError",
    "StagingOptions",
    "disable",
    "enable",
    "find_replicas",
    "load",
    "recover",
    "release_shared_memory",
    "save",
]
