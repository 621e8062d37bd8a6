"""Commands that change a store. Each opens it for writing (which replays the WAL and, when
``indexes/`` is lost or damaged, rebuilds it) and never creates one, except ``load`` and
``restore``, whose job is to make one."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

import click

from ..jsonable import from_json, instance_from_json, instance_to_json
from ..storage import Storage
from .common import (
    CONTEXT,
    EXIT_USAGE,
    Failed,
    ProgressBars,
    changing,
    data_dir_argument,
    dumps,
    json_option,
    parse_time,
    print_report,
    reports_errors,
)


def register(main: click.Group) -> None:
    for command in (
        put,
        delete,
        transition,
        load,
        snapshot,
        compact,
        backup,
        restore,
        recover,
        repair,
        hold,
        release_hold,
        rebuild_indexes,
        purge_idempotency,
    ):
        main.add_command(command)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("instance_json", required=False, metavar="[JSON]")
@click.option(
    "--file", "source", type=click.File("r"), help="read the instance from a file (- for stdin)"
)
@click.option(
    "--expected-seq", type=int, help="write only if the stored instance's last write is this"
)
@click.option("--expected-state", help="write only if the stored instance is in this state")
@click.option("--idempotency-key", help="a retry with the same key writes nothing again")
@json_option
@reports_errors
def put(
    data_dir: str,
    instance_json: str | None,
    source: IO[str] | None,
    expected_seq: int | None,
    expected_state: str | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Store one instance given as a JSON object (as `get` prints it), from the argument, a
    file, or stdin when neither is given; print the WAL sequence number of the write.

    Example: rstmdb-storage put /var/lib/rstmdb '{"id": "o-9", "machine": "order", ...}'

    \b
    More:
      rstmdb-storage put DIR '{"id": "o-9", "machine": "order", "version": 1, "state": "new"}'
      rstmdb-storage put DIR --file order.json --expected-seq 41
      echo '{"id": "o-9", ...}' | rstmdb-storage put DIR --idempotency-key req-77
    """
    if instance_json is not None and source is not None:
        raise Failed("give the instance as an argument or with --file, not both", EXIT_USAGE)
    text = instance_json if instance_json is not None else (source or sys.stdin).read()
    inst = instance_from_json(_parse_json(text, "the instance"))
    with changing(data_dir) as storage:
        seq = storage.put_instance(
            inst,
            expected_seq=expected_seq,
            expected_state=expected_state,
            idempotency_key=idempotency_key,
        )
    _done({"id": inst.id, "seq": seq}, as_json, f"put {inst.id} at sequence {seq}")


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("instance_id")
@click.option("--expected-state", help="delete only if the instance is in this state")
@click.option("--expected-seq", type=int, help="delete only if its last write is this")
@click.option("--idempotency-key", help="a retry with the same key writes nothing again")
@json_option
@reports_errors
def delete(
    data_dir: str,
    instance_id: str,
    expected_state: str | None,
    expected_seq: int | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Delete one instance (exit code 1 when absent or when a condition fails).

    Example: rstmdb-storage delete /var/lib/rstmdb order-9 --expected-state cancelled
    """
    with changing(data_dir) as storage:
        seq = storage.delete_instance(
            instance_id,
            expected_state=expected_state,
            expected_seq=expected_seq,
            idempotency_key=idempotency_key,
        )
    _done({"id": instance_id, "seq": seq}, as_json, f"deleted {instance_id} at sequence {seq}")


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("instance_id")
@click.argument("from_state")
@click.argument("to_state")
@click.option("--ctx", "ctx_json", help="a JSON object to replace the instance's ctx")
@click.option("--event-id", help="recorded as the instance's last_event_id")
@click.option("--idempotency-key", help="a retry with the same key writes nothing again")
@reports_errors
def transition(
    data_dir: str,
    instance_id: str,
    from_state: str,
    to_state: str,
    ctx_json: str | None,
    event_id: str | None,
    idempotency_key: str | None,
) -> None:
    """Move an instance from FROM_STATE to TO_STATE, atomically (exit code 1 when it is not in
    FROM_STATE); print the instance as stored.

    Example: rstmdb-storage transition /var/lib/rstmdb order-9 pending paid
    """
    ctx = None if ctx_json is None else from_json(_parse_json(ctx_json, "--ctx"))
    with changing(data_dir) as storage:
        inst = storage.transition(
            instance_id,
            from_state,
            to_state,
            ctx=ctx,
            event_id=event_id,
            idempotency_key=idempotency_key,
        )
    click.echo(dumps(instance_to_json(inst), indent=2))


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("source", type=click.File("r"), default="-")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@json_option
@reports_errors
def load(data_dir: str, source: IO[str], batch_size: int, as_json: bool) -> None:
    """Read JSON lines (as `dump` writes them, or bare instance objects) into a store, created
    when DATA_DIR holds none; instances go in batches, each one WAL record, all or nothing.

    Example: rstmdb-storage load /var/lib/rstmdb-new rstmdb.jsonl
    """
    counts = {"instances": 0, "machines": 0}
    with changing(data_dir, create=True) as storage, ProgressBars() as bars:
        pending: list[Any] = []
        for line_number, document in _json_lines(source):
            if document.pop("kind", "instance") == "machine":
                _load_machine(storage, document, line_number)
                counts["machines"] += 1
                continue
            try:
                pending.append(instance_from_json(document))
            except (ValueError, TypeError) as exc:
                raise Failed(f"{source.name}:{line_number}: {exc}", EXIT_USAGE) from exc
            if len(pending) == batch_size:
                counts["instances"] += _put_all(storage, pending)
                bars("instances", counts["instances"], 0)
        counts["instances"] += _put_all(storage, pending)
    sentence = f"loaded {counts['instances']} instance(s), {counts['machines']} machine(s)"
    _done(counts, as_json, sentence)


def _json_lines(source: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(source, 1):
        if not line.strip():
            continue
        document = _parse_json(line, f"{source.name}:{line_number}")
        if not isinstance(document, dict):
            raise Failed(f"{source.name}:{line_number}: expected a JSON object", EXIT_USAGE)
        yield line_number, document


def _load_machine(storage: Storage, document: dict[str, Any], line_number: int) -> None:
    if set(document) != {"name", "version", "definition"}:
        raise Failed(f"line {line_number}: a machine has name, version, definition", EXIT_USAGE)
    storage.put_machine(document["name"], document["version"], from_json(document["definition"]))


def _put_all(storage: Storage, instances: list[Any]) -> int:
    if instances:
        with storage.batch() as batch:
            for inst in instances:
                batch.put_instance(inst)
    done = len(instances)
    instances.clear()
    return done


@click.command(context_settings=CONTEXT)
@data_dir_argument
@reports_errors
def snapshot(data_dir: str) -> None:
    """Take a snapshot now and print its manifest as JSON.

    Example: rstmdb-storage snapshot /var/lib/rstmdb
    """
    with changing(data_dir) as storage, ProgressBars() as bars:
        manifest = storage.create_snapshot(bars)
    click.echo(dumps(_manifest_json(manifest), indent=2))


def _manifest_json(manifest: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(manifest), "store_id": manifest.store_id.hex()}


@click.command(context_settings=CONTEXT)
@data_dir_argument
@reports_errors
def compact(data_dir: str) -> None:
    """Snapshot if anything changed, then delete the snapshots and WAL segments no longer
    needed; print what was done as JSON.

    Example: rstmdb-storage compact /var/lib/rstmdb
    """
    with changing(data_dir) as storage, ProgressBars() as bars:
        result = storage.compact(bars)
    click.echo(dumps(dataclasses.asdict(result), indent=2))


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("target", type=click.Path())
@json_option
@reports_errors
def backup(data_dir: str, target: str, as_json: bool) -> None:
    """Copy the store into TARGET (new or empty) while it stays in use: a snapshot taken now
    and the WAL after it. Restore from TARGET, or open it, to use the copy.

    Example: rstmdb-storage backup /var/lib/rstmdb /backups/rstmdb-2026-11-25
    """
    with changing(data_dir) as storage, ProgressBars() as bars:
        seq = storage.backup(target, progress=bars)
    _done(
        {"target": target, "seq": seq},
        as_json,
        f"backed up {data_dir} to {target} at sequence {seq}",
    )


@click.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.option("--seq", type=click.IntRange(min=0), help="the WAL sequence to restore to [newest]")
@click.option("--time", "at_time", metavar="TIME", help="the state as of TIME (ms or ISO 8601)")
@json_option
@reports_errors
def restore(source: str, target: str, seq: int | None, at_time: str | None, as_json: bool) -> None:
    """Build in TARGET (new or empty) a store holding SOURCE's state at a WAL sequence number
    or a time: point-in-time restore from a snapshot and the WAL after it. SOURCE may be a
    live store or a backup; it is only read. It may also be the bucket a store ships to
    (s3://BUCKET/PREFIX: disaster recovery onto an empty disk).

    Example: rstmdb-storage restore /var/lib/rstmdb /tmp/restored --time 2026-11-25T14:30:00Z
    """
    if seq is not None and at_time is not None:
        raise Failed("give --seq or --time, not both", EXIT_USAGE)
    until_ms = None if at_time is None else parse_time(at_time)
    with ProgressBars() as bars:
        restored = Storage.restore(source, target, seq=seq, until_ms=until_ms, progress=bars)
    _done({"target": target, "seq": restored}, as_json, f"restored {target} to sequence {restored}")


@click.command(context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def recover(data_dir: str, as_json: bool) -> None:
    """Open the store for writing once and close it: replay the WAL records LMDB has not
    applied, and rebuild a lost or damaged indexes/ from the newest good snapshot and the WAL
    (a damaged data.mdb is moved aside, never deleted). Run it when an inspection says the
    store needs recovery.

    Example: rstmdb-storage recover /var/lib/rstmdb
    """
    with changing(data_dir) as storage:
        report = {
            "data_dir": data_dir,
            "applied_seq": storage.applied_seq,
            "instances": storage.count_instances(),
            "torn_tails_cut": [str(repair.path) for repair in storage.torn_tail_repairs],
        }
    print_report(report, as_json)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def repair(data_dir: str, as_json: bool) -> None:
    """After a power loss, cut the WAL at a torn record that opening refuses because intact
    (never acknowledged) records follow it; the segment is copied aside first. The store must
    be closed.

    Example: rstmdb-storage repair /var/lib/rstmdb
    """
    done = Storage.repair_wal(data_dir)
    if done is None:
        _done({"repaired": None}, as_json, "nothing to repair")
    else:
        report = dataclasses.asdict(done)
        sentence = (
            f"cut {done.bytes_cut} bytes of {done.path} from offset {done.offset} "
            f"({done.reason}); the original is kept as {done.copy_path}"
        )
        _done({"repaired": report}, as_json, sentence)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("name")
@click.option("--from-seq", type=click.IntRange(min=1), help="first sequence kept [the next one]")
@json_option
@reports_errors
def hold(data_dir: str, name: str, from_seq: int | None, as_json: bool) -> None:
    """Take the WAL hold NAME: compaction keeps every WAL record from its sequence number on
    (the next record, by default) until `release-hold`, e.g. while copy tools run.

    Example: rstmdb-storage hold /var/lib/rstmdb nightly-backup
    """
    with changing(data_dir) as storage:
        seq = storage.applied_seq + 1 if from_seq is None else from_seq
        storage.hold_wal(name, seq)
    _done(
        {"hold": name, "from_seq": seq}, as_json, f"holding the WAL from sequence {seq} as {name!r}"
    )


@click.command("release-hold", context_settings=CONTEXT)
@data_dir_argument
@click.argument("name")
@json_option
@reports_errors
def release_hold(data_dir: str, name: str, as_json: bool) -> None:
    """Release the WAL hold NAME, so that compaction may delete what only it kept (exit code
    1 when there is no such hold).

    Example: rstmdb-storage release-hold /var/lib/rstmdb nightly-backup
    """
    with changing(data_dir) as storage:
        released = storage.release_wal(name)
    if not released:
        raise Failed(f"no WAL hold named {name!r} in {data_dir}")
    _done({"released": name}, as_json, f"released the WAL hold {name!r}")


@click.command("rebuild-indexes", context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def rebuild_indexes(data_dir: str, as_json: bool) -> None:
    """Drop the state, metadata and time indexes and rebuild them from the instances (when
    `verify` finds an index that disagrees with them).

    Example: rstmdb-storage rebuild-indexes /var/lib/rstmdb
    """
    with changing(data_dir) as storage:
        indexed = storage.rebuild_indexes()
    _done({"indexed": indexed}, as_json, f"indexed {indexed} instance(s)")


@click.command("purge-idempotency", context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def purge_idempotency(data_dir: str, as_json: bool) -> None:
    """Delete the idempotency keys whose retention has passed (they already count as absent;
    this reclaims their space).

    Example: rstmdb-storage purge-idempotency /var/lib/rstmdb
    """
    with changing(data_dir) as storage:
        purged = storage.purge_idempotency_keys()
    _done({"purged": purged}, as_json, f"purged {purged} expired idempotency key(s)")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Failed(f"{what}: not JSON ({exc})", EXIT_USAGE) from exc


def _done(report: dict[str, Any], as_json: bool, sentence: str) -> None:
    if as_json:
        print_report(report, True)
    else:
        click.echo(sentence)
