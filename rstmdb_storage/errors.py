"""Every error the store raises, in one place.

All of them derive from :class:`StorageError`, so ``except StorageError`` catches anything the store
itself decided to raise. Errors about the caller's input also derive from the matching built-in
(``ValueError`` or ``TypeError``) so that code written against plain Python keeps working.

Messages carry where the problem is: a file and byte offset, a key, the expected and the computed
checksum.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by rstmdb-storage."""


# --- the caller's input -------------------------------------------------------------------------


class InvalidInputError(StorageError, ValueError):
    """Raised when a value has the right type but is not acceptable (empty id, too long, …).

    Nothing is written when this is raised.
    """


class InvalidTypeError(StorageError, TypeError):
    """Raised when a value has the wrong type (an id that is not a str, a ctx that is not a dict…).

    Nothing is written when this is raised.
    """


class RecordTooLargeError(InvalidInputError):
    """Raised when an encoded instance or WAL record would exceed the configured size limit."""


class ConfigError(StorageError, ValueError):
    """Raised when a :class:`~rstmdb_storage.StorageConfig` field is invalid (named in the
    message), before anything is created or opened."""


# --- what is (not) there ------------------------------------------------------------------------


class NotFoundError(StorageError, KeyError):
    """Raised when an operation needs something that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a sentence.
        return str(self.args[0]) if self.args else ""


class InstanceNotFoundError(NotFoundError):
    """Raised when deleting or updating an instance id that is not stored."""


class ConflictError(StorageError):
    """Raised when a conditional write finds the stored state is not the one the caller read."""


# --- what is on disk ----------------------------------------------------------------------------


class CorruptionError(StorageError):
    """Raised when stored bytes fail their checksum or break the on-disk format.

    The message names the file and byte offset, or the sub-database and key. Corrupt data is
    never returned to the caller.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        key: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.key = key


class IndexesCorruptionError(CorruptionError):
    """Raised when the LMDB environment in ``indexes/`` is unreadable or fails its check, and
    cannot be rebuilt from a snapshot and the WAL. (When it can, opening the store rebuilds it
    by itself.)"""


class WalGapError(CorruptionError):
    """Raised when WAL sequence numbers that the store needs are missing."""


class DecodeError(CorruptionError):
    """Raised when bytes pass their checksum but are not a value the store writes (hostile or
    foreign CBOR: indefinite lengths, duplicate keys, unknown tags, too deep or too large)."""


# --- the machine --------------------------------------------------------------------------------


class StorageFullError(StorageError):
    """Raised when the disk or the LMDB map cannot take a write. The write was not acknowledged
    and nothing of it is visible; the store keeps working once space is freed."""


class StorageFailedError(StorageError):
    """Raised for every write after an fsync/fdatasync failed.

    After a failed sync the kernel may have dropped the dirty pages and marked them clean, so a
    retry could report success for data that is gone ("fsyncgate"). The store therefore stops
    accepting writes until it is closed and opened again, which replays the WAL from disk.
    """


class NotAStoreError(StorageError):
    """Raised when a path is not an rstmdb-storage data directory (it has neither ``wal/`` nor
    ``indexes/``) and the store was opened with ``create=False`` (or read-only), or is a
    restore or backup that did not finish (it holds ``RESTORE-IN-PROGRESS``). Nothing was
    created there."""


class RecoveryNeededError(StorageError):
    """Raised when a store opened read-only cannot be served as it is: ``indexes/`` is missing
    or damaged, or the WAL holds records LMDB has not applied and no process has the store open.
    Opening it for writing (``rstmdb-storage recover DIR``) rebuilds and replays."""


class ReadOnlyError(StorageError):
    """Raised when a store opened with ``read_only=True`` is asked to write."""


class StorageClosedError(StorageError):
    """Raised when a closed :class:`~rstmdb_storage.Storage` is used."""


def shown(value: object) -> str:
    """*value* for an error message, short whatever it is: an int too large to print in full
    (Python refuses past 4,300 digits) by its size, anything else by a clipped ``repr``."""
    if type(value) is int and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ObjectStoreError(StorageError):
    """Raised when the object store (S3 or compatible) refuses a request, or an object in it
    is not what this store wrote there (see :mod:`rstmdb_storage.replication`)."""


class ObjectStoreUnavailableError(ObjectStoreError):
    """Raised when the object store cannot be reached; nothing was shipped or fetched, and
    shipping goes on from where it stopped once it can."""


class LeaseHeldError(ObjectStoreError):
    """Raised when another writer holds the lease of the store id in the bucket (see
    :mod:`rstmdb_storage.replication.lease`): one store ships to a bucket at a time."""
