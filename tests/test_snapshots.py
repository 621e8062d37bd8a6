"""Snapshots: a consistent copy as of one sequence number, published atomically, checksummed."""

from __future__ import annotations

import threading
from pathlib import Path

import lmdb
import pytest
from helpers import order

from rstmdb_storage import CorruptionError, SnapshotManifest, Storage, StorageConfig
from rstmdb_storage.codec import decode_instance
from rstmdb_storage.wal.decoder import decode_segment_header
from rstmdb_storage.wal.format import SEGMENT_HEADER_SIZE, segment_name


def snapshot_state(data_dir: Path, manifest: SnapshotManifest, tmp_path: Path) -> dict:
    """Open a snapshot file as an LMDB environment and read its instances and applied seq."""
    copy_dir = tmp_path / f"open-{manifest.seq}"
    copy_dir.mkdir()
    (copy_dir / "data.mdb").write_bytes(
        (data_dir / "snapshots" / f"{manifest.name}.mdb").read_bytes()
    )
    env = lmdb.open(str(copy_dir), max_dbs=16, readonly=False)
    try:
        with env.begin() as txn:
            db = env.open_db(b"instances", txn=txn, create=False)
            state = {
                key.decode(): decode_instance(key, raw).state
                for key, raw in txn.cursor(db=db).iternext()
            }
    finally:
        env.close()
    return state


def test_a_snapshot_holds_the_state_at_its_sequence(
    storage: Storage, data_dir: Path, tmp_path: Path
) -> None:
    for i in range(20):
        storage.put_instance(order(f"o{i}"))
    manifest = storage.create_snapshot()
    storage.put_instance(order("later"))
    assert (manifest.seq, manifest.instances) == (20, 20)
    for first_seq in storage.wal_segments():  # the store id every WAL segment header carries
        path = data_dir / "wal" / segment_name(first_seq)
        header = path.read_bytes()[:SEGMENT_HEADER_SIZE]
        assert decode_segment_header(header, str(path)) == (first_seq, manifest.store_id)
    assert storage.list_snapshots() == [manifest]
    storage.check_snapshot(manifest)
    assert snapshot_state(data_dir, manifest, tmp_path) == {f"o{i}": "pending" for i in range(20)}
    assert storage.create_snapshot().seq == 21
    assert [m.seq for m in storage.list_snapshots()] == [20, 21]


def test_a_second_snapshot_at_the_same_sequence_is_the_first(storage: Storage) -> None:
    storage.put_instance(order("o"))
    assert storage.create_snapshot() == storage.create_snapshot()
    assert len(storage.list_snapshots()) == 1


def test_snapshot_files_are_published_whole(storage: Storage, data_dir: Path) -> None:
    storage.put_instance(order("o"))
    calls: list[tuple[int, int]] = []
    manifest = storage.create_snapshot(
        progress=lambda step, done, total: calls.append((done, total))
    )
    names = sorted(p.name for p in (data_dir / "snapshots").iterdir())
    expected = [f"{manifest.name}.manifest", f"{manifest.name}.mdb", "snapshot.lock"]
    assert names == expected  # no temporaries
    assert calls and calls[-1] == (manifest.size, manifest.size)


def test_damage_to_a_snapshot_or_its_manifest_is_found(storage: Storage, data_dir: Path) -> None:
    storage.put_instance(order("o"))
    manifest = storage.create_snapshot()
    data = data_dir / "snapshots" / f"{manifest.name}.mdb"
    image = bytearray(data.read_bytes())
    image[len(image) // 2] ^= 0x10
    data.write_bytes(bytes(image))
    with pytest.raises(CorruptionError, match="does not match its manifest"):
        storage.check_snapshot(manifest)
    meta = data_dir / "snapshots" / f"{manifest.name}.manifest"
    raw = bytearray(meta.read_bytes())
    raw[-1] ^= 0x01
    meta.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError):
        storage.list_snapshots()


def test_a_snapshot_taken_while_another_thread_writes_is_one_state(
    storage: Storage, data_dir: Path, tmp_path: Path
) -> None:
    """Each batch moves every instance to state s<k>; a snapshot must hold one k throughout,
    the one its sequence number says, however the writes interleave with the copy."""
    ids = [f"o{i:03d}" for i in range(200)]
    with storage.batch() as batch:
        for instance_id in ids:
            batch.put_instance(order(instance_id, "s0", ctx={"pad": "x" * 500}))
    stop = threading.Event()
    seq_of_state: dict[int, str] = {1: "s0"}

    def write() -> None:
        k = 0
        while not stop.is_set() and k < 500:
            k += 1
            with storage.batch() as batch:
                for instance_id in ids:
                    batch.put_instance(order(instance_id, f"s{k}", ctx={"pad": "x" * 500}))
            seq_of_state[batch.seq] = f"s{k}"

    writer = threading.Thread(target=write)
    writer.start()
    try:
        manifests = [storage.create_snapshot() for _ in range(5)]
    finally:
        stop.set()
        writer.join()
    for manifest in {m.seq: m for m in manifests}.values():  # without a write between, one
        states = set(snapshot_state(data_dir, manifest, tmp_path).values())
        assert states == {seq_of_state[manifest.seq]}, (manifest.seq, states)


def test_verify_lists_what_a_snapshot_that_died_left_and_opening_removes_it(
    config: StorageConfig,
) -> None:
    with Storage.open(config) as storage:
        storage.put_instance(order("o1"))
        manifest = storage.create_snapshot()
        snapshots = config.path / "snapshots"
        # what a snapshot killed half way leaves: a temporary, and a copy without a manifest
        (snapshots / f"{manifest.seq + 5:020d}.mdb.tmp-99-1").write_bytes(b"half")
        (snapshots / f"{manifest.seq + 9:020d}.mdb").write_bytes(b"copied")
        findings = storage.verify()
        assert sorted(Path(f.where).name for f in findings) == [
            f"{manifest.seq + 5:020d}.mdb.tmp-99-1",
            f"{manifest.seq + 9:020d}.mdb",
        ]
        assert all("did not finish" in f.problem for f in findings)
    with Storage.open(config) as storage:
        assert storage.verify() == []
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(
        [f"{manifest.seq:020d}.mdb", f"{manifest.seq:020d}.manifest", "snapshot.lock"]
    )
