"""Fault injection at the OS seam (issue 16), SQLite's I/O-error loop: the Nth fdatasync, fsync,
write, rename, fallocate or ftruncate on the store's files fails, for every N over a short
workload, and each time the store must open again, whole.

``tests/faultshim/failing_io.c`` is an LD_PRELOAD shim, compiled here with gcc, that counts the
calls of each family made on files under the data directory and fails the Nth of one family
with EIO or ENOSPC, once or from then on. ``tests/faultshim/workload.py`` is the workload: a
fixed sequence of puts, batches, transitions and deletes across WAL segment rotations, with a
checkpoint, a snapshot and a compaction, that writes a ledger ("try" before each step, "ack"
with the sequence number after) outside the data directory. A counting run learns how many calls
of each family it makes; then, for each N, a run fails call N, and this process (without the
shim) reopens the store. Two tests per case read the same runs:

* ``..._keeps_every_acknowledged_write``: the fault fired; the store opens and holds exactly
  what some outcome of the ledger leads to (every acknowledged write with its sequence number,
  each write that raised whole or absent: acked ⊆ stored ⊆ attempted, sequence numbers
  gap-free); ``verify() == []``; ``health()["failed"] is None``; it takes a write; a read the
  workload made after the fault gave what was acknowledged.
* ``..._is_reported_as_a_storage_error``: the workload ended normally or with a
  ``StorageError`` it caught (no other exception crossed the API, no signal killed it); after
  the fault, ``health()`` and reads went on; a full disk was ``StorageFullError``, and with
  space back (ENOSPC once) writes resumed (README, "Guarantees, and how they are kept").

N: every call of every family, but the write family (313 calls as written): there every N up to
``EVERY_N_UP_TO`` (50), then every ``STRIDE``-th (7th), and the last (``ns_to_try``), to keep
the file near a minute on two cores; its three cases stride from different starting points,
so that together they try 3 in 7 of those calls. The workload's seed is fixed (``SEED``) and
its clock counts (``use_a_steady_clock``), so N is the same call in every run.

Each failing run is printed with a one-line reproduction, ``.venv/bin/python
tests/test_os_faults.py FAMILY ERRNO MODE N``, which runs that one case and prints its ledger
and what is wrong (``--trace`` lists every counted call with its file and offset, so call N
can be named; ``--keep`` keeps the directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import State, apply_op, stored_state

from rstmdb_storage import Instance, Storage
from rstmdb_storage.errors import (
    ConfigError,
    ConflictError,
    InvalidInputError,
    InvalidTypeError,
    NotFoundError,
)

ROOT = Path(__file__).resolve().parent.parent
SHIM_SOURCE = ROOT / "tests" / "faultshim" / "failing_io.c"
WORKLOAD = ROOT / "tests" / "faultshim" / "workload.py"
SEED = 7
EVERY_N_UP_TO = 50
STRIDE = 7
FAMILIES = ("fdatasync", "fsync", "write", "rename", "truncate", "fallocate")

#: (family, errno, mode): a sync or a rename that fails once (a transient device error, after
#: which the kernel may have dropped the pages), a write that fails once with EIO, a disk full
#: for one call (space freed at once) and one that fills and stays full, a preallocation or a
#: truncation refused.
CASES = [
    ("fdatasync", "EIO", "once"),
    ("fsync", "EIO", "once"),
    ("write", "EIO", "once"),
    ("write", "ENOSPC", "once"),
    ("write", "ENOSPC", "from-then-on"),
    ("rename", "EIO", "once"),
    ("fallocate", "ENOSPC", "once"),
    ("truncate", "EIO", "once"),
]

#: Errors that answer a question about the data (a condition, an absent id, the input) rather
#: than report a fault: the workload only deletes and transitions instances it knows are there
#: in the state it knows, so a fault that turns into one of these is a wrong answer.
WRONG_ANSWERS = (ConflictError, NotFoundError, InvalidInputError, InvalidTypeError, ConfigError)


def _load_workload() -> Any:
    spec = importlib.util.spec_from_file_location("faultshim_workload", WORKLOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workload = _load_workload()


def build_shim(directory: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build tests/faultshim/failing_io.c (apt-get install gcc)")
    shim = directory / "failing_io.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
        check=True,
    )
    return shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("faultshim"))


@dataclass
class Run:
    """One run of the workload, failing call *n* of *family* (n = 0: counting only)."""

    family: str
    errno: str
    mode: str
    n: int
    directory: Path
    returncode: int = 0
    stderr: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def ledger(self) -> Path:
        return self.directory / "ledger.jsonl"

    @property
    def name(self) -> str:
        return f"{self.family}/{self.errno}/{self.mode} N={self.n}"

    @property
    def reproduction(self) -> str:
        return (
            f".venv/bin/python tests/test_os_faults.py {self.family} {self.errno} {self.mode} "
            f"{self.n}"
        )


def run_workload(shim: Path, run: Run, trace: Path | None = None) -> Run:
    run.directory.mkdir(parents=True, exist_ok=True)
    count_file = run.directory / "counts"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAULTSHIM_", "RSTMDB_"))}
    env.update(
        LD_PRELOAD=str(shim),
        PYTHONPATH=str(ROOT),
        FAULTSHIM_PREFIX=str(run.data_dir.resolve()),
        FAULTSHIM_OP=run.family,
        FAULTSHIM_N=str(run.n),
        FAULTSHIM_ERRNO=run.errno,
        FAULTSHIM_MODE=run.mode,
        FAULTSHIM_COUNT_FILE=str(count_file),
    )
    if trace is not None:
        env["FAULTSHIM_TRACE"] = str(trace)
    proc = subprocess.run(
        [sys.executable, str(WORKLOAD), str(run.data_dir), str(run.ledger), str(SEED)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    run.returncode, run.stderr = proc.returncode, proc.stderr
    if count_file.exists():
        for line in count_file.read_text().splitlines():
            name, value = line.split()
            run.counts[name] = int(value)
    return run


# --- what the ledger allows the store to hold ---------------------------------------------------


def _key(state: State, next_seq: int) -> str:
    return json.dumps([sorted(state.items()), next_seq], sort_keys=True)


def possible_outcomes(events: list[dict[str, Any]]) -> list[tuple[State, int]]:
    """Every (state, next sequence number) the ledger allows, for a store created by the
    workload: an acknowledged write took exactly the next sequence number; a write that raised,
    or was cut short, took it and landed whole, or left nothing. Raises AssertionError when an
    acknowledgement fits no outcome (a sequence number the writes before it cannot explain)."""
    outcomes: dict[str, tuple[State, int]] = {_key({}, 1): ({}, 1)}
    tries: dict[int, dict[str, Any]] = {}
    open_step: int | None = None
    for event in events:
        kind = event["event"]
        if kind == "try":
            tries[event["step"]] = event
            open_step = event["step"]
            continue
        if kind == "done":
            continue
        changes = tries[event["step"]]["changes"]
        open_step = None
        if kind == "ack":
            acked: dict[str, tuple[State, int]] = {}
            for state, next_seq in outcomes.values():
                if next_seq == event["seq"]:
                    after = apply_op(state, changes, next_seq)
                    acked[_key(after, next_seq + 1)] = (after, next_seq + 1)
            assert acked, (
                f"step {event['step']} was acknowledged with seq {event['seq']}, but the "
                f"writes before it leave the next seq at one of "
                f"{sorted({n for _, n in outcomes.values()})}"
            )
            outcomes = acked
        elif kind == "error" and changes:
            outcomes = _either(outcomes, changes)
    if open_step is not None and tries[open_step]["changes"]:  # the workload died in a write
        outcomes = _either(outcomes, tries[open_step]["changes"])
    return list(outcomes.values())


def _either(
    outcomes: dict[str, tuple[State, int]], changes: list[list[Any]]
) -> dict[str, tuple[State, int]]:
    both = dict(outcomes)
    for state, next_seq in outcomes.values():
        after = apply_op(state, changes, next_seq)
        both[_key(after, next_seq + 1)] = (after, next_seq + 1)
    assert len(both) <= 4096, "too many outcomes to check: the workload went on failing"
    return both


def describe(found: State, outcomes: list[tuple[State, int]]) -> str:
    """How the store differs from the outcome nearest to it."""

    def distance(state: State) -> int:
        return len(set(found) ^ set(state)) + sum(
            found[k] != state[k] for k in set(found) & set(state)
        )

    nearest, next_seq = min(outcomes, key=lambda outcome: distance(outcome[0]))
    differ = sorted(k for k in set(found) & set(nearest) if found[k] != nearest[k])
    missing, unexpected = sorted(set(nearest) - set(found)), sorted(set(found) - set(nearest))
    return (
        f"nearest allowed outcome (next seq {next_seq}): missing {missing}, "
        f"unexpected {unexpected}, different "
        + ", ".join(f"{k} ({_difference(found[k], nearest[k])})" for k in differ)
    )


def _difference(stored: tuple[dict[str, Any], Any], allowed: tuple[dict[str, Any], Any]) -> str:
    fields = sorted(
        k for k in stored[0].keys() | allowed[0].keys() if stored[0].get(k) != allowed[0].get(k)
    )
    return f"seq {stored[1]} stored, {allowed[1]} allowed; fields that differ: {fields}"


# --- one case: the run, then the reopen -------------------------------------------------------

#: Steps that write; "health" and "read" are the workload's looks after an error.
WRITE_KINDS = {"put", "batch", "transition", "delete"}


@dataclass
class Verdict:
    """What is wrong after one run, in two parts, each a list of sentences (empty: nothing)."""

    #: the data: the fault fired, the store reopens and holds an outcome of the ledger,
    #: verify() passes, a read after the fault gave what was written
    kept: list[str] = field(default_factory=list)
    #: the API: no foreign exception or signal, errors of the documented types, reads and
    #: health() going on after the fault, writes resuming after a full disk that freed up
    reported: list[str] = field(default_factory=list)
    #: the types of the errors the workload caught
    errors: set[str] = field(default_factory=set)


def check(run: Run) -> Verdict:
    """What is wrong after *run*. Reopens the store in this process (without the shim)."""
    verdict = Verdict()
    kept, reported = verdict.kept, verdict.reported
    text = run.ledger.read_text() if run.ledger.exists() else ""
    events = [json.loads(line) for line in text.splitlines() if line]
    _check_reports(run, events, reported)
    verdict.errors = {e["type"] for e in events if e["event"] == "error"}
    if run.n and run.returncode >= 0 and not run.counts.get("fired"):
        kept.append(
            f"call {run.n} of {run.family} was never reached (calls: {run.counts}): the "
            "workload did not make the same calls as in the counting run"
        )
    tries = {e["step"]: e for e in events if e["event"] == "try"}
    for event in events:
        if event["event"] == "ok" and event.get("matches") is False:
            kept.append(
                f"the read at step {event['step']} ({tries[event['step']]['id']}) "
                "after the fault returned other content than was acknowledged"
            )
    try:
        outcomes = possible_outcomes(events)
    except AssertionError as exc:
        kept.append(f"the ledger: {exc}")
        outcomes = []
    try:
        storage = Storage.open(workload.config(str(run.data_dir)))
    except Exception as exc:
        kept.append(f"the reopen raised {type(exc).__name__}: {exc}")
        return verdict
    try:
        found = stored_state(storage)
        applied = storage.applied_seq
        if outcomes and not any(
            found == state and applied == next_seq - 1 for state, next_seq in outcomes
        ):
            kept.append(
                f"the store (applied_seq {applied}) holds no outcome the ledger allows: "
                + describe(found, outcomes)
            )
        findings = storage.verify()
        if findings:
            kept.append(f"verify() found: {[str(f) for f in findings]}")
        if storage.health()["failed"] is not None:
            kept.append(f"reopened, the store is still failed: {storage.health()}")
        seq = storage.put_instance(Instance(id="after", machine="order", version=1, state="a"))
        if seq != applied + 1:
            kept.append(f"the write after the reopen took seq {seq}, not {applied + 1}")
    except Exception as exc:  # anything here is a finding, to be reported with the others
        kept.append(f"after the reopen: {type(exc).__name__}: {exc}")
    finally:
        try:
            storage.close()
        except Exception as exc:
            kept.append(f"closing the reopened store raised {type(exc).__name__}: {exc}")
    return verdict


def _check_reports(run: Run, events: list[dict[str, Any]], reported: list[str]) -> None:
    if run.returncode < 0:
        reported.append(f"the workload died of signal {-run.returncode}:\n{_tail(run.stderr)}")
    elif run.returncode != 0:
        reported.append(f"the workload raised a foreign exception:\n{_tail(run.stderr)}")
    elif not events or events[-1]["event"] != "done":
        reported.append("the workload did not get to its end")
    tries = {e["step"]: e["kind"] for e in events if e["event"] == "try"}
    errors = [e for e in events if e["event"] == "error"]
    for error in errors:
        kind = tries[error["step"]]
        where = f"step {error['step']} ({kind})"
        if any(cls.__name__ == error["type"] for cls in _subclasses(WRONG_ANSWERS)):
            reported.append(f"a fault became a wrong answer at {where}: {error['message']}")
        if kind in ("health", "read"):
            reported.append(
                f"after the fault, {'health()' if kind == 'health' else 'a read'} raised "
                f"{error['type']} at {where}: {error['message']}"
            )
    if run.errno == "ENOSPC" and errors and errors[0]["type"] != "StorageFullError":
        reported.append(
            f"a full disk was reported as {errors[0]['type']}, not StorageFullError, at step "
            f"{errors[0]['step']} ({tries[errors[0]['step']]}): {errors[0]['message']}"
        )
    if run.errno == "ENOSPC" and run.mode == "once" and errors and run.returncode == 0:
        first = errors[0]["step"]
        later = [e for e in events if e["event"] == "try" and e["step"] > first]
        if any(e["kind"] in WRITE_KINDS for e in later) and not any(
            e["event"] == "ack" and e["step"] > first for e in events
        ):
            reported.append(
                f"writes did not resume once space returned (the disk was full for one call, "
                f"at step {first}): every later write raised "
                f"{sorted({e['type'] for e in errors if e['step'] > first})}"
            )


def _tail(stderr: str) -> str:
    """The end of a traceback: the frames of the store and the exception."""
    lines = stderr.rstrip().splitlines()
    return "\n".join("    " + line for line in lines[-14:])


def _subclasses(classes: tuple[type, ...]) -> Iterator[type]:
    for cls in classes:
        yield cls
        yield from _subclasses(tuple(cls.__subclasses__()))


def ns_to_try(count: int, offset: int = 0) -> list[int]:
    """Every N up to EVERY_N_UP_TO, then every STRIDE-th from EVERY_N_UP_TO + 1 + offset, and
    the last."""
    ns = list(range(1, min(count, EVERY_N_UP_TO) + 1))
    ns += list(range(EVERY_N_UP_TO + 1 + offset, count + 1, STRIDE))
    if count not in ns and count > 0:
        ns.append(count)
    return ns


@pytest.fixture(scope="session")
def counting_run(shim: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The workload under the shim, failing nothing: how many calls of each family it makes.
    The store it leaves must pass the same checks."""
    run = run_workload(shim, Run("none", "EIO", "once", 0, tmp_path_factory.mktemp("counting")))
    verdict = check(run)
    problems = verdict.kept + verdict.reported
    assert not problems, "the workload fails without any fault:\n" + "\n".join(problems)
    assert run.counts and set(FAMILIES) <= set(run.counts), f"no counts written: {run.counts}"
    return run


