"""The meta sub-database: what every process of a data directory must agree on.

======================  ==========================================================================
key                     value payload (inside the checksummed envelope of :mod:`..codec`)
======================  ==========================================================================
``format_version``      u32 LE: META_FORMAT_VERSION; a store written by a newer format is refused
``store_id``            16 random bytes, made once when the store is created; also in every WAL
                        segment header, so segments of another store are recognised
``wal_tail``            u64 LE segment, u64 LE offset, u64 LE next_seq: the end of the records
                        LMDB has applied (``next_seq - 1`` is the applied sequence number); then
                        u64 LE change_count: the puts and deletes applied since the store was
                        created (batches count each change), by which automatic snapshots are
                        taken every ``snapshot_interval``. One value, written once a transaction
``checkpoint``          u64 LE applied_seq, then the boot id (text): the last state flushed with
                        ``env.sync()``, and the boot it happened in
``snapshot_changes``    u64 LE: the change count as the newest snapshot saw it
``hold:<name>``         u64 LE: a WAL hold: compaction keeps every record from this sequence number
                        on (for shipping, or a backup in progress), until the hold is released
======================  ==========================================================================

Format 1 kept the change count under a key of its own, ``change_count``, and ``wal_tail`` without
it (24 bytes); such a store is read as it is, and its first write stores both in ``wal_tail``,
deletes ``change_count`` and records format 2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..codec import seal, unseal
from ..errors import CorruptionError, StorageError
from ..wal import WalTail

META_FORMAT_VERSION = 2
#: the format versions this version reads (format 1 is converted by its first write)
READABLE_FORMATS = (1, 2)

KEY_FORMAT_VERSION = b"format_version"
KEY_STORE_ID = b"store_id"
KEY_WAL_TAIL = b"wal_tail"
KEY_CHECKPOINT = b"checkpoint"
KEY_CHANGE_COUNT = b"change_count"
KEY_SNAPSHOT_CHANGES = b"snapshot_changes"
HOLD_PREFIX = b"hold:"

_U32 = struct.Struct("<I")
_TAIL = struct.Struct("<QQQ")
_TAIL_AND_COUNT = struct.Struct("<QQQQ")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    applied_seq: int
    boot_id: str


class Meta:
    """Typed access to the meta sub-database inside a caller's transaction."""

    def __init__(self, db: object) -> None:
        self.db = db
        #: key -> (stored value, payload) of the value this process last sealed or checked
        #: under it: every write reads the tail and the change count back, and the same
        #: bytes need no second CRC (other bytes, another process's or damaged, are checked)
        self._checked: dict[bytes, tuple[bytes, bytes]] = {}

    def _get(self, txn, key: bytes) -> bytes | None:
        raw = txn.get(key, None, self.db)
        if raw is None:
            return None
        known = self._checked.get(key)
        if known is not None and known[0] == raw:
            return known[1]
        payload = unseal(key, raw, "meta")
        self._checked[key] = (raw, payload)
        return payload

    def _put(self, txn, key: bytes, payload: bytes) -> None:
        raw = seal(key, payload)
        txn.put(key, raw, True, True, False, self.db)  # by position: see store.env
        self._checked[key] = (raw, payload)

    def exists(self, txn) -> bool:
        return txn.get(KEY_STORE_ID, db=self.db) is not None

    def create(self, txn, store_id: bytes, tail: WalTail) -> None:
        self._put(txn, KEY_FORMAT_VERSION, _U32.pack(META_FORMAT_VERSION))
        self._put(txn, KEY_STORE_ID, store_id)
        self.write_tail(txn, tail)

    def check_format(self, txn) -> None:
        payload = self._get(txn, KEY_FORMAT_VERSION)
        version = _U32.unpack(payload)[0] if payload is not None else None
        if version is None:
            raise CorruptionError("meta: format_version is missing", key=KEY_FORMAT_VERSION)
        if version not in READABLE_FORMATS:
            raise StorageError(
                f"meta: the store has format version {version}; this version of rstmdb-storage "
                f"reads versions {' and '.join(map(str, READABLE_FORMATS))}"
            )

    def check_all(self, txn) -> None:
        """Raise :class:`CorruptionError` unless every meta value is present and intact."""
        self.check_format(txn)
        self.store_id(txn)
        self.tail(txn)
        self.checkpoint(txn)

    def store_id(self, txn) -> bytes:
        payload = self._get(txn, KEY_STORE_ID)
        if payload is None or len(payload) != 16:
            raise CorruptionError("meta: store_id is missing or malformed", key=KEY_STORE_ID)
        return payload

    def tail(self, txn) -> WalTail:
        return WalTail(*_TAIL.unpack_from(self._tail_payload(txn)))

    def _tail_payload(self, txn) -> bytes:
        payload = self._get(txn, KEY_WAL_TAIL)
        if payload is None or len(payload) not in (_TAIL_AND_COUNT.size, _TAIL.size):
            raise CorruptionError("meta: wal_tail is missing or malformed", key=KEY_WAL_TAIL)
        return payload

    def change_count(self, txn) -> int:
        """Puts and deletes applied since the store was created."""
        payload = self._tail_payload(txn)
        if len(payload) == _TAIL.size:  # format 1
            return self._u64(txn, KEY_CHANGE_COUNT)
        return _U64.unpack_from(payload, _TAIL.size)[0]

    def write_tail(self, txn, tail: WalTail, changed: int = 0) -> int:
        """Store the applied *tail*, and *changed* more puts and deletes applied with it;
        return the change count now. (Converts a format 1 store, see the module docstring.)"""
        payload = self._get(txn, KEY_WAL_TAIL)
        if payload is None:
            total = changed  # creating the store
        elif len(payload) == _TAIL_AND_COUNT.size:
            total = _U64.unpack_from(payload, _TAIL.size)[0] + changed
        else:
            total = self.change_count(txn) + changed  # format 1 (anything else raises)
            txn.delete(KEY_CHANGE_COUNT, db=self.db)
            self._put(txn, KEY_FORMAT_VERSION, _U32.pack(META_FORMAT_VERSION))
        self._put(txn, KEY_WAL_TAIL, _TAIL_AND_COUNT.pack(*tail, total))
        return total

    def checkpoint(self, txn) -> Checkpoint | None:
        payload = self._get(txn, KEY_CHECKPOINT)
        if payload is None:
            return None
        return Checkpoint(_U64.unpack_from(payload)[0], payload[_U64.size :].decode())

    def write_checkpoint(self, txn, checkpoint: Checkpoint) -> None:
        self._put(
            txn, KEY_CHECKPOINT, _U64.pack(checkpoint.applied_seq) + checkpoint.boot_id.encode()
        )

    def _u64(self, txn, key: bytes) -> int:
        payload = self._get(txn, key)
        if payload is None:
            return 0
        if len(payload) != _U64.size:
            raise CorruptionError(f"meta: {key.decode()} is malformed", key=key)
        return _U64.unpack(payload)[0]

    def snapshot_changes(self, txn) -> int:
        return self._u64(txn, KEY_SNAPSHOT_CHANGES)

    def write_snapshot_changes(self, txn, count: int) -> None:
        self._put(txn, KEY_SNAPSHOT_CHANGES, _U64.pack(count))

    def holds(self, txn) -> dict[str, int]:
        """Every WAL hold, by name."""
        found = {}
        cursor = txn.cursor(db=self.db)
        if cursor.set_range(HOLD_PREFIX):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(HOLD_PREFIX):
                    break
                found[key[len(HOLD_PREFIX) :].decode()] = self._u64(txn, key)
        return found

    def write_hold(self, txn, name: str, from_seq: int) -> None:
        self._put(txn, HOLD_PREFIX + name.encode(), _U64.pack(from_seq))

    def delete_hold(self, txn, name: str) -> bool:
        return txn.delete(HOLD_PREFIX + name.encode(), db=self.db)
