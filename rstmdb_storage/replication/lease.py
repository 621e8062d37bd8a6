"""The single-writer lease: of the stores with one store id, one ships to a bucket.

Two directories can hold the same store id: a store restored from a bucket (or a backup) has
the id of the one it came from. If both shipped, their records would interleave in one log. So
a primary ships only while it holds the lease, one object beside its epochs::

    <prefix>/<store-id>/lease     {"holder": "...", "epoch": 2, "expires_ms": 1764...}

written only with conditional PUTs: created with ``If-None-Match: *``, renewed and taken over
with ``If-Match`` on the ETag just read, so that of two writers racing, one wins and the other
is refused (``PreconditionFailed``). The holder names a data directory: the host, the path and
a random id kept in ``<data_dir>/replication.id`` (which a restore or backup does not copy:
the copy is another writer). Every process of one data directory is the same holder, so the
one that takes over shipping when another dies keeps the lease.

A lease held by another writer and not expired (``StorageConfig.lease_ttl_ms``, renewed every
third of it; a clean close lets it expire at once) refuses the start with
:class:`~rstmdb_storage.errors.LeaseHeldError`. An expired one is taken over, and the epoch
raised: the new primary ships under ``e<epoch+1>/``, which begins with an ``epoch`` object and
a snapshot (see :mod:`.layout` and :mod:`.shipping`), so that each epoch restores alone and two
writers' objects never share a name.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptionError, LeaseHeldError, ObjectStoreError
from ..fsutil import os_error, write_file_atomic
from .layout import EPOCH_OBJECT, epoch_dir, parse_epoch
from .objects import ObjectStore

#: the file of a data directory that holds its writer id
ID_NAME = "replication.id"


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str
    epoch: int
    expires_ms: int
    etag: str


def holder_of(data_dir: Path, file_mode: int) -> str:
    """This data directory as a lease holder: host, path, and its random writer id (made on
    first use)."""
    path = data_dir / ID_NAME
    try:
        writer_id = path.read_text().strip()
    except FileNotFoundError:
        writer_id = secrets.token_hex(8)
        write_file_atomic(path, writer_id.encode(), file_mode)
    except OSError as exc:
        raise os_error(exc, f"reading {path}") from exc
    return f"{socket.gethostname()}:{os.path.realpath(data_dir)}:{writer_id}"


class LeaseKeeper:
    """Takes and renews the lease of one store id for one holder.

    Example::

        keeper = LeaseKeeper(objects, store_id_hex, holder_of(path, 0o600), ttl_ms=30_000)
        epoch = keeper.acquire(epochs_in_bucket)   # or LeaseHeldError
        keeper.renew_if_due()                      # every pass; LeaseHeldError if lost
    """

    def __init__(self, objects: ObjectStore, store: str, holder: str, ttl_ms: int) -> None:
        self.objects = objects
        self.name = f"{store}/lease"
        self.holder = holder
        self.ttl_ms = ttl_ms
        self.lease: Lease | None = None

    def acquire(self, epochs: list[int]) -> int:
        """Take the lease (or keep it, if this holder has it); return the epoch to ship under.
        *epochs* are those the bucket holds for the store already.

        :raises LeaseHeldError: another writer holds it and it has not expired
        """
        now = _now_ms()
        current = self._read()
        if current is None:
            # No lease: a new store, or one whose lease was deleted: a new epoch, to be safe.
            epoch = max(epochs, default=0) + 1
            self.lease = self._write(epoch, None, now)
        elif current.holder == self.holder:
            self.lease = self._write(current.epoch, current.etag, now)
        elif current.expires_ms > now:
            raise LeaseHeldError(
                f"{self.objects.where(self.name)} is held by another writer ({current.holder}, "
                f"epoch {current.epoch}) for {(current.expires_ms - now) / 1000:.0f} s more: one "
                f"store ships at a time; stop the other, or wait for its lease to expire"
            )
        else:
            self.lease = self._write(max(current.epoch, *epochs) + 1, current.etag, now)
        return self.lease.epoch

    def renewal_due(self) -> bool:
        """Whether a third of the lease's time is gone (or it is not held)."""
        lease = self.lease
        return lease is None or lease.expires_ms - _now_ms() < self.ttl_ms * 2 // 3

    def renew_if_due(self) -> None:
        """Renew the lease when a third of its time is gone.

        :raises LeaseHeldError: another writer took it over meanwhile
        """
        lease = self.lease
        assert lease is not None
        if self.renewal_due():
            self.lease = self._write(lease.epoch, lease.etag, _now_ms())

    def release(self) -> None:
        """Let the lease expire now (a clean close): another writer may take it at once."""
        lease = self.lease
        if lease is not None:
            self.lease = self._write(lease.epoch, lease.etag, _now_ms(), ttl_ms=0)

    def _read(self) -> Lease | None:
        try:
            data, etag = self.objects.get_versioned(self.name)
        except ObjectStoreError as exc:
            if getattr(exc, "code", None) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            document = json.loads(data)
            return Lease(document["holder"], document["epoch"], document["expires_ms"], etag)
        except (ValueError, KeyError, TypeError) as exc:
            raise ObjectStoreError(
                f"{self.objects.where(self.name)} is not a lease this package wrote: {exc}"
            ) from exc

    def _write(self, epoch: int, etag: str | None, now: int, ttl_ms: int | None = None) -> Lease:
        expires = now + (self.ttl_ms if ttl_ms is None else ttl_ms)
        body = json.dumps({"holder": self.holder, "epoch": epoch, "expires_ms": expires})
        try:
            new_etag = self.objects.put_conditional(self.name, body.encode(), etag)
        except ObjectStoreError as exc:
            if getattr(exc, "code", None) != "PreconditionFailed":
                raise
            raise LeaseHeldError(
                f"{self.objects.where(self.name)} was taken by another writer just now: one "
                f"store ships at a time"
            ) from exc
        return Lease(self.holder, epoch, expires, new_etag)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Epoch:
    """What an ``epoch`` object says: the epoch ships the segments after *start_seq* (the end
    of a sealed segment), beginning with a snapshot at *snapshot_seq* (at or after it; 0 when
    the store was empty)."""

    start_seq: int
    snapshot_seq: int


def read_epochs(objects: ObjectStore, store: str, newer_than: int = 0) -> dict[int, Epoch]:
    """Every epoch after *newer_than* the bucket holds for the store *store* (its id in hex),
    oldest first."""
    found = {}
    for folder in objects.folders(f"{store}/"):
        epoch = parse_epoch(folder)
        if epoch is None or epoch <= newer_than:
            continue
        name = f"{store}/{folder}/{EPOCH_OBJECT}"
        try:
            document = json.loads(objects.get(name))
            found[epoch] = Epoch(document["start_seq"], document["snapshot_seq"])
        except ObjectStoreError as exc:
            if getattr(exc, "code", None) == "NoSuchKey":
                continue  # nothing is shipped under an epoch before its object
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptionError(
                f"{objects.where(name)} is not an epoch this package wrote: {exc}",
                path=objects.where(name),
            ) from exc
    return dict(sorted(found.items()))


def begin_epoch(objects: ObjectStore, store: str, epoch: int, begins: Epoch) -> None:
    """Write the ``epoch`` object that opens *epoch* (once)."""
    document = {
        "epoch": epoch,
        "start_seq": begins.start_seq,
        "snapshot_seq": begins.snapshot_seq,
        "store_id": store,
    }
    objects.put_once(
        f"{epoch_dir(store, epoch)}/{EPOCH_OBJECT}",
        json.dumps(document).encode(),
        {"store-id": store},
    )
