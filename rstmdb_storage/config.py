"""Configuration: :class:`StorageConfig`, :class:`FsyncPolicy`, and the names and limits that
every module agrees on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError, shown

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Directories inside a data directory (the seed's layout).
WAL_DIR = "wal"
SNAPSHOTS_DIR = "snapshots"
INDEXES_DIR = "indexes"
#: present in a data directory while a restore or backup is still copying into it
RESTORE_MARKER = "RESTORE-IN-PROGRESS"
#: present in ``indexes/`` when a flush of ``data.mdb`` failed: the next open rebuilds it
UNTRUSTED_MARKER = "UNTRUSTED"

# Named sub-databases of the LMDB environment. The index and manifest names are reserved now so
# that a store created today already has them when the indexes and snapshots arrive.
DB_META = b"meta"
DB_INSTANCES = b"instances"
DB_STATE_INDEX = b"idx_state"
DB_METADATA_INDEX = b"idx_metadata"
DB_TIME_INDEX = b"idx_time"
DB_SNAPSHOTS = b"snapshots"
DB_MACHINES = b"machines"
DB_IDEMPOTENCY = b"idempotency"
INDEX_DATABASES = (DB_STATE_INDEX, DB_METADATA_INDEX, DB_TIME_INDEX)
ALL_DATABASES = (
    DB_META,
    DB_INSTANCES,
    DB_STATE_INDEX,
    DB_METADATA_INDEX,
    DB_TIME_INDEX,
    DB_SNAPSHOTS,
    DB_MACHINES,
    DB_IDEMPOTENCY,
)

# Hard limits of the on-disk format. Decoding refuses anything larger *before* decoding it, so a
# corrupt length field or hostile bytes cannot make the store allocate without bound.
MAX_ID_BYTES = 255  # LMDB keys are at most 511 bytes; ids stay well inside that
MAX_VALUE_BYTES = 16 * MiB  # one stored instance
MAX_RECORD_BYTES = 256 * MiB  # one WAL record (a batch)
MAX_DECODE_DEPTH = 64  # nesting of ctx/metadata containers

FsyncMode = Literal["every_write", "every_n", "every_ms", "never"]


@dataclass(frozen=True, slots=True)
class FsyncPolicy:
    """When the WAL is flushed to stable storage with ``fdatasync``.

    ============================ =================================================================
    policy                       what a power loss (or kernel crash) can lose
    ============================ =================================================================
    ``FsyncPolicy.every_write()`` nothing acknowledged: a write returns only after its WAL record
                                  is on disk (the default)
    ``FsyncPolicy.every_n(n)``    up to the last ``n - 1`` writes of each process
    ``FsyncPolicy.every_ms(ms)``  about the last ``ms`` milliseconds of writes: a background
                                  thread syncs what was appended every ``ms``
    ``FsyncPolicy.never()``       everything since the last checkpoint or close
    ============================ =================================================================

    A killed *process* (``kill -9``) loses nothing under any policy: the record is in the page
    cache before the write returns. Under every policy except ``every_write`` a change can be
    visible to readers before its WAL record is durable.

    Example::

        StorageConfig(data_dir="/var/lib/rstmdb", fsync_policy=FsyncPolicy.every_ms(50))
    """

    mode: FsyncMode = "every_write"
    value: int = 0  # writes for ``every_n``, milliseconds for ``every_ms``

    @classmethod
    def every_write(cls) -> FsyncPolicy:
        return cls("every_write")

    @classmethod
    def every_n(cls, n: int) -> FsyncPolicy:
        return cls("every_n", n)

    @classmethod
    def every_ms(cls, ms: int) -> FsyncPolicy:
        return cls("every_ms", ms)

    @classmethod
    def never(cls) -> FsyncPolicy:
        return cls("never")

    def validate(self) -> None:
        if self.mode not in ("every_write", "every_n", "every_ms", "never"):
            raise ConfigError(f"fsync_policy: unknown mode {self.mode!r}")
        if self.mode in ("every_n", "every_ms") and (
            not isinstance(self.value, int)
            or isinstance(self.value, bool)
            or not 1 <= self.value < 2**31
        ):
            raise ConfigError(
                f"fsync_policy: {self.mode} needs an int from 1 to 2**31 - 1, "
                f"got {shown(self.value)}"
            )


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Settings of one :class:`~rstmdb_storage.Storage`; every field but ``data_dir`` has a
    default.

    Example::

        config = StorageConfig(data_dir="/var/lib/rstmdb", snapshot_interval=10_000)
        with Storage.open(config) as storage:
            ...
    """

    data_dir: str | os.PathLike[str]
    #: changes between automatic snapshots (0 = never automatic)
    snapshot_interval: int = 10_000
    #: WAL segments kept before compaction forces a snapshot
    max_wal_segments: int = 10
    #: delete WAL segments covered by snapshots automatically
    compaction_enabled: bool = True
    #: snapshots kept by compaction; the WAL is kept from the oldest of them on, so that
    #: recovery can fall back to an older snapshot when the newest is damaged
    snapshots_kept: int = 2
    #: size at which a WAL segment is sealed and a new one started; preallocated on creation
    wal_segment_size: int = 64 * MiB
    #: when WAL writes are flushed to disk; see :class:`FsyncPolicy` for what each can lose
    fsync_policy: FsyncPolicy = dataclasses.field(default_factory=FsyncPolicy.every_write)
    #: initial LMDB map size; the map grows by itself when it fills
    map_size: int = 1 * GiB
    #: largest encoded instance accepted by a write
    max_instance_size: int = 1 * MiB
    #: largest WAL record (an instance or a whole batch) accepted by a write
    max_record_size: int = 64 * MiB
    #: reader slots in the LMDB lock file, shared by every process (cheap; size for
    #: worker processes x threads)
    max_readers: int = 1024
    #: how often LMDB is flushed to disk (a checkpoint); the WAL covers writes in between
    checkpoint_interval_ms: int = 1000
    #: how often the background scrub checks its next slice of the store (0: never; see
    #: :mod:`rstmdb_storage.scrub`)
    scrub_interval_ms: int = 10_000
    #: how long an idempotency key remembers the write made with it
    idempotency_retention_ms: int = 24 * 3600 * 1000
    #: permission bits of the files and directories the store creates (private by default)
    file_mode: int = 0o600
    #: open for reading only (lookup processes, read-only copies): takes no write lock,
    #: writes nothing, replays nothing; serves the state LMDB holds
    read_only: bool = False
    #: create a new store when ``data_dir`` holds none; with False, opening a path that is
    #: not a data directory raises :class:`NotAStoreError` and creates nothing there
    #: (read-only stores never create one)
    create: bool = True
    #: ship the WAL and snapshots to this object store (``s3://bucket/prefix``; endpoint and
    #: credentials from boto3's environment: see :mod:`rstmdb_storage.replication`); None:
    #: no shipping
    replica_url: str | None = None
    #: with ``replica_url``: a record is in the bucket within this long of its write (the
    #: open WAL segment is sealed early for it): how much a lost host can take with it
    max_seal_interval_ms: int = 1000
    #: with ``replica_url``: how long the single-writer lease in the bucket holds without
    #: renewal (see :mod:`rstmdb_storage.replication.lease`): how soon another writer may
    #: take over from one that died
    lease_ttl_ms: int = 30_000
    #: with ``replica_url``: when ``data_dir`` holds no store and the bucket holds one (a
    #: host whose disk was lost), restore it from the bucket before opening, rather than
    #: start a new, empty store (a bucket that cannot be reached fails the open)
    restore_if_missing: bool = False
    #: open as a replica of the store that ships to this URL (``s3://bucket/prefix``): an
    #: empty ``data_dir`` is restored from the bucket, then a thread applies what the primary
    #: ships; writes are refused (see :mod:`rstmdb_storage.replication.following`)
    replica_of: str | None = None
    #: on a replica: how often the bucket is asked for new segments
    replica_poll_interval_ms: int = 1000

    @classmethod
    def of(cls, config: StorageConfig | str | os.PathLike[str]) -> StorageConfig:
        """*config* itself, or a path's config with every default."""
        return config if isinstance(config, StorageConfig) else cls(data_dir=config)

    @property
    def path(self) -> Path:
        return Path(os.fspath(self.data_dir))

    def holds_store(self) -> bool:
        """Whether ``data_dir`` is a data directory: it has ``wal/`` or ``indexes/``."""
        return (self.path / WAL_DIR).is_dir() or (self.path / INDEXES_DIR).is_dir()

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        if not isinstance(self.data_dir, (str, os.PathLike)) or not os.fspath(self.data_dir):
            raise ConfigError(f"data_dir: need a non-empty path, got {self.data_dir!r}")
        if "\x00" in os.fsdecode(os.fspath(self.data_dir)):
            raise ConfigError(f"data_dir: a path cannot hold a NUL byte, got {self.data_dir!r}")
        _check_int("snapshot_interval", self.snapshot_interval, minimum=0, maximum=2**62)
        _check_int("max_wal_segments", self.max_wal_segments, minimum=1, maximum=2**31)
        _check_int("snapshots_kept", self.snapshots_kept, minimum=1, maximum=2**31)
        for name in ("compaction_enabled", "read_only", "create", "restore_if_missing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: need a bool, got {getattr(self, name)!r}")
        _check_int("wal_segment_size", self.wal_segment_size, minimum=64 * KiB, maximum=2**40)
        if not isinstance(self.fsync_policy, FsyncPolicy):
            raise ConfigError(
                f"fsync_policy: need an FsyncPolicy (e.g. FsyncPolicy.every_write()), "
                f"got {self.fsync_policy!r}"
            )
        self.fsync_policy.validate()
        _check_int("map_size", self.map_size, minimum=1 * MiB, maximum=2**48)
        _check_int(
            "max_instance_size", self.max_instance_size, minimum=1 * KiB, maximum=MAX_VALUE_BYTES
        )
        _check_int(
            "max_record_size",
            self.max_record_size,
            minimum=self.max_instance_size,
            maximum=MAX_RECORD_BYTES,
        )
        _check_int("max_readers", self.max_readers, minimum=1, maximum=2**20)
        _check_int(
            "checkpoint_interval_ms", self.checkpoint_interval_ms, minimum=1, maximum=2**31 - 1
        )
        _check_int("scrub_interval_ms", self.scrub_interval_ms, minimum=0, maximum=2**31 - 1)
        _check_int(
            "idempotency_retention_ms", self.idempotency_retention_ms, minimum=1, maximum=2**62
        )
        _check_int("file_mode", self.file_mode, minimum=0o400, maximum=0o777)
        for name in ("replica_url", "replica_of"):
            url = getattr(self, name)
            if url is not None and not (
                isinstance(url, str) and url.startswith("s3://") and url[5:].strip("/")
            ):
                raise ConfigError(
                    f"{name}: need an object store URL (s3://bucket/prefix) or None, "
                    f"got {shown(url)}"
                )
        if self.restore_if_missing and self.replica_url is None:
            raise ConfigError("restore_if_missing: needs a replica_url to restore from")
        if self.replica_of is not None and (self.replica_url is not None or self.read_only):
            raise ConfigError(
                "replica_of: a replica neither ships (replica_url) nor opens read-only (its "
                "thread applies what the bucket holds; lookup processes open the directory "
                "with read_only=True and no replica_of)"
            )
        _check_int("max_seal_interval_ms", self.max_seal_interval_ms, minimum=1, maximum=2**31 - 1)
        _check_int("lease_ttl_ms", self.lease_ttl_ms, minimum=100, maximum=2**31 - 1)
        _check_int(
            "replica_poll_interval_ms", self.replica_poll_interval_ms, minimum=1, maximum=2**31 - 1
        )


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: need an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {shown(value)}")
