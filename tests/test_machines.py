"""Machine definitions: versioned, immutable once stored, checksummed, carried by the WAL."""

from __future__ import annotations

import shutil

import lmdb
import pytest

from rstmdb_storage import (
    ConflictError,
    InvalidInputError,
    InvalidTypeError,
    MachineDefinition,
    Storage,
    StorageConfig,
)

ORDER_V1 = {"states": ["pending", "paid"], "transitions": [["pending", "paid"]]}
ORDER_V2 = {
    "states": ["pending", "paid", "shipped"],
    "transitions": [["pending", "paid"], ["paid", "shipped"]],
}


def test_put_and_get_versions(storage: Storage) -> None:
    assert storage.get_machine("order") is None
    first = storage.put_machine("order", 1, ORDER_V1)
    storage.put_machine("order", 2, ORDER_V2)
    storage.put_machine("orders", 9, {"other": True})  # a name that extends "order"
    assert storage.get_machine("order", 1) == MachineDefinition("order", 1, ORDER_V1)
    assert storage.get_machine("order") == MachineDefinition("order", 2, ORDER_V2)
    assert storage.get_machine("order", 3) is None
    assert storage.get_machine("orders").version == 9
    assert first == 1 and storage.applied_seq == 3


def test_a_stored_version_is_immutable(storage: Storage) -> None:
    storage.put_machine("order", 1, ORDER_V1)
    assert storage.put_machine("order", 1, dict(ORDER_V1)) == 2  # same definition: harmless
    with pytest.raises(ConflictError, match="version 1 is already defined differently"):
        storage.put_machine("order", 1, ORDER_V2)
    assert storage.get_machine("order", 1).definition == ORDER_V1
    assert storage.applied_seq == 2


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("", 1, {}), InvalidInputError),
        (("order", -1, {}), InvalidInputError),
        (("order", "1", {}), InvalidTypeError),
        (("order", 1, ["not", "a", "dict"]), InvalidTypeError),
        (("order", 1, {"when": object()}), InvalidTypeError),
    ],
)
def test_bad_definitions_write_nothing(storage: Storage, args: tuple, error: type) -> None:
    with pytest.raises(error):
        storage.put_machine(*args)
    assert storage.applied_seq == 0


def test_definitions_survive_reopen_and_a_rebuild_from_the_wal(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        storage.put_machine("order", 1, ORDER_V1)
        storage.put_machine("order", 2, ORDER_V2)
    shutil.rmtree(config.path / "indexes")
    with Storage.open(config) as storage:
        assert storage.get_machine("order") == MachineDefinition("order", 2, ORDER_V2)
        assert storage.verify() == []


def test_a_damaged_definition_is_found(config: StorageConfig) -> None:
    from rstmdb_storage import CorruptionError

    with Storage.open(config) as storage:
        storage.put_machine("order", 1, ORDER_V1)
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"machines", txn=txn)
        key, value = next(iter(txn.cursor(db=db)))
        txn.put(key, value[:-1] + bytes([value[-1] ^ 1]), db=db)
    env.close()
    with Storage.open(config) as storage:
        with pytest.raises(CorruptionError, match="machines"):
            storage.get_machine("order")
        assert [f.where for f in storage.verify()] == [f"machines[{key!r}]"]
