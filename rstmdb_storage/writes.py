"""The write path: a put, a delete, a machine definition or a whole batch, as one WAL record.

One transaction (the usual path):

1. check and encode the input into :mod:`~rstmdb_storage.changes` (outside any lock: bad input
   raises before anything is written);
2. take the write lock (a thread lock, then LMDB's cross-process write transaction);
3. under the append lock (which keeps grouped appenders of other processes out), apply any
   record past the applied tail that a crashed writer left behind (:mod:`.replay`), judge the
   write's conditions and idempotency key, and append the record at the tail;
4. put its changes and the new tail into the same transaction while the device writes the
   record, then ``fdatasync`` it (under the default policy);
5. commit: the changes become visible; then return (the acknowledgement).

A change is therefore never visible before its WAL record is written (and, by default,
durable), and the transaction that applies it records its sequence number, so opening the store
replays exactly the records LMDB has not seen.

Threads of one process write through a queue (:mod:`rstmdb_storage.thread_group`): a thread
that finds another's write in flight waits, and the next leader takes steps 2 to 5 once for
every queued record, each judged against the records before it (a refused write refuses only
itself; a failed sync fails them all), so that one write of the WAL and one ``fdatasync`` serve
them all.

Group commit: when writer *processes* contend (another process was found holding the write
lock, or a sync of another writer covered ours), durable writes take three steps instead, so
that one ``fdatasync`` serves many of them (the lock files are described in
:mod:`rstmdb_storage.wal.group_commit`): **append** under the append lock, without LMDB's write
lock and without syncing; **sync** outside both, unless another writer's sync covered the
record; **apply** every synced record not applied yet, whoever wrote it. Nothing is visible
before it is durable, and conditions are judged at append time against the state every earlier
record leads to, which is what applying them in order reaches again. Both paths judge with
:func:`judge`. The apply reads back from the WAL only the records of other writers: this
process's own go in from memory, as in one transaction (what they change is what they hold).

Locks are always taken in one order, so that no two writers wait for each other: the write
mutex, then LMDB's write transaction, then the append lock; the sync lock, then the append
lock. The sync lock is never taken holding the others.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .apply import apply_changes, first_failure, remembered_write
from .changes import (
    Change,
    DeleteInstance,
    IdempotencyKey,
    PutInstance,
    encode_changes,
    must_check,
)
from .config import DB_IDEMPOTENCY, WAL_DIR
from .engine import Engine
from .errors import ConflictError, InstanceNotFoundError, ReadOnlyError, StorageError
from .failpoints import failpoint
from .model import Instance, check_name
from .query import get_instance, remembered
from .replay import OwnRecords, apply_pending, apply_through, walk
from .store.env import LmdbEnvironment
from .thread_group import Request
from .wal import WalTail
from .wal.group_commit import SharedAppendTail

#: a wait for the write lock longer than this means another writer held it: contention
_CONTENDED_WAIT = 0.0002


def commit(engine: Engine, changes: list[Change], idempotency_key: str | None = None) -> int:
    """Write *changes* as one record; return its sequence number (for a retry with a known
    *idempotency_key*, the first write's).

    :raises ConflictError, InstanceNotFoundError: a condition or a delete fails; nothing is
        written
    """
    config = engine.config
    if config.replica_of is not None:
        raise ReadOnlyError(
            f"storage at {config.path} is a replica of {config.replica_of}: write to its primary"
        )
    if idempotency_key is not None:
        check_name("idempotency_key", idempotency_key)
        changes = [*changes, IdempotencyKey(idempotency_key, config.idempotency_retention_ms)]
    payload = encode_changes(changes, config.max_record_size)
    env = engine.writable()
    work = (changes, payload, idempotency_key)
    seq = engine.thread_group().submit(work, lambda group: _write_group(engine, env, group))
    engine.after_write()
    return seq


def judge(
    txn: Any,
    dbs: dict[bytes, Any],
    seq: int,
    changes: list[Change],
    idempotency_key: str | None,
    timestamp_ms: int,
) -> int | None:
    """Judge *changes*, to be written as record *seq*, against the state in *txn*: the first
    write's sequence number for a known idempotency key, else None.

    :raises ConflictError, InstanceNotFoundError: a condition or a delete fails
    """
    if idempotency_key is not None:
        first = remembered_write(txn, dbs[DB_IDEMPOTENCY], idempotency_key, timestamp_ms)
        if first is not None:
            return first
    if must_check(changes):
        failure = first_failure(txn, dbs, seq, changes, deletes_must_find=True)
        if failure is not None:
            kind, message = failure
            raise (ConflictError if kind == "conflict" else InstanceNotFoundError)(message)
    return None


# --- one transaction ----------------------------------------------------------------------------


def _write_group(engine: Engine, env: LmdbEnvironment, group: list[Request]) -> None:
    """Write the records of a group of this process's threads (a group of one when no other
    thread is writing), sharing one sync: in one transaction, or in the three steps of group
    commit while writer processes contend. Then each request gets its sequence number (for
    a retry with a known idempotency key, the first write's) or its error."""
    outcomes: list[int | Exception | None] = [None] * len(group)
    if engine.grouping():
        try:
            _commit_grouped(engine, env, group, outcomes)
        except OSError as exc:  # between two steps, outside the rooms that type their own
            raise engine.typed(exc, "writing") from exc
    else:
        with env.write_mutex:
            engine.wal.check_usable()
            # *outcomes* is kept across the attempts: a record appended before a full map
            # aborted the transaction waits at the WAL tail, the next attempt's catch-up
            # applies it, and the attempt only reports its sequence number.
            while not engine.growing(env, _write_once, engine, env, group, outcomes):
                pass  # the catch-up committed a chunk of replay first
            engine.dirty = True
    for request, outcome in zip(group, outcomes, strict=True):
        if isinstance(outcome, Exception):
            request.error = outcome
        else:
            request.result = outcome


def _write_once(
    engine: Engine,
    env: LmdbEnvironment,
    group: list[Request],
    outcomes: list[int | Exception | None],
) -> bool:
    """One attempt of the one-transaction path: True once it committed every request's
    record, False when the catch-up committed a chunk of replay first."""
    meta, wal = engine.meta, engine.wal
    appends, _ = engine.group_locks()
    started = time.perf_counter()
    with env.begin_write() as txn:
        waited = time.perf_counter() - started > _CONTENDED_WAIT
        # The append lock keeps grouped appenders out while the log's end is read and
        # written; it is not held across the sync.
        with appends.locked():
            before = meta.tail(txn)
            if waited and before != engine.committed_tail:
                # Another process held the write lock, and committed: contention. (A wait
                # alone may be the scheduler's, on a loaded machine: a lone writer taken for
                # a contended one would pay group commit's extra steps for nothing. Threads
                # of this process queue in the thread group instead.)
                engine.note_contention()
            tail, caught_up = apply_pending(engine, txn, before)
            if not caught_up:
                return False  # commit this chunk of replay, then go on
            timestamp_ms = time.time_ns() // 1_000_000
            new_tail, changed = _append_group(
                engine, txn, appends, tail, timestamp_ms, group, outcomes
            )
        if new_tail is not tail:
            engine.write_applied(txn, new_tail, changed)
            if wal.sync_due():
                wal.sync()
            failpoint("write.after_sync")
    engine.committed_tail = new_tail
    if new_tail is not tail:
        failpoint("write.after_commit")
    return True


def _append_group(
    engine: Engine,
    txn: Any,
    appends: SharedAppendTail,
    tail: WalTail,
    timestamp_ms: int,
    group: list[Request],
    outcomes: list[int | Exception | None],
) -> tuple[WalTail, list[Change]]:
    """Judge, append and apply, in order, each request of *group* without an outcome yet,
    inside *txn* (holding the append lock): each is judged against the state every record
    before it leads to. Return the tail after the last record and the changes applied.

    The append tail of group commit is stored once, after the last record: nobody reads it
    before the append lock is let go. (A stale one costs only a longer walk: an appender
    walks from it to the WAL's end.)

    A group's records are written in one write, after the last is judged and before the
    lock is let go or the log synced (8 threads made about 7% more puts/s than with a write
    a record, medians of 12 alternating runs). A lone record is written at once, and so are
    the records of a group that would fill its segment (the seal must follow them)."""
    wal, dbs = engine.wal, engine.env.dbs
    start = tail
    changed: list[Change] = []
    frames = [] if len(group) > 1 and wal.fits(tail, [r.work[1] for r in group]) else None
    #: requests whose records wait in *frames*: until it is written, none of them counts
    unwritten: list[int] = []
    try:
        for n, request in enumerate(group):
            if outcomes[n] is not None:
                continue  # appended (and applied again by the catch-up), judged, or refused
            changes, payload, idempotency_key = request.work
            seq = tail.next_seq
            try:
                first = judge(txn, dbs, seq, changes, idempotency_key, timestamp_ms)
            except StorageError as exc:  # a failed condition, or damage met judging
                outcomes[n] = exc
                continue
            if first is not None:
                outcomes[n] = first  # a retry: the first write's result
                continue
            try:
                after = wal.append(tail, timestamp_ms, payload, frames)
            except (StorageError, OSError) as exc:
                # Nothing of this record counts (the tail stays where it was), nor is
                # anything after it tried: the records before it commit, the rest get this.
                error = _typed(engine, exc)
                for later in range(n, len(group)):
                    if outcomes[later] is None:
                        outcomes[later] = error
                break
            outcomes[n] = seq
            if frames is not None:
                unwritten.append(n)
            elif tail is start:  # the first record written
                failpoint("write.after_append")
                # A lone record goes to the device while its changes go into the transaction
                # (visible only with the commit, after the sync). Not a group's: its next
                # records dirty the page again while it is being written, and the sync must
                # then wait for that write and make another (8 threads made about 7% more
                # puts/s without it, medians of 6 alternating runs).
                if len(group) == 1 and wal.sync_due():
                    wal.start_sync()
            apply_changes(txn, dbs, seq, timestamp_ms, changes)
            changed.extend(changes)
            tail = after
        if frames:
            wal.write_frames(start, frames)
            unwritten.clear()
            failpoint("write.after_append")
    except BaseException:
        # The transaction aborts. A full map is retried: the records never written are
        # judged and appended again then (the others wait at the tail for the catch-up).
        for n in unwritten:
            outcomes[n] = None
        raise
    if tail is not start:
        # Should this fail, the transaction is aborted and the whole group gets the error;
        # the records it wrote wait past the applied tail for the next writer's catch-up.
        appends.write_tail(tail)
    return tail, changed


def _typed(engine: Engine, exc: StorageError | OSError) -> StorageError:
    """The error a write gets for *exc*, met appending its record (the append lock's
    position file is written with a bare ``pwrite``)."""
    return engine.typed(exc, "appending to the WAL") if isinstance(exc, OSError) else exc


def _append_record(
    engine: Engine, appends: SharedAppendTail, tail: WalTail, timestamp_ms: int, payload: bytes
) -> WalTail:
    """Append the record at *tail* and store the tail after it; call holding the append
    lock. Return the new tail."""
    new_tail = engine.wal.append(tail, timestamp_ms, payload)
    appends.write_tail(new_tail)
    return new_tail


# --- group commit -------------------------------------------------------------------------------


def _commit_grouped(
    engine: Engine,
    env: LmdbEnvironment,
    group: list[Request],
    outcomes: list[int | Exception | None],
) -> None:
    own: OwnRecords = {}
    with env.write_mutex:
        engine.wal.check_usable()
        for n, request in enumerate(group):
            try:
                outcomes[n] = _append_grouped(engine, env, *request.work, own)
            except (StorageError, OSError) as exc:  # this one's: a failed condition, a full disk
                outcomes[n] = _typed(engine, exc)
    # The last record appended: the sync and the apply that cover it cover the group's
    # (a retry's first write, whose number may be earlier, is covered by them as well).
    seq = max((seq for seq in outcomes if isinstance(seq, int)), default=None)
    if seq is None:
        return
    failpoint("group.after_append")
    synced, covered = _sync_through(engine, seq)
    failpoint("group.after_sync")
    # A writer whose sync covered ours may have applied it already; one that synced its
    # own record goes straight to the apply (which checks again inside the transaction).
    if not covered or engine.applied_tail().applied_seq < seq:
        with env.write_mutex:
            engine.growing(env, _apply_synced, engine, env, seq, synced, own)
            engine.dirty = True
    failpoint("group.after_apply")


def _append_grouped(
    engine: Engine,
    env: LmdbEnvironment,
    changes: list[Change],
    payload: bytes,
    idempotency_key: str | None,
    own: OwnRecords | None = None,
) -> int:
    """Step 1: append the record at the append tail; return its sequence number (or, for
    a retry with a known idempotency key, the first write's), and note the record in *own*.
    A plain put needs only the append lock; a condition or an idempotency key is judged
    inside an LMDB write transaction that is then thrown away."""
    if idempotency_key is None and not must_check(changes):
        appends, _ = engine.group_locks()
        with appends.locked():
            tail = _tail_for_append(engine, appends, None)
            timestamp_ms = time.time_ns() // 1_000_000
            after = _append_record(engine, appends, tail, timestamp_ms, payload)
    else:
        first, timestamp_ms, after = engine.growing(
            env, _judge_and_append, engine, env, changes, payload, idempotency_key
        )
        if first is not None:
            return first  # a retry: the first write's
    if own is not None:
        own[after.applied_seq] = (changes, timestamp_ms, after)
    return after.applied_seq


def _judge_and_append(
    engine: Engine,
    env: LmdbEnvironment,
    changes: list[Change],
    payload: bytes,
    idempotency_key: str | None,
) -> tuple[int | None, int, WalTail]:
    """The judged append: (the first write's sequence number, now, the tail) for a retry,
    which appends nothing, else (None, the record's timestamp, the tail after it)."""
    appends, _ = engine.group_locks()
    txn = env.begin_write()
    try:
        applied = engine.meta.tail(txn)
        with appends.locked():
            appended = _tail_for_append(engine, appends, applied)
            if appended != applied:
                engine.note_contention()
            timestamp_ms = time.time_ns() // 1_000_000
            # Records appended but not applied yet are applied in a nested transaction thrown
            # away afterwards: what they change is not durable yet.
            view = txn if appended == applied else env.begin_nested(txn)
            try:
                if view is not txn:
                    walk(engine, view, applied, until_seq=appended.applied_seq, mark_unsynced=False)
                first = judge(
                    view, env.dbs, appended.next_seq, changes, idempotency_key, timestamp_ms
                )
            finally:
                if view is not txn:
                    view.abort()
            if first is not None:  # steps 2 and 3 make the first write durable and visible
                return first, timestamp_ms, appended
            return (
                None,
                timestamp_ms,
                _append_record(engine, appends, appended, timestamp_ms, payload),
            )
    finally:
        txn.abort()


def _tail_for_append(engine: Engine, appends: SharedAppendTail, applied: WalTail | None) -> WalTail:
    """Where the next record goes; call holding the append lock. The tail the last append
    stored, unless there is none in this boot or it is behind the applied tail; then past any
    complete record a writer appended before it crashed."""
    tail = appends.tail()
    if tail is None or (applied is not None and tail.next_seq < applied.next_seq):
        tail = applied if applied is not None else engine.applied_tail()
    end, _, _ = walk(engine, None, tail)
    return end


def _sync_through(engine: Engine, seq: int) -> tuple[int, bool]:
    """Step 2: make the records up to *seq* durable, sharing the sync; return the sequence
    number known durable, and whether another writer's sync covered *seq*."""
    _, shared = engine.group_locks()
    try:
        synced, covered = shared.sync_through(seq, lambda: _appended_tail(engine))
    except OSError as exc:
        where = f"fdatasync of the WAL in {engine.config.path / WAL_DIR}"
        raise engine.wal.failed(where, exc.strerror or str(exc)) from exc
    if covered:
        engine.note_contention()
    return synced, covered


def _appended_tail(engine: Engine) -> WalTail:
    appends, _ = engine.group_locks()
    with appends.locked():
        tail = appends.tail()
    return tail if tail is not None else engine.applied_tail()


def _apply_synced(
    engine: Engine, env: LmdbEnvironment, seq: int, synced: int, own: OwnRecords
) -> None:
    """Step 3: apply every synced record not applied yet (this process's *own* from
    memory), unless another writer applied record *seq* already."""
    with env.begin_write() as txn:
        applied = engine.meta.tail(txn)
        if applied.applied_seq < seq:
            applied = apply_through(engine, txn, applied, synced, own)
    engine.committed_tail = applied


# --- sealing early ------------------------------------------------------------------------------


def seal_wal(engine: Engine) -> bool:
    """Seal the WAL's open segment now if it holds a record, though it is not full: a
    replicator ships only sealed segments, and this bounds how long a record waits. Return
    whether it sealed. Taken like a write (the write lock, then the append lock), so that the
    seal goes where the next record would, and the new tail is stored with the applied one."""
    env = engine.writable()
    with env.write_mutex:
        engine.wal.check_usable()
        while (sealed := engine.growing(env, _seal_once, engine, env)) is None:
            pass  # the catch-up committed a chunk of replay first
        engine.dirty = True
    return sealed


def _seal_once(engine: Engine, env: LmdbEnvironment) -> bool | None:
    meta, wal = engine.meta, engine.wal
    appends, _ = engine.group_locks()
    with env.begin_write() as txn:
        with appends.locked():
            tail, caught_up = apply_pending(engine, txn, meta.tail(txn))
            if not caught_up:
                return None
            new_tail = wal.seal(tail, time.time_ns() // 1_000_000)
            if new_tail is not tail:
                appends.write_tail(new_tail)
        if new_tail is not tail:
            meta.write_tail(txn, new_tail)
    engine.committed_tail = new_tail
    return new_tail is not tail


# --- what the front door builds on ------------------------------------------------------------


def transition(
    engine: Engine,
    instance_id: str,
    from_state: str,
    to_state: str,
    ctx: dict[str, Any] | None,
    event_id: str | None,
    idempotency_key: str | None,
) -> Instance:
    """See :meth:`rstmdb_storage.Storage.transition`."""
    check_name("from_state", from_state)
    if idempotency_key is not None and remembered(engine, idempotency_key) is not None:
        return get_instance(engine, instance_id)  # type: ignore[return-value]
    failpoint("transition.after_key_check")
    current = get_instance(engine, instance_id)
    if current is None or current.state != from_state:
        # A retry whose first attempt committed since the key was looked up finds the state
        # moved on: the key, asked again, says it was this write, and the retry returns.
        if idempotency_key is not None and remembered(engine, idempotency_key) is not None:
            return get_instance(engine, instance_id)  # type: ignore[return-value]
        if current is None:
            raise InstanceNotFoundError(f"no instance {instance_id!r} to transition")
        raise ConflictError(
            f"instance {instance_id!r} is in state {current.state!r}, not {from_state!r}"
        )
    moved = dataclasses.replace(
        current,
        state=to_state,
        ctx=current.ctx if ctx is None else ctx,
        last_event_id=event_id if event_id is not None else current.last_event_id,
        updated_at=None,
    )
    put = PutInstance.of(
        moved, from_state, current.last_wal_offset, engine.config.max_instance_size
    )
    seq = commit(engine, [put], idempotency_key)
    stored = get_instance(engine, instance_id)
    if stored is not None and (stored.last_wal_offset == seq or idempotency_key is not None):
        return stored  # ours; or, for a retry the key absorbed, the instance as it is now
    moved.last_wal_offset = seq  # moved on since our write: ours, rebuilt locally
    return moved


class Batch:
    """Changes collected by :meth:`Storage.batch`, committed together when the block ends."""

    def __init__(self, max_instance_size: int) -> None:
        self._max_instance_size = max_instance_size
        self.changes: list[Change] = []
        #: the sequence number of the batch's WAL record, once committed
        self.seq: int | None = None

    def put_instance(
        self,
        instance: Instance,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
    ) -> None:
        """Add a put, conditional as :meth:`Storage.put_instance`; the instance is checked
        and encoded now (bad input raises here). A failed condition fails the whole batch."""
        self.changes.append(
            PutInstance.of(instance, expected_state, expected_seq, self._max_instance_size)
        )

    def delete_instance(
        self,
        instance_id: str,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
    ) -> None:
        """Add a delete; the instance must exist when the batch commits (or be put earlier in
        the batch), else the whole batch raises :class:`InstanceNotFoundError`."""
        self.changes.append(DeleteInstance.of(instance_id, expected_state, expected_seq))

    def __len__(self) -> int:
        return len(self.changes)
