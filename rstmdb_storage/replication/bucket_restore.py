"""Restore from a bucket: the objects a store shipped (:mod:`.layout`) downloaded into a staging
data directory, then the same point-in-time restore as from a directory
(:func:`rstmdb_storage.recovery.restore`).

What is downloaded: the newest shipped snapshot at or before the target sequence (when there is
one) and every segment after it, in sequence order, each checked against its CRC-32C and each
joining the one before it (its first sequence number follows the last one's). The first gap,
mismatch or bad checksum stops the restore with an error naming the object: nothing is skipped.
After the last segment (shipped segments are all sealed) comes an empty one, as in the store
that shipped them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..config import SNAPSHOTS_DIR, WAL_DIR
from ..errors import InvalidInputError, WalGapError
from ..fsutil import write_file_atomic
from ..recovery import check_target, restore
from ..snapshots import DATA_SUFFIX, MANIFEST_SUFFIX, Progress
from ..wal.encoder import encode_segment_header
from ..wal.format import segment_name
from .layout import (
    STORE_ID,
    ShippedSegment,
    epoch_dir,
    parse_manifest,
    parse_segment,
    snapshot_objects,
)
from .lease import read_epochs
from .objects import ObjectStore


def restore_from_bucket(
    url: str,
    target: str | os.PathLike[str],
    seq: int | None,
    until_ms: int | None,
    progress: Progress | None,
) -> int:
    """Build in *target* the state the store shipped to *url* had at *seq* (or *until_ms*);
    return the sequence number restored to (see :meth:`rstmdb_storage.Storage.restore`)."""
    target_path = check_target(target, "restore target")
    objects = ObjectStore(url)
    store = the_store(objects)
    base = epoch_dir(store, _epoch_for(objects, store, seq))
    target_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".rstmdb-download-", dir=target_path.parent))
    try:
        _download(objects, base, staging, seq, until_ms)
        return restore(staging, target_path, seq, until_ms, progress, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def bucket_holds_store(url: str | None) -> bool:
    """Whether a store shipped to *url* (a bucket that cannot be reached raises
    :class:`~rstmdb_storage.errors.ObjectStoreUnavailableError`: no empty store is started
    in place of one that may be there)."""
    return url is not None and any(STORE_ID.fullmatch(n) for n in ObjectStore(url).folders())


def the_store(objects: ObjectStore) -> str:
    """The id (hex) of the one store under the URL's prefix."""
    stores = [name for name in objects.folders() if STORE_ID.fullmatch(name)]
    if not stores:
        raise InvalidInputError(f"{objects.url} holds no shipped store")
    if len(stores) > 1:
        raise InvalidInputError(
            f"{objects.url} holds {len(stores)} stores ({', '.join(stores)}): each store "
            f"ships to a prefix of its own; restore from that one"
        )
    return stores[0]


def _epoch_for(objects: ObjectStore, store: str, seq: int | None) -> int:
    """The newest epoch that holds *seq* (its snapshot is at or before it); the newest for
    None. (By time, the newest: an older epoch's records after a newer one began are another
    writer's history.)"""
    known = read_epochs(objects, store)
    chosen = [epoch for epoch, begins in known.items() if seq is None or begins.snapshot_seq <= seq]
    if not chosen:
        raise InvalidInputError(
            f"{objects.url} holds no epoch of store {store} that reaches sequence {seq}"
        )
    return chosen[-1]


def _download(
    objects: ObjectStore, base: str, staging: Path, seq: int | None, until_ms: int | None
) -> None:
    names = list(objects.names(f"{base}/"))
    segments = sorted(s for s in map(parse_segment, names) if s is not None)
    manifests = sorted(m for m in map(parse_manifest, names) if m is not None)
    # By time, any snapshot may be the one: recovery chooses among them all.
    chosen = (
        manifests
        if until_ms is not None
        else [m for m in manifests if seq is None or m <= seq][-1:]
    )
    (staging / SNAPSHOTS_DIR).mkdir()
    (staging / WAL_DIR).mkdir()
    for snapshot_seq in chosen:
        data_name, manifest_name = snapshot_objects(snapshot_seq)
        stem = f"{snapshot_seq:020d}"
        for name, suffix in ((data_name, DATA_SUFFIX), (manifest_name, MANIFEST_SUFFIX)):
            objects.download(f"{base}/{name}", staging / SNAPSHOTS_DIR / (stem + suffix), 0o600)
    after = chosen[0] if chosen else 0
    # From the segment the snapshot ends in: the WAL must reach it, though it adds nothing.
    needed = [s for s in segments if s.last_seq >= after and (seq is None or s.first_seq <= seq)]
    previous: ShippedSegment | None = None
    for segment in needed:
        if previous is not None and segment.first_seq != previous.last_seq + 1:
            raise WalGapError(
                f"{objects.where(f'{base}/{segment.name}')} starts at sequence "
                f"{segment.first_seq}, but the segment before it ends at {previous.last_seq}: "
                f"records {previous.last_seq + 1} to {segment.first_seq - 1} were not shipped",
                path=objects.where(f"{base}/{segment.name}"),
            )
        objects.download(
            f"{base}/{segment.name}", staging / WAL_DIR / segment_name(segment.first_seq), 0o600
        )
        previous = segment
    # Every shipped segment is sealed; the live store had started the next one, empty, and a
    # snapshot taken since records its tail there. Started again here, as a header alone
    # (appends extend it), the WAL goes on where the snapshot says it does.
    next_seq = previous.last_seq + 1 if previous is not None else after + 1
    store_id = bytes.fromhex(base.partition("/")[0])
    header = encode_segment_header(next_seq, store_id)
    write_file_atomic(staging / WAL_DIR / segment_name(next_seq), header, 0o600)
