"""Simulated power loss: crash states built from what one recorded run synced.

The workload (``tests/powerloss/workload.py``) runs once from an empty data directory under
the recording shim (``tests/powerloss/recording_io.c``, built here with gcc), which logs every
write, sync and change of names under the directory, and the workload's acknowledgments, in
order. ``tests/powerloss/crash_states.py`` builds from the log what a power cut after any
operation could have left (unsynced writes dropped, reordered and torn, unsynced names lost);
``tests/powerloss/trials.py`` opens the store on each in a child process as the first process
after the reboot, and checks the promise under the default fsync policy: it reopens without
help, with every acknowledged write, ``verify() == []``, no signal, no untyped error.

The short form here tries :data:`CI_STATES` crash states (every sync point that is not the
WAL's per-write sync, then acknowledgments, WAL syncs and random cuts, several seeds and modes
each), chosen with a seed it prints (``RSTMDB_POWERLOSS_SEED`` replays one; the recording's
timing still varies from run to run); ``scripts/powerloss.py --states N`` is the long form.

Crash states that meet the condition of a finding already reported (``trials.KNOWN``) are
counted and printed, not failed; each such finding is pinned by a deterministic crash state
below, marked ``xfail(strict=True)``, which passes (and so fails the suite) once the store is
fixed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from powerloss import crash_states, trials
from powerloss.crash_states import HEADER, Recording, Request

from rstmdb_storage import (
    CorruptionError,
    FsyncPolicy,
    Instance,
    RecoveryNeededError,
    Storage,
    StorageConfig,
)
from rstmdb_storage import engine as engine_module
from rstmdb_storage.wal.decoder import FramedRecord, decode_record
from rstmdb_storage.wal.format import SEGMENT_HEADER_SIZE

#: crash states the short form tries (about 30 s on two cores)
CI_STATES = 300
WORKERS = 2
WORKLOAD_WRITES = 240


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recording shim, compiled (a missing gcc fails here, saying so)."""
    return trials.build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="session")
def recording(tmp_path_factory: pytest.TempPathFactory, shim: Path) -> Path:
    """One run of the workload from an empty data directory, recorded."""
    directory = tmp_path_factory.mktemp("powerloss") / "recording"
    return trials.record(directory, shim, seed=20261202, ops=WORKLOAD_WRITES)


# --- the model, on a log written by hand --------------------------------------------------------


def _op(kind: str, path: str = "", path2: str = "", data: bytes = b"", **fields: int) -> bytes:
    p, p2 = path.encode(), path2.encode()
    size = HEADER.size + len(p) + len(p2) + len(data)
    values = {"pid": 1, "fd": 3, "flags": 0, "ino": 0, "off": 0, "length": len(data), **fields}
    header = HEADER.pack(
        size,
        ord(kind),
        values["pid"],
        values["fd"],
        values["flags"],
        values["ino"],
        values["off"],
        values["length"],
        len(p),
        len(p2),
        len(data),
    )
    return header + p + p2 + data


def _hand_written(directory: Path) -> Recording:
    """``dir/f``: 6000 bytes synced, then three unsynced writes (over pages 0-1, inside page
    0, on page 2); ``dir/g`` created, written and renamed to ``dir/h``, nothing synced."""
    directory.mkdir()
    log = [
        _op("M", "/p/dir", ino=10),
        _op("S", "/p", flags=1),  # the mkdir is durable
        _op("C", "/p/dir/f", ino=11, flags=1),
        _op("W", "/p/dir/f", data=b"A" * 6000, ino=11),
        _op("S", "/p/dir/f", ino=11, flags=2),
        _op("S", "/p/dir", flags=1),  # and the creation of f
        _op("W", "/p/dir/f", data=b"B" * 5000, ino=11, off=1000),
        _op("W", "/p/dir/f", data=b"C" * 200, ino=11, off=3000),
        _op("W", "/p/dir/f", data=b"D" * 100, ino=11, off=8192),
        _op("C", "/p/dir/g", ino=12, flags=1),
        _op("W", "/p/dir/g", data=b"hello", ino=12),
        _op("R", "/p/dir/g", "/p/dir/h", ino=12),
    ]
    (directory / "record.log").write_bytes(b"".join(log))
    meta = {"prefix": "/p", "policy": "every_write", "seed": 0, "ops": 0}
    (directory / "recording.json").write_text(json.dumps(meta))
    return Recording(directory)


