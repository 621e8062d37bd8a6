"""The main job in one page: open a store, write instances, read them back, move one through a
transition, query by state and metadata, list everything, snapshot, compact, back up, restore
to a point in time, reopen. On a store that already holds many instances (from earlier runs or
the workers example) it prints a summary, never every id.

Run it with ``python examples/demo.py [DATA_DIR]`` (default ``./rstmdb-data``). Running it again
continues the same store: sequence numbers carry on where they stopped.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from rstmdb_storage import (
    ConflictError,
    Instance,
    InstanceNotFoundError,
    Storage,
    StorageConfig,
)

#: ids printed of any list; a large store gets a count for the rest
SHOWN = 10


def summary(ids: Iterable[str]) -> str:
    """At most SHOWN ids, then how many more there are."""
    shown, more = [], 0
    for instance_id in ids:
        if len(shown) < SHOWN:
            shown.append(instance_id)
        else:
            more += 1
    return ", ".join(shown) + (f" ... and {more} more" if more else "") or "(none)"


def main(data_dir: str) -> None:
    config = StorageConfig(data_dir=data_dir)
    with Storage.open(config) as storage:
        print(
            f"opened {data_dir}: {storage.count_instances()} instances, "
            f"WAL applied up to sequence {storage.applied_seq}"
        )

        seq = storage.put_instance(
            Instance(
                id="order-1",
                machine="order",
                version=1,
                state="pending",
                ctx={"total": 99.5},
                metadata={"customer": "alice"},
            )
        )
        print(f"put order-1 (pending): durable at WAL sequence {seq}")

        order = storage.get_instance("order-1")
        assert order is not None
        order.state, order.ctx["paid_at"] = "paid", int(time.time())
        print(f"put order-1 (paid): WAL sequence {storage.put_instance(order)}")

        with storage.batch() as batch:
            for n in range(2, 6):
                batch.put_instance(
                    Instance(
                        id=f"order-{n}",
                        machine="order",
                        version=1,
                        state="pending",
                        ctx={"total": 10.0 * n},
                        metadata={"customer": "bob"},
                    )
                )
        print(f"batch of {len(batch)} orders: one WAL record, sequence {batch.seq}")

        try:
            storage.delete_instance("order-404")
        except InstanceNotFoundError as exc:
            print(f"delete of a missing order refused, nothing written: {exc}")

        paid = storage.transition("order-2", "pending", "paid", event_id="evt-2")
        print(f"transition order-2 pending -> paid at WAL sequence {paid.last_wal_offset}")
        try:
            storage.transition("order-2", "pending", "paid")
        except ConflictError as exc:
            print(f"the same transition again is refused: {exc}")

        print(f"orders per state: {storage.count_by_state('order')}")
        pending = storage.list_by_state("order", "pending", limit=2)
        print(
            f"first page of pending orders: {[i.id for i in pending]}, "
            f"next cursor {pending.next_cursor!r}"
        )
        bobs = storage.iter_by_metadata("customer", "bob")
        print(f"orders of customer bob: {summary(inst.id for inst in bobs)}")

        total = storage.count_instances()
        capped = f" in all, the first {SHOWN}" if total > SHOWN else ""
        print(f"stored instances ({total}{capped}):")
        for inst in itertools.islice(storage.iter_instances(), SHOWN):
            print(
                f"  {inst.id:<10} {inst.machine}/{inst.state:<8} ctx={inst.ctx} "
                f"seq={inst.last_wal_offset}"
            )

        print("newest WAL records:")
        first = max(1, storage.applied_seq - 2)
        for record in storage.read_wal(first):
            print(
                f"  seq {record.seq} written at {record.timestamp_ms} ms, "
                f"{len(record.payload)} payload bytes"
            )
        snapshot = storage.create_snapshot()
        print(
            f"snapshot of sequence {snapshot.seq}: {snapshot.instances} instances, "
            f"{snapshot.size} bytes, CRC32C {snapshot.crc32c:#010x}"
        )
        done = storage.compact()
        print(
            f"compaction: {done.segments_deleted} WAL segment(s) and {done.snapshots_deleted} "
            f"old snapshot(s) deleted, {done.bytes_reclaimed} bytes reclaimed"
        )

        with tempfile.TemporaryDirectory() as scratch:
            backed_up = storage.backup(Path(scratch) / "backup")
            print(f"backup while open: holds everything up to sequence {backed_up}")
            before_batch = batch.seq - 1
            Storage.restore(Path(scratch) / "backup", Path(scratch) / "then", seq=before_batch)
            with Storage.open(Path(scratch) / "then") as then:
                ids = summary(inst.id for inst in then.iter_instances())
                print(f"point-in-time restore to sequence {before_batch}, before the batch: {ids}")

    with Storage.open(config) as storage:
        print(
            f"reopened: {storage.count_instances()} instances, "
            f"applied sequence {storage.applied_seq}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rstmdb-data")
