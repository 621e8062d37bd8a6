"""Records that pass their CRC but hold what the API would refuse (SPEC: never serve what fails
its checks): replay refuses each with a DecodeError naming the segment and the offset and
saying what to do, applies nothing of it, and says the same on every open."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from helpers import order
from internals import append_raw_payloads

from rstmdb_storage import DecodeError, Storage, StorageConfig

GOOD_BODY = ["order", 1, "pending", {}, {}, "active", None]


def body(**changes: object) -> bytes:
    fields = dict(
        zip(
            ["machine", "version", "state", "ctx", "metadata", "status", "event"],
            GOOD_BODY,
            strict=True,
        )
    )
    fields.update(changes)
    return cbor2.dumps(list(fields.values()))


def put(instance_id: object = "x", created: object = None, updated: object = None, raw=None):
    return [1, instance_id, created, updated, body() if raw is None else raw]


HOSTILE = {
    "empty id": [put("")],
    "id of 600 bytes": [put("i" * 600)],
    "NUL in the id": [put("a\x00b")],
    "created_at -1": [put(created=-1)],
    "updated_at 2**70": [put(updated=2**70)],
    "machine not text": [put(raw=body(machine=7))],
    "version of 100,000 bits": [put(raw=body(version=2**100_000))],
    "version -1": [put(raw=body(version=-1))],
    "state empty": [put(raw=body(state=""))],
    "ctx a list": [put(raw=body(ctx=[1, 2]))],
    "ctx key an int": [put(raw=body(ctx={1: "a"}))],
    "metadata a list": [put(raw=body(metadata=["k", "v"]))],
    "metadata key an int": [put(raw=body(metadata={1: "v"}))],
    "metadata value a list": [put(raw=body(metadata={"k": [1]}))],
    "status bogus": [put(raw=body(status="bogus"))],
    "event id an int": [put(raw=body(event=5))],
    "body of six fields": [put(raw=cbor2.dumps(GOOD_BODY[:6]))],
    "delete of an empty id": [[2, ""]],
    "condition seq 2**64": [[2, "x", [None, 2**64]]],
    "idempotency key empty": [put(), [4, "", 1000]],
    "machine version -1": [[3, "m", -1, cbor2.dumps({})]],
    "machine definition a list": [[3, "m", 1, cbor2.dumps([1])]],
}


@pytest.mark.parametrize("hostile", [*HOSTILE, "bytes after the payload"])
def test_a_hostile_record_is_refused_by_name_and_nothing_of_it_is_served(
    config: StorageConfig, hostile: str
) -> None:
    with Storage.open(config) as storage:
        storage.put_instance(order("before"))
        payload = cbor2.dumps(HOSTILE.get(hostile, [put()]))
        if hostile == "bytes after the payload":
            payload += b"\x00"
        ((seq, offset),) = append_raw_payloads(storage, [payload])
    segment = Path(config.path) / "wal" / "00000000000000000001.wal"
    for _ in range(2):  # the same answer every time
        with pytest.raises(DecodeError) as caught:
            Storage.open(config)
        error = caught.value
        assert error.path == str(segment) and error.offset == offset, str(error)
        assert f"WAL record {seq}" in str(error) and "restore" in str(error)
    with Storage.open(StorageConfig(data_dir=config.data_dir, read_only=True)) as storage:
        assert [i.id for i in storage.iter_instances()] == ["before"]  # nothing of it applied
        assert storage.get_instance("x") is None


def test_the_checks_let_every_acceptable_change_through(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        storage.put_instance(order("x"))
        acceptable = [
            put("y", created=0, updated=2**63 - 1),
            put("z", raw=body(ctx={"n": 1.5, "deep": {"a": [1, None, True]}}, event="e")),
            [2, "x", ["pending", 1]],
            [3, "m", 2**63 - 1, cbor2.dumps({"states": ["a"]})],
            [4, "key", 2**62],
        ]
        append_raw_payloads(storage, [cbor2.dumps(acceptable)])
    with Storage.open(config) as storage:
        assert sorted(i.id for i in storage.iter_instances()) == ["y", "z"]
        assert storage.get_machine("m").version == 2**63 - 1
        assert storage.verify() == []