def test_the_model_keeps_what_was_synced_and_tears_the_rest_page_by_page(tmp_path: Path) -> None:
    rec = _hand_written(tmp_path / "recording")
    end = len(rec.ops)
    synced = b"A" * 6000
    after_b = b"A" * 1000 + b"B" * 5000
    after_c = after_b[:3000] + b"C" * 200 + after_b[3200:]
    pages0 = {synced[:4096], after_b[:4096], after_c[:4096]}  # page 0, in page order
    pages1 = {synced[4096:], after_b[4096:]}

    strict = crash_states.crash_state(rec, end, 0, "synced")
    assert strict.files == {"dir/f": synced} and strict.dirs == {"", "dir"}
    everything = crash_states.crash_state(rec, end, 0, "all")
    assert everything.files == {
        "dir/f": after_c + bytes(8192 - 6000) + b"D" * 100,
        "dir/h": b"hello",
    }
    seen: dict[str, set[object]] = {"page0": set(), "page1": set(), "size": set(), "g/h": set()}
    for seed in range(300):
        state = crash_states.crash_state(rec, end, seed, "random")
        f = state.files["dir/f"]
        assert f[:4096] in pages0, "page 0 holds a later write without an earlier one"
        assert f[4096:6000] in pages1
        assert len(f) in (6000, 8292)
        if len(f) == 8292:
            assert f[6000:8192] == bytes(2192) and f[8192:] == b"D" * 100
        names = {path for path in state.files if path != "dir/f"}
        assert names in ({"dir/g"}, {"dir/h"}, set()), "a rename is atomic"
        assert all(state.files[name] in (b"", b"hello") for name in names)
        seen["page0"].add(f[:4096])
        seen["page1"].add(f[4096:6000])
        seen["size"].add(len(f))
        seen["g/h"].add(frozenset(names))
    assert seen["page0"] == pages0 and seen["page1"] == pages1, "every tear is tried"
    assert seen["size"] == {6000, 8292}
    assert len(seen["g/h"]) == 3


def test_the_recording_replays_to_what_the_run_left_on_disk(recording: Path) -> None:
    """Everything recorded, all kept, is byte for byte the directory the run left: the shim
    saw every write, and the replay puts each where it went."""
    rec = Recording(recording)
    data = recording / "data"
    on_disk = {
        str(path.relative_to(data)): path.read_bytes()
        for path in data.rglob("*")
        if path.is_file() and path.name != "lock.mdb"
    }
    everything = crash_states.crash_state(rec, len(rec.ops), 0, "all")
    assert sorted(everything.files) == sorted(on_disk)
    assert everything.files == on_disk
    assert everything.dirs == {"", "wal", "snapshots", "indexes"}
    # The run did what the crash states are meant to cover.
    labels = [op.label() for op in rec.ops]
    assert len(rec.writes) == WORKLOAD_WRITES and all(w.seq for w in rec.writes)
    assert sum(" unlink wal/" in label for label in labels) >= 2, "compaction deleted segments"
    assert sum(" rename wal/" in label and label.endswith(".wal") for label in labels) >= 4
    assert sum(".manifest.tmp" in label and " rename " in label for label in labels) >= 3
    assert sum(label.endswith("fdatasync indexes/data.mdb") for label in labels) >= 4


# --- the promise, over many crash states ---------------------------------------------------------


def test_every_crash_state_keeps_the_promise(
    recording: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: pytest.RecordProperty,
) -> None:
    rec = Recording(recording)
    seed = int(os.environ.get("RSTMDB_POWERLOSS_SEED") or random.SystemRandom().randrange(1 << 31))
    requests = crash_states.plan(rec, CI_STATES, seed)
    results = trials.run_states(recording, requests, tmp_path / "states", WORKERS)
    figures = trials.tally(results)
    broken = list(trials.findings(results))
    new = [result for result in broken if result["known"] is None]
    record_property("crash_states_tried", figures["states tried"])
    with capsys.disabled():
        print(
            f"\npower loss: {figures['states tried']} crash states tried (seed {seed}, "
            f"recording {recording}): "
            + ", ".join(f"{name} {value}" for name, value in list(figures.items())[1:])
        )
        for result in broken:
            print(
                f"  {result['known'] or 'NEW'}: k={result['k']} seed={result['seed']} "
                f"mode={result['mode']} {result['outcome']}: {result['problems'][0][:160]!r}"
            )
    assert figures["states tried"] == len(requests) == CI_STATES
    assert figures["harness errors"] == 0, [r["problems"] for r in results if r["problems"]]
    assert figures["acked writes checked"] > CI_STATES * 50  # most cuts come after many acks
    assert not new, "\n\n".join(trials.report(result, recording) for result in new)


