"""The secondary indexes: their byte layout and value order, their upkeep, their check and their
rebuild."""

from __future__ import annotations

import math
import shutil
import struct

import lmdb
import pytest
from helpers import order
from hypothesis import given, settings
from hypothesis import strategies as st

from rstmdb_storage import Storage, StorageConfig, query
from rstmdb_storage.codec import seal
from rstmdb_storage.store.indexes import encode_label_value, index_entries

# --- layout -------------------------------------------------------------------------------------


def test_index_keys_follow_the_documented_layout() -> None:
    entries = index_entries("o-1", "order", "paid", {"n": -1, "c": "a\x00b"}, 0x0102030405060708)
    assert entries == [
        (b"idx_state", b"order\x00paid\x00o-1"),
        (b"idx_time", bytes.fromhex("0102030405060708") + b"o-1"),
        (b"idx_metadata", b"n\x00\x02" + (2**63 - 1).to_bytes(8, "big") + b"o-1"),
        (b"idx_metadata", b"c\x00\x04a\x00\xffb\x00\x01o-1"),
    ]
    assert encode_label_value(True) == b"\x01\x01" and encode_label_value(False) == b"\x01\x00"
    assert encode_label_value(1.0) == b"\x03" + (
        struct.unpack(">Q", struct.pack(">d", 1.0))[0] | 1 << 63
    ).to_bytes(8, "big")
    assert encode_label_value(-0.0) == encode_label_value(0.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2))
def test_int_encoding_keeps_order(pair: list[int]) -> None:
    a, b = pair
    assert (encode_label_value(a) < encode_label_value(b)) == (a < b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False), min_size=2, max_size=2))
def test_float_encoding_keeps_order(pair: list[float]) -> None:
    a, b = pair
    assert (encode_label_value(a) < encode_label_value(b)) == (a < b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(), min_size=2, max_size=2))
def test_str_encoding_keeps_order_and_no_value_prefixes_another(pair: list[str]) -> None:
    a, b = pair
    ea, eb = encode_label_value(a), encode_label_value(b)
    assert (ea < eb) == (a.encode() < b.encode())
    assert a == b or not eb.startswith(ea)


def test_float_extremes_sort() -> None:
    values = [-math.inf, -1e308, -1.0, -5e-324, 0.0, 5e-324, 1.0, 1e308, math.inf]
    assert sorted(values, key=encode_label_value) == values


# --- upkeep, check, rebuild ---------------------------------------------------------------------


def filled(storage: Storage) -> None:
    with storage.batch() as batch:
        for i in range(30):
            batch.put_instance(
                order(
                    f"o{i:02d}",
                    "paid" if i % 3 == 0 else "pending",
                    metadata={"n": i, "even": i % 2 == 0},
                    updated_at=100 + i,
                )
            )


def edit_lmdb(config: StorageConfig, change) -> None:
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            change(txn, lambda name: env.open_db(name, txn=txn))
    finally:
        env.close()


