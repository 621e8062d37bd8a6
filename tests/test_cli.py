"""The operator's commands: each documented, each one Storage call, errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rstmdb_storage import Instance, Storage
from rstmdb_storage.cli import main


@pytest.fixture
def filled(data_dir: Path) -> Path:
    with Storage.open(data_dir) as storage:
        storage.put_instance(Instance(id="order-1", machine="order", version=1, state="paid"))
        storage.put_instance(Instance(id="order-2", machine="order", version=1, state="new"))
    return data_dir


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def run_json(*args: str) -> tuple[int, object]:
    """Run a command that prints JSON on stdout (progress goes to stderr)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_with_an_example(name: str) -> None:
    help_text = main.commands[name].help or ""
    assert len(help_text.splitlines()[0]) > 10, f"{name} has no help"
    assert "Example: rstmdb-storage " + name in help_text


def test_info_reports_counts(filled: Path) -> None:
    code, output = run("info", str(filled))
    assert code == 0
    report = json.loads(output)
    assert (report["instances"], report["applied_seq"], report["wal_segments"]) == (2, 2, [1])
    assert (report["snapshots"], report["wal_holds"]) == ([], {})


def test_snapshot_compact_and_restore(filled: Path, tmp_path: Path) -> None:
    code, manifest = run_json("snapshot", str(filled))
    assert code == 0 and manifest["seq"] == 2
    with Storage.open(filled) as storage:
        storage.put_instance(Instance(id="order-3", machine="order", version=1, state="new"))
    code, result = run_json("compact", str(filled))
    assert code == 0 and result["snapshots_created"] == 1
    code, output = run("restore", str(filled), str(tmp_path / "back"), "--seq", "2")
    assert code == 0 and "to sequence 2" in output
    with Storage.open(tmp_path / "back") as restored:
        assert [inst.id for inst in restored.iter_instances()] == ["order-1", "order-2"]
    code, output = run("restore", str(filled), str(tmp_path / "back"))
    assert code == 1 and "not empty" in output


def test_get_prints_the_instance_and_fails_when_absent(filled: Path) -> None:
    code, output = run("get", str(filled), "order-1")
    assert code == 0 and json.loads(output)["state"] == "paid"
    code, output = run("get", str(filled), "order-9")
    assert code == 1 and "no instance 'order-9'" in output


def test_wal_lists_records(filled: Path) -> None:
    code, output = run("wal", str(filled), "--from", "2")
    assert code == 0
    assert [line.split("\t")[0] for line in output.splitlines()] == ["2"]


def test_verify_passes_on_a_clean_store_and_reports_damage(filled: Path) -> None:
    code, output = run("verify", str(filled))
    assert code == 0 and "0 problem(s)" in output
    segment = filled / "wal" / "00000000000000000001.wal"
    data = bytearray(segment.read_bytes())
    data[48 + 40] ^= 0xFF  # inside the payload of record 1, which record 2 follows
    segment.write_bytes(bytes(data))
    code, output = run("verify", str(filled))
    assert code == 1
    assert "error: CorruptionError" in output or "1 problem(s)" in output
    assert "00000000000000000001.wal" in output and "offset 48" in output


def test_repair_with_nothing_to_repair(filled: Path) -> None:
    code, output = run("repair", str(filled))
    assert code == 0 and "nothing to repair" in output


def test_backup_then_open_the_copy(filled: Path, tmp_path: Path) -> None:
    code, output = run("backup", str(filled), str(tmp_path / "copy"))
    assert code == 0 and "up to sequence 2" in output
    with Storage.open(tmp_path / "copy") as copy:
        assert [inst.id for inst in copy.iter_instances()] == ["order-1", "order-2"]