# --- the findings reported, each pinned by one deterministic crash state -------------------------


def _check(recording: Path, request: Request, tmp_path: Path) -> dict:
    """Try one crash state (in a child of a server process, never of pytest)."""
    (result,) = trials.run_states(recording, [request], tmp_path, workers=1)
    assert result["outcome"] != "harness error", result["problems"]
    return result


def _index(rec: Recording, label_end: str, after: int = 0) -> int:
    return next(op.index for op in rec.ops[after:] if op.label().endswith(label_end))


def test_a_power_cut_before_the_first_flush_record_reopens(recording: Path, tmp_path: Path) -> None:
    """Cut right before the first checkpoint flushes data.mdb (indexes/flushed has never been
    written): of what LMDB committed since it created the file, only its meta pages reached
    the disk. Opening maps data.mdb and dies of SIGBUS: the meta page names pages past the
    end of the file."""
    rec = Recording(recording)
    first_ack = rec.writes[0].ack_index
    assert first_ack is not None
    k = _index(rec, "fdatasync indexes/data.mdb", after=first_ack)
    result = _check(recording, Request(k, 0, "lmdb-meta-only", "first flush"), tmp_path)
    assert result["problems"] == [], trials.report(result, recording)
    assert not result["lmdb_trusted"], "a data.mdb never flushed before the reboot was opened"


def test_a_power_cut_while_the_store_is_created_reopens(recording: Path, tmp_path: Path) -> None:
    """Cut right before LMDB's new file is first synced, when no WAL segment exists yet: the
    pages reached the disk but its meta pages did not. Nothing was ever acknowledged, but
    every open refuses ("cannot be rebuilt"), and repair does nothing."""
    rec = Recording(recording)
    k = _index(rec, "fdatasync indexes/data.mdb")
    result = _check(recording, Request(k, 0, "lmdb-meta-lost", "creation"), tmp_path)
    assert result["acked"] == 0
    assert result["problems"] == [], trials.report(result, recording)


def test_a_power_cut_after_housekeeping_commits_does_not_trust_data_mdb(
    recording: Path, tmp_path: Path
) -> None:
    """Cut right after the workload's checkpoint, snapshot, hold, release and compaction:
    LMDB commits the snapshot's listing, the hold and the unlisting with no WAL record, and
    no WAL record follows the flush. Here every write reached the disk, so trusting data.mdb
    does no harm; with the unsynced pages torn it does (MDB_CORRUPTED on the next write, in
    the long form), and opening cannot tell the two apart: it must not trust a data.mdb LMDB
    wrote after its last flush."""
    rec = Recording(recording)
    done = next(
        op.index
        for op in rec.ops
        if op.type == "A"
        and json.loads(op.data) == {"ev": "call", "phase": "done", "what": "compact"}
    )
    result = _check(recording, Request(done, 0, "all", "after housekeeping"), tmp_path)
    assert result["problems"] == [], trials.report(result, recording)
    # Each housekeeping commit is flushed at once (no WAL record holds it): nothing LMDB
    # wrote is unsynced at the cut, or opening does not trust the file.
    unflushed = crash_states.LMDB_FILE in result["unsynced"]
    assert not (unflushed and result["lmdb_trusted"]), "trusted a data.mdb written after its flush"


def test_a_power_cut_while_compaction_deletes_a_snapshot_leaves_verify_clean(
    recording: Path, tmp_path: Path
) -> None:
    """Cut right before compaction syncs snapshots/ after deleting a snapshot, with the
    second unlink (the .mdb) on disk and the first (the manifest) not: opening is fine, but
    verify() finds a manifest whose file is missing."""
    rec = Recording(recording)
    manifest = next(
        op for op in rec.ops if op.type == "U" and (op.path or "").endswith(".manifest")
    )
    k = _index(rec, "fsync dir snapshots", after=manifest.index)
    request = Request(k, 0, "all", "snapshot unlinks", lose=(manifest.index,))
    result = _check(recording, request, tmp_path)
    assert result["problems"] == [], trials.report(result, recording)


# --- findings under the non-default policies, pinned without a recording ----------------------


