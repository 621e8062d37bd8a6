"""The floor of durable puts from many writer processes: group commit across processes with
the floor's libraries and layout (SPEC.md's prototype, with the index entries), and no project
layers.

Each put takes three steps, each under its own exclusive ``flock``:

1. **append**: read the append position (``append.lock``: WAL offset and next sequence
   number, u64 LE each), write the record's frame there (:func:`bench.ceiling.wal_frame`),
   store the new position;
2. **sync**: unless ``sync.lock`` (the sequence number synced, u64 LE) already covers the
   record, read the append position, ``fdatasync`` the WAL and store that position's last
   sequence number as synced;
3. **apply**, in one LMDB write transaction: unless another process applied the record
   already, read every synced record not applied yet from the WAL (whoever wrote it), check
   its CRC, decode it and put its value and index entries (:func:`bench.floor.put_value`);
   the applied sequence number and offset go into the same transaction.

Nothing is visible before it is durable. The WAL is one preallocated file; no segments, no
checks of input, no conditions, no recovery: what the store does beyond this is its own work.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import Any

import cbor2
import crc32c

from bench import floor
from bench.ceiling import CHANGE_PUT, wal_frame
from bench.floor import FloorEnv
from rstmdb_storage.wal.format import RECORD_HEADER, RECORD_HEADER_SIZE, padded

WAL_BYTES = 1 << 30
"""The preallocated WAL of the floor's store (every put of every run goes in it)."""

READ_CHUNK = 1 << 16
_POSITION = struct.Struct("<QQ")  # append: offset, next_seq; applied: seq, offset
_SYNCED = struct.Struct("<Q")


def create(directory: Path) -> None:
    """A new, empty floor store in ``directory``."""
    directory.mkdir(parents=True)
    env = FloorEnv(directory / "lmdb")
    with env.env.begin(write=True) as txn:
        txn.put(floor.APPLIED_KEY, _POSITION.pack(0, 0), db=env.meta)
    env.close()
    fd = os.open(directory / "wal", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.posix_fallocate(fd, 0, WAL_BYTES)
    os.fsync(fd)
    os.close(fd)
    (directory / "append.lock").write_bytes(_POSITION.pack(0, 1))
    (directory / "sync.lock").write_bytes(_SYNCED.pack(0))


class FloorGroupCommit:
    """A writer process's handle on a floor store made by :func:`create`."""

    def __init__(self, directory: Path) -> None:
        self.env = FloorEnv(directory / "lmdb")
        self.wal = os.open(directory / "wal", os.O_RDWR)
        self.appends = os.open(directory / "append.lock", os.O_RDWR)
        self.syncs = os.open(directory / "sync.lock", os.O_RDWR)

    def put_instance(self, inst: Any) -> int:
        body = floor.body_of(inst)
        payload = cbor2.dumps([[CHANGE_PUT, inst.id, None, None, body]])
        flock, appends, wal = fcntl.flock, self.appends, self.wal
        flock(appends, fcntl.LOCK_EX)
        try:
            offset, seq = _POSITION.unpack(os.pread(appends, _POSITION.size, 0))
            frame = wal_frame(seq, payload)
            os.pwrite(wal, frame, offset)
            os.pwrite(appends, _POSITION.pack(offset + len(frame), seq + 1), 0)
        finally:
            flock(appends, fcntl.LOCK_UN)
        synced = self._sync_through(seq)
        env = self.env
        with env.begin_write() as txn:
            applied, at = _POSITION.unpack(txn.get(floor.APPLIED_KEY, None, env.meta))
            if applied < seq:
                applied, at = self._apply(txn, applied, at, synced)
                floor.put_applied(env, txn, _POSITION.pack(applied, at))
        return seq

    def _sync_through(self, seq: int) -> int:
        flock, syncs = fcntl.flock, self.syncs
        flock(syncs, fcntl.LOCK_EX)
        try:
            (synced,) = _SYNCED.unpack(os.pread(syncs, _SYNCED.size, 0))
            if synced >= seq:
                return synced
            flock(self.appends, fcntl.LOCK_EX)
            try:
                _, next_seq = _POSITION.unpack(os.pread(self.appends, _POSITION.size, 0))
            finally:
                flock(self.appends, fcntl.LOCK_UN)
            os.fdatasync(self.wal)
            synced = next_seq - 1
            os.pwrite(syncs, _SYNCED.pack(synced), 0)
            return synced
        finally:
            flock(syncs, fcntl.LOCK_UN)

    def _apply(self, txn: Any, applied: int, at: int, synced: int) -> tuple[int, int]:
        """Apply the records after ``applied`` (at WAL offset ``at``) through ``synced``."""
        env, header, unpack = self.env, RECORD_HEADER_SIZE, RECORD_HEADER.unpack_from
        crc, loads, decode = crc32c.crc32c, cbor2.loads, floor.decode_body
        value_of, put = floor.instance_value, floor.put_value
        chunk, pos = b"", 0
        while applied < synced:
            if pos + header > len(chunk):
                chunk, pos = os.pread(self.wal, READ_CHUNK, at), 0
            length, checksum, seq, ms, _ = unpack(chunk, pos)
            stop = pos + header + length
            if stop > len(chunk):
                chunk, pos = os.pread(self.wal, max(READ_CHUNK, header + length), at), 0
                stop = header + length
            view = memoryview(chunk)
            if seq != applied + 1 or checksum != crc(
                view[pos + 8 : stop], crc(view[pos : pos + 4])
            ):
                raise RuntimeError(f"process floor: bad frame at offset {at}")
            for _, iid, _, _, body, *_ in loads(view[pos + header : stop]):
                key = iid.encode()
                put(env, txn, key, value_of(key, seq, ms, body), decode(body), ms)
            size = header + padded(length)
            pos, at, applied = pos + size, at + size, seq
        return applied, at

    def count(self) -> int:
        with self.env.env.begin(db=self.env.instances) as txn:
            return txn.stat(self.env.instances)["entries"]

    def close(self) -> None:
        for fd in (self.wal, self.appends, self.syncs):
            os.close(fd)
        self.env.close()
