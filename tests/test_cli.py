"""The operator's commands, through click's runner: each documented with an example, each
doing what it says, with output scripts can parse and errors as one line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rstmdb_storage import Instance, Storage
from rstmdb_storage.cli import main


@pytest.fixture
def filled(data_dir: Path) -> Path:
    with Storage.open(data_dir) as storage:
        storage.put_instance(
            Instance(
                id="order-1",
                machine="order",
                version=1,
                state="paid",
                ctx={"raw": b"\x00\x01", "limit": float("inf")},
                metadata={"customer": "alice", "priority": 5},
            )
        )
        storage.put_instance(
            Instance(
                id="order-2",
                machine="order",
                version=1,
                state="new",
                metadata={"customer": "bob", "priority": 7},
            )
        )
    return data_dir


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> tuple[int, object]:
    code, out, _ = run(*args)
    return code, json.loads(out)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_with_an_example(name: str) -> None:
    for flag in ("--help", "-h"):
        code, out, _ = run(name, flag)
        assert code == 0
        assert "Example: rstmdb-storage " + name in out, f"{name} {flag} shows no example"


def test_info_reports_counts(filled: Path) -> None:
    code, report = run_json("info", str(filled), "--json")
    assert code == 0
    assert (report["instances"], report["applied_seq"], report["wal_segments"]) == (2, 2, [1])
    assert (report["snapshots"], report["wal_holds"], report["needs_recovery"]) == ([], {}, None)
    code, out, _ = run("info", str(filled))
    assert code == 0 and "instances: 2" in out.splitlines()


def test_get_prints_strict_json_and_fails_when_absent(filled: Path) -> None:
    code, out, _ = run("get", str(filled), "order-1")
    assert code == 0 and "Infinity" not in out
    inst = json.loads(out)
    assert inst["state"] == "paid"
    assert inst["ctx"] == {"raw": {"$base64": "AAE="}, "limit": {"$float": "inf"}}
    code, out, err = run("get", str(filled), "order-9")
    assert (code, out) == (1, "")
    assert err == f"error: no instance 'order-9' in {filled}\n"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (["--state", "order:new"], ["order-2"]),
        (["--meta", "customer=alice"], ["order-1"]),
        (["--meta", "priority=7"], ["order-2"]),
        (["--meta", 'priority="7"'], []),  # the string "7" is another label than the int 7
        (["--meta", "priority", "--from", "5", "--to", "7"], ["order-1"]),
        (["--meta", "priority", "--from", "6"], ["order-2"]),
        (["--since", "0"], ["order-1", "order-2"]),
        (["--since", "1970-01-01T00:00:00Z", "--newest-first"], ["order-2", "order-1"]),
        (["--until", "1970-01-02"], []),
    ],
)
def test_list_by_state_metadata_and_time(filled: Path, query: list[str], expected: list[str]):
    code, out, _ = run("list", str(filled), *query, "--format", "jsonl")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == expected


def test_list_pages_with_a_cursor(filled: Path) -> None:
    code, out, err = run("list", str(filled), "--since", "0", "--limit", "1", "--format", "jsonl")
    assert code == 0 and json.loads(out)["id"] == "order-1"
    prefix = "next page: --cursor "
    assert err.startswith(prefix)
    cursor = err[len(prefix) :].strip()
    code, out, err = run("list", str(filled), "--since", "0", "--limit", "1", "--cursor", cursor)
    assert code == 0 and json.loads(out)["id"] == "order-2" and err == ""
    code, document = run_json(
        "list", str(filled), "--since", "0", "--limit", "1", "--format", "json"
    )
    assert [i["id"] for i in document["items"]] == ["order-1"] and document["next_cursor"] == cursor


def test_list_formats_csv_and_table(filled: Path) -> None:
    code, out, _ = run("list", str(filled), "--state", "order:paid", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["id"], r["state"], r["version"]) for r in rows] == [
        ("order-1", "paid", "1")
    ]
    code, out, _ = run("list", str(filled), "--state", "order:paid", "--format", "table")
    header, rule, row = out.splitlines()
    assert header.split() == ["id", "machine", "version", "state", "status", "updated_at"]
    assert set(rule.replace(" ", "")) == {"-"} and row.split()[:4] == [
        "order-1",
        "order",
        "1",
        "paid",
    ]


@pytest.mark.parametrize(
    "query",
    [
        [],
        ["--state", "order:new", "--meta", "customer=bob"],
        ["--state", "no-colon"],
        ["--meta", "customer"],
        ["--meta", "customer=bob", "--from", "a"],
        ["--state", "order:new", "--newest-first"],
        ["--since", "yesterday"],
    ],
)
def test_list_refuses_unclear_queries(filled: Path, query: list[str]) -> None:
    code, out, err = run("list", str(filled), *query)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1


def test_put_delete_and_transition(filled: Path, tmp_path: Path) -> None:
    new = {"id": "order-3", "machine": "order", "version": 1, "state": "new"}
    code, report = run_json("put", str(filled), json.dumps(new), "--json")
    assert code == 0 and report == {"id": "order-3", "seq": 3}
    code, out, err = run("put", str(filled), "--expected-seq", "2", input=json.dumps(new))
    assert code == 1 and "error: " in err
    source = tmp_path / "order.json"
    source.write_text(json.dumps({**new, "ctx": {"raw": {"$base64": "AAE="}}}))
    code, out, _ = run("put", str(filled), "--file", str(source), "--idempotency-key", "k1")
    assert code == 0 and out == "put order-3 at sequence 4\n"
    code, out, _ = run("put", str(filled), "--file", str(source), "--idempotency-key", "k1")
    assert code == 0 and out == "put order-3 at sequence 4\n"  # the retry wrote nothing
    code, inst = run_json("transition", str(filled), "order-3", "new", "paid")
    assert code == 0 and inst["state"] == "paid" and inst["ctx"] == {"raw": {"$base64": "AAE="}}
    code, _, err = run("transition", str(filled), "order-3", "new", "paid")
    assert code == 1 and "not 'new'" in err
    code, _, err = run("delete", str(filled), "order-3", "--expected-state", "new")
    assert code == 1 and err.startswith("error: ")
    code, out, _ = run("delete", str(filled), "order-3", "--expected-state", "paid")
    assert code == 0 and out == "deleted order-3 at sequence 6\n"
    with Storage.open(filled) as storage:
        assert storage.get_instance("order-3") is None and storage.applied_seq == 6


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[1]",
        '{"id": "x"}',
        '{"id": "x", "machine": "m", "version": 1, "state": "s", "colour": 1}',
    ],
)
def test_put_refuses_bad_input_and_writes_nothing(filled: Path, document: str) -> None:
    code, out, err = run("put", str(filled), document)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    with Storage.open(filled) as storage:
        assert storage.applied_seq == 2


def test_dump_then_load_gives_equal_instances(filled: Path, tmp_path: Path) -> None:
    with Storage.open(filled) as storage:
        storage.put_machine("order", 1, {"states": ["new", "paid"]})
        originals = list(storage.iter_instances())
    code, dumped, _ = run("dump", str(filled))
    lines = [json.loads(line) for line in dumped.splitlines()]
    assert code == 0 and [line["kind"] for line in lines] == ["machine", "instance", "instance"]
    target = tmp_path / "copy"
    code, out, _ = run("load", str(target), "--batch-size", "1", input=dumped)
    assert code == 0 and out == "loaded 2 instance(s), 1 machine(s)\n"
    with Storage.open(target) as copy:
        loaded = list(copy.iter_instances())
        assert copy.get_machine("order", 1).definition == {"states": ["new", "paid"]}
    strip = lambda inst: (inst.id, inst.state, inst.ctx, inst.metadata, inst.created_at)  # noqa: E731
    assert list(map(strip, loaded)) == list(map(strip, originals))


def test_load_refuses_a_bad_line_and_names_it(filled: Path) -> None:
    code, _, err = run(
        "load", str(filled), input='{"id": "a", "machine": "m", "version": 1, "state": "s"}\n[]\n'
    )
    assert code == 2 and ":2: expected a JSON object" in err
    with Storage.open(filled) as storage:
        assert storage.count_instances() == 2  # nothing of an unfinished batch was written


def test_wal_lists_records_with_their_changes(filled: Path) -> None:
    code, out, _ = run("wal", str(filled), "--from", "2")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["seq"] for r in records] == [2]
    assert records[0]["changes"] == [{"op": "put", "id": "order-2"}]
    code, out, _ = run("wal", str(filled), "--limit", "1", "--format", "csv")
    assert code == 0 and out.splitlines()[0] == "seq,timestamp_ms,bytes,changes"


def test_snapshots_stats_machines_and_holds(filled: Path) -> None:
    code, manifest = run_json("snapshot", str(filled))
    assert code == 0 and manifest["seq"] == 2
    code, rows = run_json("snapshots", str(filled), "--format", "json")
    assert code == 0 and [(r["seq"], r["instances"], r["crc_status"]) for r in rows] == [
        (2, 2, "ok")
    ]
    (filled / "snapshots" / f"{2:020d}.mdb").write_bytes(b"damaged")
    code, out, _ = run("snapshots", str(filled), "--format", "jsonl")
    assert code == 1 and json.loads(out)["crc_status"].startswith("bad: ")
    code, stats = run_json("stats", str(filled), "--json")
    assert code == 0 and stats["tables"]["instances"]["entries"] == 2
    assert stats["map_used"] <= stats["map_size"] and stats["readers"]["stale"] == 0
    assert stats["wal"]["segments"] == 1 and stats["snapshots"]["count"] == 1
    with Storage.open(filled) as storage:
        storage.put_machine("order", 1, {"states": []})
        storage.put_machine("order", 2, {"states": ["new"]})
        storage.put_machine("refund", 1, {})
        storage.hold_wal("nightly", 2)
    code, rows = run_json("machines", str(filled), "order", "--format", "json")
    assert code == 0 and [(r["name"], r["version"]) for r in rows] == [("order", 1), ("order", 2)]
    code, rows = run_json("holds", str(filled), "--format", "json")
    assert code == 0 and rows == [{"name": "nightly", "from_seq": 2}]
    code, report = run_json("hold", str(filled), "copying", "--json")
    assert code == 0 and report == {"hold": "copying", "from_seq": 6}  # the next record on
    code, rows = run_json("holds", str(filled), "--format", "json")
    assert code == 0 and rows == [
        {"name": "copying", "from_seq": 6},
        {"name": "nightly", "from_seq": 2},
    ]
    code, out, _ = run("release-hold", str(filled), "nightly")
    assert code == 0 and "released" in out
    code, _, err = run("release-hold", str(filled), "nightly")
    assert code == 1 and "no WAL hold named 'nightly'" in err


def test_rebuild_indexes_and_purge_idempotency(filled: Path) -> None:
    code, out, _ = run("rebuild-indexes", str(filled))
    assert code == 0 and out == "indexed 2 instance(s)\n"
    code, out, _ = run("purge-idempotency", str(filled))
    assert code == 0 and out == "purged 0 expired idempotency key(s)\n"


def test_snapshot_compact_and_restore(filled: Path, tmp_path: Path) -> None:
    code, manifest = run_json("snapshot", str(filled))
    assert code == 0 and manifest["seq"] == 2
    with Storage.open(filled) as storage:
        storage.put_instance(Instance(id="order-3", machine="order", version=1, state="new"))
    code, result = run_json("compact", str(filled))
    assert code == 0 and result["snapshots_created"] == 1
    code, out, _ = run("restore", str(filled), str(tmp_path / "back"), "--seq", "2")
    assert code == 0 and "to sequence 2" in out
    with Storage.open(tmp_path / "back") as restored:
        assert [inst.id for inst in restored.iter_instances()] == ["order-1", "order-2"]
    code, _, err = run("restore", str(filled), str(tmp_path / "back"))
    assert code == 2 and "restore target" in err and "not empty" in err


def test_restore_to_a_time(filled: Path, tmp_path: Path) -> None:
    with Storage.open(filled) as storage:
        stamps = [record.timestamp_ms for record in storage.read_wal()]
        storage.put_instance(Instance(id="order-3", machine="order", version=1, state="new"))
        third = max(record.timestamp_ms for record in storage.read_wal(3))
    if third == stamps[-1]:
        pytest.fail("the clock did not move between two writes; cannot tell them apart by time")
    code, report = run_json(
        "restore", str(filled), str(tmp_path / "t"), "--time", str(stamps[-1]), "--json"
    )
    assert code == 0 and report["seq"] == 2
    code, _, err = run("restore", str(filled), str(tmp_path / "u"), "--time", "1", "--seq", "2")
    assert code == 2 and "not both" in err


def test_backup_then_open_the_copy(filled: Path, tmp_path: Path) -> None:
    code, out, _ = run("backup", str(filled), str(tmp_path / "copy"))
    assert code == 0 and out.endswith("at sequence 2\n")
    with Storage.open(tmp_path / "copy") as copy:
        assert [inst.id for inst in copy.iter_instances()] == ["order-1", "order-2"]
    code, _, err = run("backup", str(filled), str(tmp_path / "copy"))
    assert code == 2 and "backup target" in err and "restore target" not in err


def test_verify_passes_on_a_clean_store_and_reports_damage(filled: Path) -> None:
    code, out, _ = run("verify", str(filled))
    assert code == 0 and out == "0 problem(s) found\n"
    segment = filled / "wal" / "00000000000000000001.wal"
    data = bytearray(segment.read_bytes())
    data[48 + 40] ^= 0xFF  # inside the payload of record 1, which record 2 follows
    segment.write_bytes(bytes(data))
    code, report = run_json("verify", str(filled), "--json")
    assert code == 1 and len(report["problems"]) == 1
    problem = report["problems"][0]
    assert problem["where"].endswith("00000000000000000001.wal at offset 48")
    assert problem["where"] not in problem["problem"]  # where once, not twice


def test_repair_with_nothing_to_repair(filled: Path) -> None:
    code, out, _ = run("repair", str(filled))
    assert code == 0 and "nothing to repair" in out


def test_verify_names_a_damaged_instance_once(data_dir: Path) -> None:
    with Storage.open(data_dir) as storage:
        storage.put_instance(
            Instance(
                id="order-1",
                machine="order",
                version=1,
                state="new",
                ctx={"note": "a text to find in data.mdb"},
            )
        )
    data_file = data_dir / "indexes" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    at = data.index(b"a text to find")
    assert data.find(b"a text to find", at + 1) == -1  # one copy: the instance's value
    data[at] ^= 0x01
    data_file.write_bytes(bytes(data))
    code, out, _ = run("verify", str(data_dir))
    assert code == 1
    line = out.splitlines()[0]
    assert line.startswith("instances[b'order-1']: ") and line.count("order-1") == 1
    code, out, err = run("get", str(data_dir), "order-1")
    assert code == 1 and out == "" and err.count("order-1") == 1 and "CRC32C" in err