def _tear_first_page_of_a_record(segment: Path, candidates: slice, count: int) -> FramedRecord:
    """Zero, in *segment*, one of the records at *candidates* (the first that crosses a page
    boundary) from its start to that boundary: its first page never reached the disk, the
    rest of it and the records after it did. Return the record torn."""
    raw = bytearray(segment.read_bytes())
    records: list[FramedRecord] = []
    offset = SEGMENT_HEADER_SIZE
    while isinstance(
        found := decode_record(lambda o, n: bytes(raw[o : o + n]), offset), FramedRecord
    ):
        records.append(found)
        offset = found.end
    assert [r.seq for r in records] == list(range(1, count + 1))
    torn = next(r for r in records[candidates] if r.offset // 4096 != (r.end - 1) // 4096)
    boundary = (torn.offset // 4096 + 1) * 4096
    raw[torn.offset : boundary] = bytes(boundary - torn.offset)
    segment.write_bytes(raw)
    return torn


_WRITE_UNSYNCED_THEN_DIE = """
import os, sys
from rstmdb_storage import FsyncPolicy, Instance, Storage, StorageConfig
config = StorageConfig(data_dir=sys.argv[1], fsync_policy=FsyncPolicy.every_n(5),
                       snapshot_interval=0, compaction_enabled=False)
storage = Storage.open(config)
for i in range(38):
    storage.put_instance(Instance(id=f"o{i}", machine="m", version=1, state="s",
                                  ctx={"pad": "p" * 3000}))
    if i == 29:
        storage.create_snapshot()
        storage.checkpoint()  # flushed at 30; records 31..35 are synced by every_n(5) ...
os._exit(0)  # ... and 36..38 are not: the power goes
"""


def test_after_a_rebuild_a_torn_record_before_an_intact_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under every_n(5), of the three unsynced records the first one that crosses a page
    boundary lost its first page (zeros from its start to the boundary: its header) and the
    records after it are intact. The README: opening refuses that with a CorruptionError,
    and repair cuts it. Opening rebuilds from the snapshot (the WAL goes past the flush), and
    the rebuild records its checkpoint under the new boot id before replay asks whether the
    machine rebooted: replay then takes the zeros for the end of the log, opens, and the next
    write goes over the torn record, which the open after it refuses."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-c", _WRITE_UNSYNCED_THEN_DIE, str(data)], check=True)
    _tear_first_page_of_a_record(max((data / "wal").glob("*.wal")), slice(35, 37), 38)
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-the-power-cut")
    config = StorageConfig(data_dir=data, fsync_policy=FsyncPolicy.every_n(5), snapshot_interval=0)
    with pytest.raises(CorruptionError, match="a good record follows"):
        Storage.open(config).close()


_FLUSH_THEN_WRITE_UNSYNCED_AND_DIE = """
import os, shutil, sys
from rstmdb_storage import FsyncPolicy, Instance, Storage, StorageConfig
config = StorageConfig(data_dir=sys.argv[1], fsync_policy=FsyncPolicy.every_n(5),
                       snapshot_interval=0, compaction_enabled=False)
storage = Storage.open(config)
for i in range(38):
    storage.put_instance(Instance(id=f"o{i}", machine="m", version=1, state="s",
                                  ctx={"pad": "p" * 3000}))
    if i == 34:
        storage.checkpoint()  # flushed at 35, the WAL synced through it
        data = os.path.join(sys.argv[1], "indexes", "data.mdb")
        shutil.copy(data, data + ".as-flushed")  # what a power cut leaves of it: the flush
os._exit(0)  # records 36..38 are not synced: the power goes
"""