#: The loop's results, per case: the two tests of a case share one loop.
_LOOPS: dict[tuple[str, str, str], list[tuple[Run, Verdict]]] = {}


def fault_loop(
    case: tuple[str, str, str], shim: Path, counting: Run, factory: pytest.TempPathFactory
) -> list[tuple[Run, Verdict]]:
    if case not in _LOOPS:
        family = case[0]
        count = counting.counts[family]
        assert count > 0, f"the workload makes no {family} call on the store's files: untested"
        directory = factory.mktemp("-".join(case))
        # The cases of one family stride from different starting points: together they try
        # more of its calls than one stride would.
        offset = [c for c in CASES if c[0] == family].index(case) * 2 % STRIDE
        runs = [Run(*case, n, directory / f"n{n}") for n in ns_to_try(count, offset)]
        results = []
        # Two runs at a time, each in a directory of its own (they share nothing but the CPU;
        # the workload's calls do not depend on timing); every check is made here, in order.
        with ThreadPoolExecutor(max_workers=2) as pool:
            for run in pool.map(lambda run: run_workload(shim, run), runs):
                results.append((run, check(run)))
                shutil.rmtree(run.directory)
        _LOOPS[case] = results
    return _LOOPS[case]


def failures(results: list[tuple[Run, Verdict]], part: str) -> str:
    failed = [(run, getattr(verdict, part)) for run, verdict in results if getattr(verdict, part)]
    if not failed:
        return ""
    shown = [
        f"{run.name}  ({run.reproduction}):\n  " + "\n  ".join(problems)
        for run, problems in failed[:12]
    ]
    return (
        f"{len(failed)} of {len(results)} runs failed, at N = {[run.n for run, _ in failed]}:\n"
        + "\n".join(shown)
        + (f"\n... and {len(failed) - 12} more" if len(failed) > 12 else "")
    )