def test_updates_and_deletes_move_index_entries(storage: Storage) -> None:
    filled(storage)
    storage.put_instance(order("o00", "shipped", metadata={"n": 1000}, updated_at=5))
    storage.delete_instance("o03")
    assert [i.id for i in storage.list_by_state("order", "paid")] == [
        f"o{i:02d}" for i in range(6, 30, 3)
    ]
    assert [i.id for i in storage.list_by_state("order", "shipped")] == ["o00"]
    assert [i.id for i in storage.list_by_metadata("n", start=999)] == ["o00"]
    assert storage.list_by_metadata("even", True)[0].id == "o02"
    assert [i.id for i in storage.list_by_time(0, 101)] == ["o00"]
    assert storage.count_by_state("order") == {"paid": 8, "pending": 20, "shipped": 1}
    assert storage.verify() == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("drop a state entry", "missing: instance b'o04' is not indexed"),
        ("add a stray entry", "points to instance b'ghost', which is not stored"),
        ("point an entry elsewhere", "points to b'o05' instead of b'o04'"),
        # entries have no value now, so the bit flips in the value of one an earlier
        # version wrote, and in the key of one of today's
        ("flip a bit in an entry", "CRC32C mismatch"),
        ("flip a bit in an entry's key", "does not match instance b'o04' as stored"),
        ("add a mismatched entry", "does not match instance b'o04' as stored"),
        ("add a time entry of another time", "does not match instance b'o04' as stored"),
        ("add a metadata entry of another value", "does not match instance b'o04' as stored"),
    ],
)
def test_verify_finds_index_damage_and_rebuild_repairs_it(
    config: StorageConfig, damage: str, expected: str
) -> None:
    with Storage.open(config) as storage:
        filled(storage)
    state_key = b"order\x00pending\x00o04"

    def change(txn, db) -> None:
        states = db(b"idx_state")
        if damage == "drop a state entry":
            txn.delete(state_key, db=states)
        elif damage == "add a stray entry":
            txn.put(
                b"order\x00pending\x00ghost",
                seal(b"order\x00pending\x00ghost", b"ghost"),
                db=states,
            )
        elif damage == "point an entry elsewhere":
            txn.put(state_key, seal(state_key, b"o05"), db=states)
        elif damage == "flip a bit in an entry":
            value = bytearray(seal(state_key, b"o04"))
            value[-1] ^= 1
            txn.put(state_key, bytes(value), db=states)
        elif damage == "flip a bit in an entry's key":
            txn.delete(state_key, db=states)
            txn.put(b"order\x00pendinf\x00o04", b"", db=states)
        elif damage == "add a time entry of another time":
            txn.put((99).to_bytes(8, "big") + b"o04", b"", db=db(b"idx_time"))
        elif damage == "add a metadata entry of another value":
            key = b"n\x00" + encode_label_value(5) + b"o04"
            txn.put(key, b"", db=db(b"idx_metadata"))
        else:
            key = b"order\x00shipped\x00o04"
            txn.put(key, seal(key, b"o04"), db=states)

    edit_lmdb(config, change)
    with Storage.open(config) as storage:
        findings = storage.verify()
        assert findings and any(expected in f.problem for f in findings), findings
        assert storage.rebuild_indexes() == 30
        assert storage.verify() == []
        assert len(storage.list_by_state("order", "pending")) == 20