def test_repair_cuts_a_torn_record_whose_header_is_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under every_n(5), after a flush at 35: data.mdb as flushed (LMDB's later commits lost),
    and of records 36..38 the first that crosses a page lost its first page. The WAL does not
    go past the flush, so opening keeps data.mdb, checks the end of the log byte for byte
    (a reboot), and refuses, as the README says; repair should then cut the torn record."""
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-c", _FLUSH_THEN_WRITE_UNSYNCED_AND_DIE, str(data)], check=True
    )
    lmdb_file = data / "indexes" / "data.mdb"
    os.replace(lmdb_file.with_name("data.mdb.as-flushed"), lmdb_file)
    (data / "indexes" / "lock.mdb").unlink()
    torn = _tear_first_page_of_a_record(max((data / "wal").glob("*.wal")), slice(35, 37), 38)
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-the-power-cut")
    config = StorageConfig(data_dir=data, fsync_policy=FsyncPolicy.every_n(5), snapshot_interval=0)
    with pytest.raises(CorruptionError, match="zero header followed by data; a good record"):
        Storage.open(config)
    repair = Storage.repair_wal(config)
    assert repair is not None and repair.offset == torn.offset, repair
    with Storage.open(config) as storage:
        assert storage.applied_seq == torn.seq - 1
        assert storage.verify() == []


_COMMIT_PAST_THE_FLUSH_AND_DIE = """
import os, sys
from rstmdb_storage import FsyncPolicy, Instance, Storage, StorageConfig
config = StorageConfig(data_dir=sys.argv[1], fsync_policy=FsyncPolicy.every_n(5),
                       snapshot_interval=0, compaction_enabled=False)
storage = Storage.open(config)
for i in range(38):
    storage.put_instance(Instance(id=f"o{i}", machine="m", version=1, state="s", ctx={"i": i}))
    if i == 34:
        storage.checkpoint()  # flushed at 35, the WAL synced through it
os._exit(0)  # LMDB committed 36..38; their WAL records were never synced
"""


def _end_the_wal_at(segment: Path, seq: int) -> None:
    """Zero *segment* after record *seq*: what the power cut left of records never synced."""
    raw = bytearray(segment.read_bytes())
    offset = SEGMENT_HEADER_SIZE
    while isinstance(
        found := decode_record(lambda o, n: bytes(raw[o : o + n]), offset), FramedRecord
    ):
        if found.seq > seq:
            raw[found.offset :] = bytes(len(raw) - found.offset)
            break
        offset = found.end
    segment.write_bytes(raw)


def test_after_a_reboot_lmdb_commits_past_a_lost_wal_are_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under every_n(5), LMDB committed 36..38 after its flush at 35 and the power cut lost
    their WAL records (the WAL ends at the flush, which alone would say data.mdb is whole).
    data.mdb is never mapped after the reboot (it may be torn anywhere): the store is rebuilt
    from the WAL, and holds what the WAL holds, 1..35."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-c", _COMMIT_PAST_THE_FLUSH_AND_DIE, str(data)], check=True)
    assert (data / "indexes" / "relaxed").exists()
    _end_the_wal_at(max((data / "wal").glob("*.wal")), 35)
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-the-power-cut")
    config = StorageConfig(data_dir=data, fsync_policy=FsyncPolicy.every_n(5), snapshot_interval=0)
    with pytest.raises(RecoveryNeededError, match="relaxed fsync policy"):
        Storage.open(StorageConfig(data_dir=data, read_only=True))
    with Storage.open(config) as storage:
        assert storage.applied_seq == 35
        assert storage.get_instance("o34") is not None and storage.get_instance("o35") is None
        assert storage.verify() == []
        storage.put_instance(Instance(id="after", machine="m", version=1, state="s"))
    assert list((data / "indexes").glob("data.mdb.broken-*")), "the suspect file is kept aside"
    with Storage.open(config) as storage:
        assert storage.applied_seq == 36 and storage.get_instance("after") is not None


_HOLD_OPEN_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_close_while_another_process_opens_the_store_leaves_the_relaxed_mark(
    tmp_path: Path,
) -> None:
    """Clearing the mark tells whether this process is the store's only user, by converting
    its shared lock on users.lock, which drops it for a moment: an opener (holding open.lock)
    would then find nobody using the store. So a close that finds open.lock taken keeps the
    mark, without waiting, and a later close clears it."""
    config = StorageConfig(data_dir=tmp_path / "d", fsync_policy=FsyncPolicy.every_ms(50))
    marker = tmp_path / "d" / "indexes" / "relaxed"
    storage = Storage.open(config)
    storage.put_instance(Instance(id="a", machine="m", version=1, state="s"))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN_LOCK, str(tmp_path / "d" / "indexes" / "open.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        closing = threading.Thread(target=storage.close)
        closing.start()
        closing.join(60)
        assert not closing.is_alive(), "the close waited for the opener"
        assert marker.exists()
    finally:
        holder.communicate("")
    with Storage.open(config) as storage:
        assert storage.get_instance("a") is not None
    assert not marker.exists()


def test_the_last_handle_to_close_clears_the_relaxed_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark stays while any handle is open (its commits may follow the flush of the one
    closing); the last close flushes, clears it, and a reboot after that trusts data.mdb."""
    config = StorageConfig(data_dir=tmp_path / "d", fsync_policy=FsyncPolicy.every_ms(50))
    marker = tmp_path / "d" / "indexes" / "relaxed"
    first, second = Storage.open(config), Storage.open(config)
    first.put_instance(Instance(id="a", machine="m", version=1, state="s"))
    first.close()
    assert marker.exists()
    second.close()
    assert not marker.exists()
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-a-clean-reboot")
    with Storage.open(config) as storage:
        assert storage.get_instance("a") is not None
    assert not list((tmp_path / "d" / "indexes").glob("data.mdb.broken-*")), "not rebuilt"
