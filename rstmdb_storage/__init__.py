"""rstmdb-storage: durable state-machine instances in one LMDB environment fed by a
CRC32C-checked write-ahead log.

Example::

    from rstmdb_storage import Instance, Storage

    with Storage.open("/var/lib/rstmdb") as storage:
        storage.put_instance(Instance(id="order-1", machine="order", version=1,
                                      state="pending", ctx={"total": 99.5}))
        print(storage.get_instance("order-1"))
"""

from .changes import WalRecord
from .compaction import CompactionResult
from .config import FsyncPolicy, StorageConfig
from .errors import (
    ConfigError,
    ConflictError,
    CorruptionError,
    DecodeError,
    IndexesCorruptionError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidTypeError,
    LeaseHeldError,
    NotAStoreError,
    NotFoundError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    ReadOnlyError,
    RecordTooLargeError,
    RecoveryNeededError,
    StorageClosedError,
    StorageError,
    StorageFailedError,
    StorageFullError,
    WalGapError,
)
from .lookups import Reader
from .model import Instance, MachineDefinition
from .query import Page
from .snapshots import SnapshotManifest
from .storage import Batch, Storage

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CompactionResult",
    "ConfigError",
    "ConflictError",
    "CorruptionError",
    "DecodeError",
    "FsyncPolicy",
    "IndexesCorruptionError",
    "Instance",
    "InstanceNotFoundError",
    "InvalidInputError",
    "InvalidTypeError",
    "LeaseHeldError",
    "MachineDefinition",
    "NotAStoreError",
    "NotFoundError",
    "ObjectStoreError",
    "ObjectStoreUnavailableError",
    "Page",
    "ReadOnlyError",
    "Reader",
    "RecordTooLargeError",
    "RecoveryNeededError",
    "SnapshotManifest",
    "Storage",
    "StorageClosedError",
    "StorageConfig",
    "StorageError",
    "StorageFailedError",
    "StorageFullError",
    "WalGapError",
    "WalRecord",
]
