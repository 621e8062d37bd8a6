"""Consistent multi-reads: ``storage.reader()`` gives one view of the store, whatever writers
commit while it is open, through every lookup; it refuses what would break it (a write from
its own thread, a listing iterated after the block) with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from rstmdb_storage import (
    Instance,
    InvalidInputError,
    Reader,
    Storage,
    StorageClosedError,
    StorageError,
)


def _order(i: int, state: str = "pending", **fields: Any) -> Instance:
    fields.setdefault("metadata", {"customer": f"c{i % 3}"})
    return Instance(
        id=f"o{i}", machine="order", version=1, state=state, updated_at=1000 + i, **fields
    )


def _everything(view: Storage | Reader) -> dict[str, Any]:
    """What every kind of lookup answers, in one value to compare."""

    def ids(instances: Any) -> list[str]:
        return [one.id for one in instances]

    return {
        "applied_seq": view.applied_seq,
        "get": {f"o{i}": view.get_instance(f"o{i}") for i in range(12)},
        "count": view.count_instances(),
        "all": ids(view.iter_instances()),
        "pending": ids(view.list_by_state("order", "pending")),
        "pending, paged": ids(view.list_by_state("order", "pending", limit=2)),
        "paid, lazily": ids(view.iter_by_state("order", "paid")),
        "by state": view.count_by_state("order"),
        "c1": ids(view.list_by_metadata("customer", "c1")),
        "c0.., lazily": ids(view.iter_by_metadata("customer", start="c0")),
        "recent": ids(view.list_by_time(1004, 2**63 - 1, newest_first=True)),
        "by time, lazily": ids(view.iter_by_time(0, 1008)),
        "machine": view.get_machine("order"),
        "machines": view.list_machines(),
    }


def _write_much(storage: Storage) -> None:
    """Changes to every answer of :func:`_everything`."""
    storage.delete_instance("o1")
    storage.transition("o2", "pending", "paid")
    storage.put_instance(_order(10, metadata={"customer": "c1"}))
    with storage.batch() as batch:
        batch.put_instance(_order(11, state="paid"))
        batch.put_instance(_order(3, state="paid"))
    storage.put_machine("order", 2, {"states": ["pending", "paid", "shipped"]})


def _in_thread(work: Any, storage: Storage, failed: list[BaseException]) -> None:
    try:
        work(storage)
    except BaseException as exc:
        failed.append(exc)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage.open(tmp_path / "data")
    store.put_machine("order", 1, {"states": ["pending", "paid"]})
    with store.batch() as batch:
        for i in range(8):
            batch.put_instance(_order(i, state="paid" if i % 4 == 0 else "pending"))
    yield store
    store.close()


def test_every_lookup_in_a_reader_sees_the_state_it_began_with(storage: Storage) -> None:
    before = _everything(storage)
    with storage.reader() as reader:
        assert _everything(reader) == before
        failed: list[BaseException] = []
        writer = threading.Thread(target=_in_thread, args=(_write_much, storage, failed))
        writer.start()
        writer.join()
        assert not failed, failed
        after = _everything(storage)
        assert after != before and after["applied_seq"] == before["applied_seq"] + 5
        assert _everything(reader) == before, "the view moved with the writer"
    assert _everything(storage) == after


def test_a_reader_does_not_see_another_process_commit(storage: Storage, tmp_path: Path) -> None:
    with storage.reader() as reader:
        script = (
            "import sys; from rstmdb_storage import Storage; "
            "s = Storage.open(sys.argv[1]); s.delete_instance('o5'); s.close()"
        )
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")], check=True)
        assert storage.get_instance("o5") is None
        assert reader.get_instance("o5") is not None
        assert "o5" in [one.id for one in reader.list_by_state("order", "pending")]


def test_a_listing_iterated_after_its_reader_ended_refuses(storage: Storage) -> None:
    with storage.reader() as reader:
        lazy = reader.iter_by_state("order", "pending")
        first = next(lazy)
        also_lazy = reader.iter_instances()
    assert first.state == "pending"
    with pytest.raises(StorageClosedError, match="inside its with block"):
        list(also_lazy)
    with pytest.raises(StorageClosedError, match="inside its with block"):
        reader.get_instance("o1")


def test_a_write_from_the_readers_own_thread_is_refused_and_writes_nothing(
    storage: Storage,
) -> None:
    seq = storage.applied_seq
    with storage.reader() as reader:
        with pytest.raises(StorageError, match="end the reader first"):
            storage.put_instance(_order(99))
        with pytest.raises(StorageError, match="end the reader first"), storage.batch() as b:
            b.delete_instance("o1")
        with pytest.raises(StorageError, match="end the reader first"):
            storage.checkpoint()
        with storage.reader() as inner:  # readers nest
            assert inner.get_instance("o1") is not None
        with pytest.raises(StorageError, match="end the reader first"):
            storage.delete_instance("o1")
        assert reader.get_instance("o99") is None
    assert storage.applied_seq == seq and storage.get_instance("o99") is None
    storage.put_instance(_order(99))  # once it ended, writes go on
    assert storage.get_instance("o99") is not None


def test_a_fork_inside_a_reader_does_not_wait_for_it(storage: Storage) -> None:
    """The fork hook waits for reads in flight in other threads, never for the forking
    thread's own reader (which cannot end while it waits)."""
    with storage.reader() as reader:
        pid = os.fork()
        if pid == 0:  # the child opens the store again, and sees the latest state
            os._exit(0 if storage.get_instance("o1") is not None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert reader.get_instance("o1") is not None


def test_a_reader_checks_its_arguments_like_the_store(storage: Storage) -> None:
    with storage.reader() as reader:
        with pytest.raises(InvalidInputError):
            reader.get_instance("")
        with pytest.raises(InvalidInputError):
            reader.get_instance("a\x00b")
        with pytest.raises(InvalidInputError):
            reader.list_by_state("order", "pending", limit=0)


def test_a_closed_store_gives_no_reader(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "data")
    store.close()
    with pytest.raises(StorageClosedError), store.reader():
        pass
