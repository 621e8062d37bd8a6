"""Where a store's files go in the bucket, and what each object's name and metadata say.

Under the URL's prefix, one directory per store (its random store id, in hex) and, in it, one
per epoch (see :mod:`.lease`: each new writer of the store id ships under a new epoch)::

    <prefix>/<store-id>/lease                                the single-writer lease (JSON)
    <prefix>/<store-id>/e<epoch>/epoch                       {"epoch", "start_seq", "store_id"}
    <prefix>/<store-id>/e<epoch>/wal/<first:016x>-<last:016x>.seg
    <prefix>/<store-id>/e<epoch>/snap/<seq:016x>.snap        a snapshot's copy (.mdb)
    <prefix>/<store-id>/e<epoch>/snap/<seq:016x>.manifest    its manifest, written after it

An epoch begins at ``start_seq``: its ``epoch`` object is written first, with a snapshot at
that sequence number (none when it is 0), and then the segments holding the records after it,
so that each epoch restores alone. A ``.seg`` object is a sealed WAL segment file, byte for
byte (``wal/format.py``); its name carries the first and the last sequence number it holds. A
``.snap`` and its ``.manifest`` are a published snapshot's two files (``snapshots.py``); the
manifest is written last, so a manifest in the bucket always describes a complete copy. Every
object's metadata holds ``store-id``, ``epoch`` and, for a segment, ``first-seq``,
``last-seq`` and ``prev-last-seq`` (the last sequence number of the segment before it: a
replica checks that they join), besides the ``crc32c`` of :mod:`.objects`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the object that opens an epoch
EPOCH_OBJECT = "epoch"

_SEGMENT = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.seg$")
_MANIFEST = re.compile(r"^([0-9a-f]{16})\.manifest$")
_EPOCH = re.compile(r"e([1-9][0-9]{0,8})")
#: a store's directory name: its id in hex
STORE_ID = re.compile(r"[0-9a-f]{32}")


def epoch_dir(store: str, epoch: int) -> str:
    """The directory of one epoch of a store (its id in hex):
    ``epoch_dir("00ff" * 8, 2) == "00ff00ff00ff00ff00ff00ff00ff00ff/e2"``"""
    return f"{store}/e{epoch}"


def parse_epoch(name: str) -> int | None:
    """The epoch a directory name (``e2``, or ``e2/``) is, or None."""
    match = _EPOCH.fullmatch(name.rstrip("/"))
    return int(match.group(1)) if match else None


def segment_object(first_seq: int, last_seq: int) -> str:
    """``segment_object(1, 41) == "wal/0000000000000001-0000000000000029.seg"``"""
    return f"wal/{first_seq:016x}-{last_seq:016x}.seg"


def snapshot_objects(seq: int) -> tuple[str, str]:
    """The names of a snapshot's copy and its manifest."""
    return f"snap/{seq:016x}.snap", f"snap/{seq:016x}.manifest"


@dataclass(frozen=True, slots=True, order=True)
class ShippedSegment:
    first_seq: int
    last_seq: int

    @property
    def name(self) -> str:
        return segment_object(self.first_seq, self.last_seq)


def parse_segment(name: str) -> ShippedSegment | None:
    """The segment a name under ``wal/`` is, or None if it is not one."""
    match = _SEGMENT.match(name.rpartition("/")[2])
    if not match:
        return None
    return ShippedSegment(int(match.group(1), 16), int(match.group(2), 16))


def parse_manifest(name: str) -> int | None:
    """The sequence number of a snapshot manifest's name, or None if it is not one."""
    match = _MANIFEST.match(name.rpartition("/")[2])
    return int(match.group(1), 16) if match else None