def test_rebuild_in_chunks_indexes_everything(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    filled(storage)
    monkeypatch.setattr(query, "REBUILD_CHUNK", 7)
    assert storage.rebuild_indexes() == 30
    assert storage.verify() == []
    assert storage.count_by_state("order") == {"paid": 10, "pending": 20}


def test_indexes_come_back_when_lmdb_is_rebuilt_from_the_wal(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        filled(storage)
        storage.put_instance(order("o01", "paid", metadata={"n": -5}))
        storage.delete_instance("o02")
        expected = {
            "paid": [i.id for i in storage.list_by_state("order", "paid")],
            "n<0": [i.id for i in storage.list_by_metadata("n", end=0)],
            "time": [i.id for i in storage.list_by_time(0, 2**63, newest_first=True)],
        }
    shutil.rmtree(config.path / "indexes")
    with Storage.open(config) as storage:
        assert storage.verify() == []
        assert [i.id for i in storage.list_by_state("order", "paid")] == expected["paid"]
        assert [i.id for i in storage.list_by_metadata("n", end=0)] == expected["n<0"] == ["o01"]
        assert [i.id for i in storage.list_by_time(0, 2**63, newest_first=True)] == expected["time"]


def test_a_query_meeting_an_entry_without_its_instance_raises(config: StorageConfig) -> None:
    from rstmdb_storage import CorruptionError

    with Storage.open(config) as storage:
        filled(storage)

    def change(txn, db) -> None:
        txn.delete(b"o04", db=db(b"instances"))

    edit_lmdb(config, change)
    with Storage.open(config) as storage, pytest.raises(CorruptionError, match="o04"):
        storage.list_by_state("order", "pending")


def test_index_entries_are_private_to_their_key() -> None:
    """An index value is an envelope over its key: moved under another key, it fails."""
    from rstmdb_storage import CorruptionError
    from rstmdb_storage.codec import unseal

    value = seal(b"order\x00paid\x00a", b"a")
    with pytest.raises(CorruptionError):
        unseal(b"order\x00paid\x00b", value, "idx_state")


# --- entries without a checksum of their own --------------------------------------------------


def index_values(config: StorageConfig) -> dict[bytes, list[tuple[bytes, bytes]]]:
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {
                name: list(txn.cursor(db=env.open_db(name, txn=txn)))
                for name in (b"idx_state", b"idx_time", b"idx_metadata")
            }
    finally:
        env.close()


def test_index_entries_are_written_with_empty_values(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        filled(storage)
    values = index_values(config)
    assert {len(entries) for entries in values.values()} == {30, 60}
    assert all(value == b"" for entries in values.values() for _, value in entries)


def test_a_store_with_enveloped_index_entries_keeps_working(config: StorageConfig) -> None:
    """Earlier versions wrote each entry's value as an envelope around the id: such a store
    lists, updates, verifies and scrubs as one written today."""
    with Storage.open(config) as storage:
        filled(storage)
        expected = [i.id for i in storage.list_by_state("order", "pending")]

    def envelop(txn, db) -> None:
        for name, at in ((b"idx_state", None), (b"idx_time", 8), (b"idx_metadata", None)):
            handle = db(name)
            for key, _ in list(txn.cursor(db=handle)):
                instance_id = key[at:] if at else key[key.rindex(b"o") :]
                txn.put(key, seal(key, instance_id), db=handle)

    edit_lmdb(config, envelop)
    assert all(value for entries in index_values(config).values() for _, value in entries)
    with Storage.open(config) as storage:
        assert storage.verify() == []
        assert storage.scrub() == []
        assert [i.id for i in storage.list_by_state("order", "pending")] == expected
        assert [i.id for i in storage.list_by_metadata("n", start=28)] == ["o28", "o29"]
        assert [i.id for i in storage.list_by_time(101, 103, newest_first=True)] == ["o02", "o01"]
        storage.put_instance(order("o01", "paid", metadata={"n": 1, "even": False}))
        storage.delete_instance("o02")
        assert "o01" in [i.id for i in storage.list_by_state("order", "paid")]
        assert storage.verify() == []


@pytest.mark.parametrize(
    ("db_name", "key", "listing"),
    [
        (b"idx_state", b"order\x00pending\x00o03", lambda s: s.list_by_state("order", "pending")),
        (b"idx_time", (5).to_bytes(8, "big") + b"o04", lambda s: s.list_by_time(0, 10)),
        (
            b"idx_time",
            (5).to_bytes(8, "big") + b"o04",
            lambda s: s.list_by_time(0, 10, newest_first=True),
        ),
        (
            b"idx_metadata",
            b"n\x00" + encode_label_value(7) + b"o04",
            lambda s: s.list_by_metadata("n", 7),
        ),
        (
            b"idx_metadata",
            b"n\x00" + encode_label_value(7) + b"o04",
            lambda s: s.list_by_metadata("n", start=6, end=8),
        ),
        (b"idx_state", b"order\x00pending\x00", lambda s: s.list_by_state("order", "pending")),
        (
            b"idx_metadata",
            b"n\x00" + encode_label_value(7),
            lambda s: list(s.iter_by_metadata("n", start=6)),
        ),
    ],
    ids=["state", "time", "time-reverse", "label", "label-span", "state-no-id", "label-no-id"],
)
def test_a_listing_meeting_an_entry_its_instance_does_not_match_raises(
    config: StorageConfig, db_name: bytes, key: bytes, listing
) -> None:
    """An entry has no checksum of its own: a listing checks that the instance it points to
    matches it, and treats an entry that does not as damage, never listing the instance."""
    from rstmdb_storage import CorruptionError

    with Storage.open(config) as storage:
        filled(storage)

    def stray(txn, db) -> None:
        txn.put(key, b"", db=db(db_name))

    edit_lmdb(config, stray)
    with Storage.open(config) as storage:
        with pytest.raises(CorruptionError, match=r"does not match|holds no instance id") as info:
            listing(storage)
        assert info.value.key == key
        assert any(f.where.startswith(db_name.decode()) for f in storage.verify())
