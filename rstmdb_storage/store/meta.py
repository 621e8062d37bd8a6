"""The meta sub-database: what every process of a data directory must agree on.

=================  ============================================================================
key                value payload (inside the checksummed envelope of :mod:`..codec`)
=================  ============================================================================
``format_version`` u32 LE: META_FORMAT_VERSION; a store written by a newer format is refused
``store_id``       16 random bytes, made once when the store is created; also in every WAL
                   segment header, so segments of another store are recognised
``wal_tail``       u64 LE segment, u64 LE offset, u64 LE next_seq: where the next WAL record
                   goes; ``next_seq - 1`` is the applied sequence number
``checkpoint``     u64 LE applied_seq, then the boot id (text): the last state flushed with
                   ``env.sync()``, and the boot it happened in
=================  ============================================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..codec import seal, unseal
from ..errors import CorruptionError
from ..wal import WalTail

META_FORMAT_VERSION = 1

KEY_FORMAT_VERSION = b"format_version"
KEY_STORE_ID = b"store_id"
KEY_WAL_TAIL = b"wal_tail"
KEY_CHECKPOINT = b"checkpoint"

_U32 = struct.Struct("<I")
_TAIL = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    applied_seq: int
    boot_id: str


class Meta:
    """Typed access to the meta sub-database inside a caller's transaction."""

    def __init__(self, db: object) -> None:
        self.db = db

    def _get(self, txn, key: bytes) -> bytes | None:
        raw = txn.get(key, db=self.db)
        return None if raw is None else unseal(key, raw, "meta")

    def _put(self, txn, key: bytes, payload: bytes) -> None:
        txn.put(key, seal(key, payload), db=self.db)

    def exists(self, txn) -> bool:
        return txn.get(KEY_STORE_ID, db=self.db) is not None

    def create(self, txn, store_id: bytes, tail: WalTail) -> None:
        self._put(txn, KEY_FORMAT_VERSION, _U32.pack(META_FORMAT_VERSION))
        self._put(txn, KEY_STORE_ID, store_id)
        self.write_tail(txn, tail)

    def check_format(self, txn) -> None:
        payload = self._get(txn, KEY_FORMAT_VERSION)
        version = _U32.unpack(payload)[0] if payload is not None else None
        if version != META_FORMAT_VERSION:
            raise CorruptionError(
                f"meta: store format version {version}, this library reads {META_FORMAT_VERSION}",
                key=KEY_FORMAT_VERSION,
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
        payload = self._get(txn, KEY_WAL_TAIL)
        if payload is None or len(payload) != _TAIL.size:
            raise CorruptionError("meta: wal_tail is missing or malformed", key=KEY_WAL_TAIL)
        return WalTail(*_TAIL.unpack(payload))

    def write_tail(self, txn, tail: WalTail) -> None:
        self._put(txn, KEY_WAL_TAIL, _TAIL.pack(*tail))

    def checkpoint(self, txn) -> Checkpoint | None:
        payload = self._get(txn, KEY_CHECKPOINT)
        if payload is None:
            return None
        return Checkpoint(_U64.unpack_from(payload)[0], payload[_U64.size :].decode())

    def write_checkpoint(self, txn, checkpoint: Checkpoint) -> None:
        self._put(
            txn, KEY_CHECKPOINT, _U64.pack(checkpoint.applied_seq) + checkpoint.boot_id.encode()
        )
