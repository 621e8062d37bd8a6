"""The floor: the store's work done with the same libraries (lmdb, crc32c, cbor2) and no
project layers, the figure each row of the table aims close to.

The floor writes and reads what the store does, laid out as the store lays it out
(:mod:`rstmdb_storage.codec`, :mod:`rstmdb_storage.store.indexes`), written here again in a
few lines so that no project code runs under its timings but the WAL's frame encoder
(:func:`bench.ceiling.wal_frame`, the same bytes the store writes):

- an instance value: CRC32C (LE) over the key and the rest, envelope version, the sequence
  number and the two times (u64 LE each), the CBOR body array;
- its index entries: ``machine NUL state NUL id`` (state index), ``updated_at`` big-endian +
  id (time index) and ``label NUL tag value id`` for each metadata label, each with an empty
  value: the key is the whole entry, and what an index entry does not checksum, ``verify``
  cross-checks against the instances (SPEC.md) — so the floor is what the store could reach;
- one meta entry, the sequence number applied, in the same transaction as the changes;
- strict decoding: cbor2 with the store's limits (depth, no indefinite lengths, no duplicate
  keys, no semantic tags but bignums), then the :class:`~rstmdb_storage.Instance` built.

What each row's floor does with these is in that row's module.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import cbor2
import crc32c
import lmdb

from bench.ceiling import CHANGE_PUT, wal_frame
from rstmdb_storage import Instance

ENVELOPE_VERSION = 1
FIXED = struct.Struct("<QQQ")  # last_wal_offset, created_at, updated_at
BODY_OFFSET = 5 + FIXED.size
STR_TAG = 4
INDEX_VALUE = b""
"""The value of every index entry of the floor (see the module docstring)."""
APPLIED_KEY = b"applied_seq"


def _refuse_tag(tag: Any, immutable: bool = False) -> Any:
    raise ValueError(f"CBOR tag {tag.tag} in stored data")


def _refuser(*_: Any) -> Any:
    raise ValueError("CBOR semantic tag in stored data")


MAX_DEPTH = 64
REFUSED_TAGS = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004)
REFUSED = dict.fromkeys((*REFUSED_TAGS, 43000, 55799), _refuser)
"""The floor decodes as strictly as the store (:mod:`rstmdb_storage.codec`): depth capped, no
indefinite lengths, no duplicate keys, no semantic tags but bignums."""
DBS = (b"instances", b"idx_state", b"idx_time", b"idx_metadata", b"meta")


class FloorEnv:
    """A raw LMDB environment opened as the store opens its own (no sync: the WAL is what is
    durable), with the store's sub-databases; *read_only* opens one that has them already
    (the store's own ``indexes/``, say)."""

    def __init__(self, path: Path, map_size: int = 1 << 33, read_only: bool = False) -> None:
        self.env = lmdb.open(
            str(path),
            subdir=True,
            max_dbs=len(DBS),
            map_size=map_size,
            sync=False,
            metasync=False,
            readahead=False,
            max_spare_txns=0,
            readonly=read_only,
        )
        self.instances, self.state, self.time, self.metadata, self.meta = (
            self.env.open_db(name, create=not read_only) for name in DBS
        )

    def begin_write(self) -> Any:
        """A write transaction, begun with the arguments by position (db, parent, write), as
        the store begins its own: py-lmdb parses keywords slowly."""
        return self.env.begin(None, None, True)

    def close(self) -> None:
        self.env.close()


def seal(key: bytes, tail: bytes) -> bytes:
    """CRC32C over ``key`` and ``tail`` (the version byte and payload), then ``tail``."""
    return crc32c.crc32c(tail, crc32c.crc32c(key)).to_bytes(4, "little") + tail


def body_of(inst: Instance) -> bytes:
    return cbor2.dumps(
        [inst.machine, inst.version, inst.state, inst.ctx, inst.metadata, inst.status, None]
    )


def instance_value(key: bytes, seq: int, now: int, body: bytes) -> bytes:
    return seal(key, bytes((ENVELOPE_VERSION,)) + FIXED.pack(seq, now, now) + body)


def index_keys(
    machine: str, state: str, metadata: dict[str, Any], key: bytes, now: int
) -> list[tuple[int, bytes]]:
    """(which index, key) of an instance's entries: 0 state, 1 time, 2 metadata. The bench's
    metadata values are strings (encoded as the store's ``TAG_STR``)."""
    entries = [
        (0, b"%s\x00%s\x00%s" % (machine.encode(), state.encode(), key)),
        (1, now.to_bytes(8, "big") + key),
    ]
    for label, value in metadata.items():
        encoded = value.encode().replace(b"\x00", b"\x00\xff")
        entries.append((2, b"%s\x00%c%s\x00\x01%s" % (label.encode(), STR_TAG, encoded, key)))
    return entries


def put_value(env: FloorEnv, txn: Any, key: bytes, value: bytes, body: list[Any], now: int) -> None:
    """The floor's apply of one put: the sealed value (``replace``: the old value, if any,
    says which index entries go) and the index entries of ``body`` (the decoded fields)."""
    old = txn.replace(key, value, env.instances)  # arguments by position, as the store's
    if old is not None:  # never for the bench's fresh ids; the lookup is the work
        raise RuntimeError(f"floor: {key!r} was already there")
    dbs = (env.state, env.time, env.metadata)
    for which, index_key in index_keys(body[0], body[2], body[4], key, now):
        txn.put(index_key, INDEX_VALUE, True, True, False, dbs[which])


def put_applied(env: FloorEnv, txn: Any, position: bytes) -> None:
    """Store the applied position (the last sequence number applied, and more) in the meta
    table, once a transaction, as the store does."""
    txn.put(APPLIED_KEY, position, True, True, False, env.meta)


def put_in_txn(env: FloorEnv, txn: Any, inst: Instance, body: bytes, seq: int, now: int) -> None:
    """:func:`put_value` of an Instance whose body is encoded as ``body``."""
    key = inst.id.encode()
    fields = [inst.machine, None, inst.state, None, inst.metadata]
    put_value(env, txn, key, instance_value(key, seq, now, body), fields, now)


def decode_body(body: bytes | memoryview) -> Any:
    """Strict cbor2 decoding (the options spelled out: ``**options`` costs a fifth of it)."""
    return cbor2.loads(
        body,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        tag_hook=_refuse_tag,
        semantic_decoders=REFUSED,
    )


def decode(key: bytes, raw: bytes) -> Instance:
    """The floor's read of one stored value: length, version and CRC checked, body decoded,
    the Instance built."""
    if (
        len(raw) < BODY_OFFSET
        or raw[4] != ENVELOPE_VERSION
        or int.from_bytes(raw[:4], "little") != crc32c.crc32c(raw[4:], crc32c.crc32c(key))
    ):
        raise RuntimeError(f"floor: bad value under {key!r}")
    body = decode_body(raw[BODY_OFFSET:])
    if type(body) is not list or len(body) != 7:
        raise RuntimeError(f"floor: bad body under {key!r}")
    return Instance(key.decode(), *body, *FIXED.unpack_from(raw, 5))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def durable_put(env: FloorEnv, fd: int, offset: int, inst: Instance, seq: int) -> int:
    """The floor of one durable ``put_instance``: encode the body and the WAL record of the
    change, ``pwrite`` + ``fdatasync`` it, then one LMDB write transaction applying it (value,
    index entries, the applied sequence number). Returns the WAL offset after the record."""
    body = body_of(inst)
    now = now_ms()
    frame = wal_frame(seq, cbor2.dumps([[CHANGE_PUT, inst.id, None, None, body]]))
    os.pwrite(fd, frame, offset)
    os.fdatasync(fd)
    with env.begin_write() as txn:
        put_in_txn(env, txn, inst, body, seq, now)
        put_applied(env, txn, seq.to_bytes(8, "little"))
    return offset + len(frame)


def fill(env: FloorEnv, instances: list[Instance], first_seq: int = 1) -> None:
    """Put ``instances`` into ``env`` in one write transaction, as a store built in one batch
    would hold them (untimed: the stores the read rows read)."""
    now = now_ms()
    with env.env.begin(write=True) as txn:
        for seq, inst in enumerate(instances, start=first_seq):
            put_in_txn(env, txn, inst, body_of(inst), seq, now)
