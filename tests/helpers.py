"""Small builders shared by the test modules (importable as ``helpers``: pytest puts tests/ on
sys.path, as for ``workers``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rstmdb_storage import Instance, Storage
from rstmdb_storage.changes import decode_changes

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).with_name("workers.py")


def order(instance_id: str, state: str = "pending", **fields: object) -> Instance:
    """An instance of the "order" machine, version 1."""
    return Instance(id=instance_id, machine="order", version=1, state=state, **fields)


def put_orders(storage: Storage, start: int, count: int, state: str = "pending") -> None:
    """Put orders ``o<start>`` .. ``o<start + count - 1>``, one record each, with 300 bytes of
    context (so that small segments rotate every few dozen)."""
    for i in range(start, start + count):
        storage.put_instance(order(f"o{i}", state=state, ctx={"pad": "p" * 300}))


def instances_by_id(data_dir: Path) -> dict[str, Instance]:
    """Every instance of the store in *data_dir* (opened, and closed again), by id."""
    with Storage.open(data_dir) as storage:
        return {inst.id: inst for inst in storage.iter_instances()}


def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> bool:
    """Poll *condition* until it holds (True) or *timeout* seconds pass (False): for what a
    background thread does, with a deadline instead of a guessed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wal_bytes(data_dir: Path) -> bytes:
    """Every byte of every WAL segment, to show that something wrote nothing."""
    return b"".join(p.read_bytes() for p in sorted((data_dir / "wal").glob("*.wal")))


def start_worker(
    *args: object, stderr: Any = None, stdin: Any = None, **environment: str
) -> subprocess.Popen[str]:
    """``python tests/workers.py ARGS...`` with this checkout importable (and *environment*
    added to its environment), its stdout a pipe of text lines."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **environment
    )
    return subprocess.Popen(
        [sys.executable, str(WORKERS), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def start_armed_worker(
    failpoints: str, *args: object, stderr: Any = None, stdin: Any = None
) -> subprocess.Popen[str]:
    """:func:`start_worker` with the failpoints *failpoints* armed in the child
    (``RSTMDB_FAILPOINTS``, e.g. ``"write.after_sync=3*off->kill"``)."""
    return start_worker(*args, stderr=stderr, stdin=stdin, RSTMDB_FAILPOINTS=failpoints)


# --- transcripts of the writers in tests/workers.py, and the state they lead to ---------------

#: id -> (spec of the latest write, its sequence number)
State = dict[str, tuple[dict[str, Any], int]]


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Complete JSON lines; a last line cut short by the kill (no newline) is dropped: its
    write had not started (a ``try``) or is treated as unacknowledged (an ``ack``)."""
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line]


def write_changes(storage: Storage, changes: list[list[Any]], batch: bool = True) -> int:
    """Write a change list of the workloads (``["put", spec]`` or ``["del", id]`` each) as
    one batch, or its one change as a single write; return the acknowledged sequence number."""
    if not batch:
        ((kind, arg),) = changes
        if kind == "put":
            return storage.put_instance(Instance(**arg))
        return storage.delete_instance(arg)
    with storage.batch() as written:
        for kind, arg in changes:
            if kind == "put":
                written.put_instance(Instance(**arg))
            else:
                written.delete_instance(arg)
    assert written.seq is not None
    return written.seq


def apply_op(state: State, changes: Iterable[list[Any]], seq: int) -> State:
    """*state* after the changes of a transcript (``["put", spec]``, ``["del", id]``) written
    as record *seq*."""
    new = dict(state)
    for kind, arg in changes:
        if kind == "put":
            new[arg["id"]] = (arg, seq)
        else:
            assert arg in new, f"delete of absent {arg!r} in the transcript"
            del new[arg]
    return new


def stored_state(storage: Storage) -> State:
    """Everything the store holds, as (spec, last_wal_offset), cross-checked with get_instance
    (for stores written by the workers: active instances without event ids)."""
    state: State = {}
    for inst in storage.iter_instances():
        spec = {
            "id": inst.id,
            "machine": inst.machine,
            "version": inst.version,
            "state": inst.state,
            "ctx": inst.ctx,
            "metadata": inst.metadata,
        }
        assert inst.status == "active" and inst.last_event_id is None
        assert inst.created_at is not None and inst.updated_at is not None
        assert inst.created_at <= inst.updated_at
        assert storage.get_instance(inst.id) == inst
        state[inst.id] = (spec, inst.last_wal_offset)
    assert storage.count_instances() == len(state)
    return state


def write_ops(
    storage: Storage,
    rng: random.Random,
    count: int,
    state: State | None = None,
    prefix: str = "inst-",
    ids: int = 300,
) -> tuple[State, dict[int, list[list[Any]]]]:
    """Write *count* operations of the workers' kind (mostly batches) on ids ``<prefix><i>``
    into *storage*, holding *state*; return the state after them and the changes of every
    record written."""
    import workers  # tests/ is on sys.path, as for this module

    state = dict(state or {})
    ops_by_seq: dict[int, list[list[Any]]] = {}
    present = {key for key in state if key.startswith(prefix)}
    for n in range(1, count + 1):
        op = workers.make_op(rng, present, n, prefix, ids)
        seq = workers.run_op(storage, op)
        workers.apply_to_present(present, op)
        state = apply_op(state, op["changes"], seq)
        ops_by_seq[seq] = op["changes"]
    return state, ops_by_seq


def change_lists(payload: bytes, where: str) -> list[list[Any]]:
    """The changes of a WAL payload as the arrays the log stores (see rstmdb_storage.changes)."""
    return [change.encoded() for change in decode_changes(payload, where)]
