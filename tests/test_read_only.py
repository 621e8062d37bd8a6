"""Read-only mode: lookup processes and read-only copies read without writing anything."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import order
from internals import pretend_read_only_mount

from rstmdb_storage import NotAStoreError, ReadOnlyError, Storage, StorageConfig
from rstmdb_storage.cli import main


def read_only(path: Path) -> StorageConfig:
    return StorageConfig(data_dir=path, read_only=True)


def fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def filled(config: StorageConfig) -> StorageConfig:
    with Storage.open(config) as storage:
        for i in range(30):
            storage.put_instance(order(f"o{i}", state="paid" if i % 3 else "pending"))
        storage.create_snapshot()
    return config


def test_read_only_answers_every_kind_of_query(filled: StorageConfig) -> None:
    with Storage.open(read_only(filled.path)) as storage:
        assert storage.get_instance("o4").state == "paid"
        assert len(storage.list_by_state("order", "pending")) == 10
        assert storage.count_by_state("order") == {"paid": 20, "pending": 10}
        assert storage.applied_seq == 30
        assert [r.seq for r in storage.read_wal(from_seq=29)] == [29, 30]
        assert storage.verify() == []


def test_read_only_refuses_every_write_and_writes_nothing(filled: StorageConfig) -> None:
    before = fingerprint(filled.path)
    with Storage.open(read_only(filled.path)) as storage:
        writes = [
            lambda: storage.put_instance(order("new")),
            lambda: storage.delete_instance("o1"),
            lambda: storage.transition("o0", "pending", "paid"),
            lambda: storage.put_machine("order", 1, {}),
            storage.create_snapshot,
            storage.compact,
            storage.checkpoint,
            storage.rebuild_indexes,
            storage.purge_idempotency_keys,
            lambda: storage.hold_wal("x", 1),
        ]
        for write in writes:
            with pytest.raises(ReadOnlyError):
                write()
        with pytest.raises(ReadOnlyError), storage.batch() as batch:
            batch.put_instance(order("in-batch"))
    after = fingerprint(filled.path)
    lock = str(Path("indexes") / "lock.mdb")  # the shared reader table: written by design
    assert {k: v for k, v in after.items() if k != lock} == {
        k: v for k, v in before.items() if k != lock
    }


def test_a_copy_without_a_writable_lock_file_is_read_without_touching_it(
    filled: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(filled.path, copy)
    (copy / "indexes" / "lock.mdb").unlink()
    before = fingerprint(copy)
    pretend_read_only_mount(monkeypatch)
    with Storage.open(read_only(copy)) as storage:
        assert storage.count_instances() == 30 and storage.get_instance("o0").state == "pending"
    assert fingerprint(copy) == before


def test_read_only_takes_no_write_lock_and_sees_a_writer_in_another_process(
    filled: StorageConfig,
) -> None:
    script = (
        "import sys\n"
        "from rstmdb_storage import Instance, Storage, StorageConfig\n"
        "config = StorageConfig(data_dir=sys.argv[1], snapshot_interval=0)\n"
        "with Storage.open(config) as s:\n"
        "    for line in sys.stdin:\n"
        "        s.put_instance(Instance(id=line.strip(), machine='order', version=1,"
        " state='new'))\n"
        "        print('ok', flush=True)\n"
    )
    with Storage.open(read_only(filled.path)) as reader:
        writer = subprocess.Popen(
            [sys.executable, "-c", script, str(filled.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        try:
            for i in range(5):
                writer.stdin.write(f"w{i}\n")
                writer.stdin.flush()
                assert writer.stdout.readline().strip() == "ok"
                assert reader.get_instance(f"w{i}").state == "new"  # visible once acknowledged
        finally:
            writer.stdin.close()
            writer.wait(timeout=60)
        assert writer.returncode == 0
        assert reader.count_instances() == 35


def test_read_only_needs_an_existing_store(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="not an rstmdb-storage data directory"):
        Storage.open(read_only(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_a_read_only_store_does_not_replay_what_lmdb_has_not_applied(
    filled: StorageConfig,
) -> None:
    with Storage.open(filled) as storage:
        storage.put_instance(order("late"))
    with Storage.open(read_only(filled.path)) as storage:
        assert storage.applied_seq == 31 and storage.get_instance("late") is not None


@pytest.fixture
def read_only_mount(tmp_path: Path):
    """A directory on a truly read-only filesystem (a read-only bind mount): the copy an
    operator restores from, or serves lookups from."""
    source, mount_point = tmp_path / "source", tmp_path / "mounted"
    source.mkdir()
    mount_point.mkdir()
    # The tests run as root (.ci/run installs packages too); a failed mount fails the test.
    subprocess.run(["mount", "--bind", str(source), str(mount_point)], check=True)
    try:
        yield source, mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_store_on_a_read_only_filesystem_is_read_and_restored(
    filled: StorageConfig, read_only_mount, tmp_path: Path
) -> None:
    source, mount_point = read_only_mount
    with Storage.open(filled) as storage:
        storage.put_instance(order("in-the-wal-only"))  # applied, and past the snapshot
    shutil.copytree(filled.path, source / "data")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(mount_point)], check=True)
    store = mount_point / "data"
    with pytest.raises(OSError):
        (store / "probe").write_text("x")  # really read-only
    with Storage.open(read_only(store)) as storage:
        assert storage.count_instances() == 31
        assert storage.get_instance("in-the-wal-only") is not None
        assert storage.verify() == []
    for command in (
        ["info"],
        ["verify"],
        ["stats"],
        ["snapshots"],
        ["dump"],
        ["holds"],
        ["get", "in-the-wal-only"],
        ["list", "--since", "0"],
        ["wal"],
    ):
        result = CliRunner().invoke(main, [command[0], str(store), *command[1:]])
        assert result.exit_code == 0, (command, result.stderr)
    assert Storage.restore(store, tmp_path / "restored") == 31
    with Storage.open(tmp_path / "restored") as restored:
        assert restored.count_instances() == 31