def test_the_counting_run_makes_every_kind_of_step(counting_run: Run) -> None:
    events = [json.loads(line) for line in counting_run.ledger.read_text().splitlines()]
    kinds = {e["kind"] for e in events if e["event"] == "try"}
    assert {"put", "batch", "transition", "delete", "checkpoint", "snapshot", "compact"} <= kinds
    assert not [e for e in events if e["event"] == "error"]
    assert events[-1] == {"event": "done"}
    assert len([e for e in events if e["event"] == "ack"]) >= 30
    assert counting_run.counts["fallocate"] >= 2, "the WAL never rotated (a new segment each)"
    assert list((counting_run.data_dir / "snapshots").glob("*.manifest"))


SHIM_PROBE = """
import errno, json, os, sys
inside, outside = sys.argv[1], sys.argv[2]
os.makedirs(inside)
fd_in = os.open(os.path.join(inside, "f"), os.O_RDWR | os.O_CREAT)
fd_out = os.open(outside, os.O_RDWR | os.O_CREAT)
seen = []
for call in [lambda: os.write(fd_in, b"x"), lambda: os.pwrite(fd_in, b"y", 5),
             lambda: os.writev(fd_in, [b"z"]), lambda: os.posix_fallocate(fd_in, 0, 4096),
             lambda: os.fsync(fd_in), lambda: os.rename(os.path.join(inside, "f"),
                                                        os.path.join(inside, "g"))]:
    os.write(fd_out, b"never counted, never failed")
    try:
        call()
        seen.append("ok")
    except OSError as exc:
        seen.append(errno.errorcode[exc.errno])
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("family", "n", "errno", "mode", "expected"),
    [
        ("write", 2, "EIO", "once", ["ok", "EIO", "ok", "ok", "ok", "ok"]),
        ("write", 2, "ENOSPC", "from-then-on", ["ok", "ENOSPC", "ENOSPC", "ok", "ok", "ok"]),
        ("fallocate", 1, "ENOSPC", "once", ["ok", "ok", "ok", "ENOSPC", "ok", "ok"]),
        ("fsync", 1, "EIO", "once", ["ok", "ok", "ok", "ok", "EIO", "ok"]),
        ("rename", 1, "EIO", "once", ["ok", "ok", "ok", "ok", "ok", "EIO"]),
        ("fdatasync", 1, "EIO", "once", ["ok"] * 6),
    ],
)
def test_the_shim_fails_the_nth_call_under_its_prefix_only(
    shim: Path, tmp_path: Path, family: str, n: int, errno: str, mode: str, expected: list[str]
) -> None:
    env = dict(
        os.environ,
        LD_PRELOAD=str(shim),
        FAULTSHIM_PREFIX=str(tmp_path / "store"),
        FAULTSHIM_OP=family,
        FAULTSHIM_N=str(n),
        FAULTSHIM_ERRNO=errno,
        FAULTSHIM_MODE=mode,
        FAULTSHIM_COUNT_FILE=str(tmp_path / "counts"),
    )
    args = [sys.executable, "-c", SHIM_PROBE, str(tmp_path / "store"), str(tmp_path / "outside")]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == expected
    counts = dict(line.split() for line in (tmp_path / "counts").read_text().splitlines())
    assert counts["write"] == "3"  # the write, pwrite and writev inside; none of those outside
    assert (counts["fallocate"], counts["fsync"], counts["rename"]) == ("1", "1", "1")
    assert counts["fired"] == str(sum(result != "ok" for result in expected))


def _put(instance_id: str, step: int) -> list[Any]:
    return ["put", {"id": instance_id, "ctx": {"step": step}}]


def test_the_ledger_allows_exactly_the_outcomes_of_its_acks_and_errors() -> None:
    """A write that raised is whole or absent, and the next acknowledgement's sequence number
    tells which; an acknowledgement no outcome explains is an error of the check."""
    events = [
        {"event": "try", "step": 1, "kind": "put", "changes": [_put("a", 1)]},
        {"event": "ack", "step": 1, "seq": 1},
        {"event": "try", "step": 2, "kind": "put", "changes": [_put("b", 2)]},
        {"event": "error", "step": 2, "type": "StorageFailedError", "message": ""},
    ]
    a, b = _put("a", 1)[1], _put("b", 2)[1]
    assert sorted(possible_outcomes(events), key=lambda o: o[1]) == [
        ({"a": (a, 1)}, 2),
        ({"a": (a, 1), "b": (b, 2)}, 3),
    ]
    then = [{"event": "try", "step": 3, "kind": "delete", "changes": [["del", "a"]]}]
    assert possible_outcomes([*events, *then, {"event": "ack", "step": 3, "seq": 2}]) == [({}, 3)]
    assert possible_outcomes([*events, *then, {"event": "ack", "step": 3, "seq": 3}]) == [
        ({"b": (b, 2)}, 4)
    ]
    with pytest.raises(AssertionError, match="acknowledged with seq 5"):
        possible_outcomes([*events, *then, {"event": "ack", "step": 3, "seq": 5}])
    # cut short in a write (the workload died): that write is whole or absent too
    assert len(possible_outcomes(events[:3])) == 2


CASE_IDS = ["-".join(case) for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_failing_call_keeps_every_acknowledged_write(
    shim: Path,
    counting_run: Run,
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[str, str, str],
) -> None:
    """(a) acked ⊆ stored ⊆ attempted, gap-free; (b) verify() == []; the store reopens and
    takes writes."""
    results = fault_loop(case, shim, counting_run, tmp_path_factory)
    problems = failures(results, "kept")
    assert not problems, problems
    errors = set().union(*(verdict.errors for _, verdict in results))
    assert errors, f"no run of {case} reported an error: did the faults reach the store?"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_failing_call_is_reported_as_a_storage_error(
    shim: Path,
    counting_run: Run,
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[str, str, str],
) -> None:
    """(c) the workload ends normally or with a StorageError it caught: no foreign exception, no
    signal; reads and health() go on after the fault; a full disk is StorageFullError, and
    writes resume when it frees up (README, "Guarantees")."""
    problems = failures(fault_loop(case, shim, counting_run, tmp_path_factory), "reported")
    assert not problems, problems


# --- one case by hand: python tests/test_os_faults.py FAMILY ERRNO MODE N ---------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Run one case of the OS-fault loop.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("errno", choices=["EIO", "ENOSPC"])
    parser.add_argument("mode", choices=["once", "from-then-on"])
    parser.add_argument("n", type=int)
    parser.add_argument("--trace", action="store_true", help="print every counted call")
    parser.add_argument("--keep", action="store_true", help="keep the directory")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="os-fault-"))
    shim = build_shim(directory)
    trace = directory / "trace" if args.trace else None
    run = run_workload(
        shim, Run(args.family, args.errno, args.mode, args.n, directory / "run"), trace
    )
    for line in run.ledger.read_text().splitlines():
        event = json.loads(line)
        event.pop("changes", None)
        print("ledger:", event)
    if run.stderr and run.returncode == 0:  # a traceback is printed with the problems
        print("stderr of the workload:\n" + run.stderr)
    if trace is not None:
        print(trace.read_text(), end="")
    verdict = check(run)
    problems = verdict.kept + verdict.reported
    print("\n".join(problems) or f"{run.name}: nothing wrong")
    if args.keep:
        print(f"directory: {directory}")
    else:
        shutil.rmtree(directory)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
