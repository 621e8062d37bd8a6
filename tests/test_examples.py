"""The examples run as their users run them: as separate processes on a data directory.

* ``examples/multiprocess_workers.py`` with 3 workers and 60 orders exits 0, and its summary
  (the JSON line ``--json`` adds) says what the store confirms: every order ``delivered``, each
  of the 4 steps of each order written once, one WAL record per step plus the seed batch, the
  WAL hold released; the same with idempotency keys shared by all workers (``--key-scope step``);
* ``examples/lookup_service.py`` on port 0, over a store this test fills: the first stdout line
  is its URL; lookups by id (ids with ``/`` and non-ASCII text too, bytes and ``inf`` in a
  context), paging by state, metadata and time with cursors (every match exactly once), counts,
  writes made by this process after it started, 400 for bad parameters, 404 for unknown ids and
  routes, 405 for other methods, and a clean exit on SIGTERM;
* the service and the workers example at once on one directory: every answer given while the
  workers run counts all the orders of the run or none (the seed is one batch), and at the end
  the service sees what the workers wrote;
* the workers example stopped mid-run by SIGTERM, by SIGINT and by Ctrl-C (SIGINT to its whole
  process group): it exits 143 or 130 with one line, every worker exited through its handler
  (status 143) and is gone, the WAL hold is released and the store is sound; with its parent
  killed by SIGKILL, the workers stop by themselves and the hold stays until ``release-hold``;
* ``examples/demo.py`` twice on one directory, and on a store of 500 instances, where it prints
  counts and the first ids, not every one.

Nothing sleeps: the tests wait for a line on a pipe, the end of a pipe or of a process (a
pidfd), or poll the store read-only until the workers have written, each with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from rstmdb_storage import Instance, Storage, StorageConfig
from rstmdb_storage.changes import PutInstance
from rstmdb_storage.codec import decode_instance_body

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "examples" / "multiprocess_workers.py"
SERVICE = ROOT / "examples" / "lookup_service.py"
PIPELINE = ["pending", "paid", "packed", "shipped", "delivered"]
STARTUP_TIMEOUT_S = 30  # a bound on a hung service, not a delay: the URL line ends the wait
# No proxy from the environment for requests to 127.0.0.1.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), path])))


def workers_command(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKERS), "--data-dir", str(data_dir), "--json", *args]


def run_workers(tmp_path: Path, data_dir: Path, *args: str) -> dict[str, Any]:
    """The summary of a run; ``summary["reports"]`` holds each worker's line of it."""
    done = subprocess.run(
        workers_command(data_dir, *args),
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = check_workers_output(done.returncode, done.stdout, done.stderr)
    summary["reports"] = worker_reports(done.stdout)
    assert sorted(summary["reports"]) == [f"worker-{n}" for n in range(1, summary["workers"] + 1)]
    return summary


WORKER_LINE = re.compile(
    r"^  (worker-\d+): (\d+) steps, (\d+) conflicts, (\d+) deliberate retries$", re.MULTILINE
)


def worker_reports(stdout: str) -> dict[str, dict[str, int]]:
    """Each worker's own count of its steps, conflicts and deliberate retries (its stdout
    line)."""
    return {
        name: {"steps": int(steps), "conflicts": int(conflicts), "retries": int(retries)}
        for name, steps, conflicts, retries in WORKER_LINE.findall(stdout)
    }


def steps_in_wal(data_dir: Path, run: str) -> dict[str, int]:
    """How many steps each worker wrote, from the WAL: every put of an order of *run* that
    is not its seed names the worker in its event id (``<order>-><state>@<worker>``)."""
    made: dict[str, int] = {}
    with Storage.open(data_dir) as storage:
        for record in storage.read_wal():
            for change in record.changes():
                if isinstance(change, PutInstance) and change.id.startswith(f"{run}-order-"):
                    fields = decode_instance_body(change.body, change.id)
                    state, event_id = fields[2], fields[6]
                    if state == "pending":
                        assert event_id is None  # the seed batch
                        continue
                    order_id, _, worker = event_id.rpartition("@")
                    assert order_id == f"{change.id}->{state}"
                    made[worker] = made.get(worker, 0) + 1
    return made


def check_reports_add_up(summary: dict[str, Any]) -> None:
    """The workers' own lines add up to the summary's totals."""
    reports = summary["reports"].values()
    assert sum(r["conflicts"] for r in reports) == summary["conflicts"]
    assert sum(r["retries"] for r in reports) == summary["deliberate_retries"]
    # a step reported made but not written was a lost race the shared key answered
    steps = sum(r["steps"] for r in reports)
    assert steps - summary["transitions_written"] == summary["absorbed_by_key"]
    for report in reports:  # a worker repeats its first step made, and only steps it made
        assert report["retries"] >= 1 if report["steps"] else report["retries"] == 0, report


def check_workers_output(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    assert returncode == 0, f"exit status {returncode}\n{stdout}\n{stderr}"
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["ok"], summary["problems"]
    assert f"OK: every order of run {summary['run']} entered each state exactly once" in stdout
    assert f"conflicts (another worker won the race): {summary['conflicts']}" in stdout
    return summary


@contextmanager
def lookup_service(tmp_path: Path, data_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start the service on a free port; yield its URL (its first stdout line) and process."""
    log = tmp_path / "service.log"
    with log.open("w") as err:  # a file, not a pipe nobody reads, for the service's stderr
        service = subprocess.Popen(
            [sys.executable, str(SERVICE), "--data-dir", str(data_dir), "--port", "0"],
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert service.stdout is not None
            ready, _, _ = select.select([service.stdout], [], [], STARTUP_TIMEOUT_S)
            line = service.stdout.readline() if ready else ""
            assert line.startswith("http://127.0.0.1:"), (
                f"no URL from the service (exit {service.poll()}): {line!r}\n{log.read_text()}"
            )
            yield line.strip(), service
        finally:
            service.terminate()
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()


def get(url: str) -> tuple[int, Any]:
    try:
        with HTTP.open(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            assert error.headers["Content-Type"] == "application/json"
            return error.code, json.loads(error.read())


def all_pages(url: str, limit: int, **params: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Every item of a listing, following next_cursor; and the size of each page."""
    items: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor = None
    while True:
        query = dict(params, limit=limit) | ({"cursor": cursor} if cursor else {})
        status, body = get(f"{url}?{urlencode(query)}")
        assert status == 200, body
        assert body["count"] == len(body["items"]) <= limit
        items += body["items"]
        sizes.append(body["count"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items, sizes


# --- the workers example ------------------------------------------------------------------------


def test_workers_move_every_order_to_delivered_exactly_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    summary = run_workers(tmp_path, data_dir, "--workers", "3", "--orders", "60")

    assert summary["run_counts"] == {"delivered": 60}
    assert summary["count_by_state"] == {"delivered": 60}
    assert summary["exactly_once"] is True
    assert summary["transitions_written"] == summary["transitions_expected"] == 60 * 4
    assert summary["absorbed_by_key"] == 0
    assert summary["deliberate_retries"] >= 3  # each worker repeats at least its first step
    check_reports_add_up(summary)
    # Each worker's key is its own: every step it reports made is a record naming it, and a
    # conflict is a race lost to a step another worker wrote.
    made = steps_in_wal(data_dir, summary["run"])
    assert made == {name: r["steps"] for name, r in summary["reports"].items() if r["steps"]}
    for name, report in summary["reports"].items():
        others = sum(count for worker, count in made.items() if worker != name)
        assert report["conflicts"] == 0 or others > 0, (name, report, made)
    # A fresh store: the seed batch is record 1, then one record per step and nothing else
    # (the seed's retry and the deliberate retries wrote nothing).
    assert summary["first_seq"] == 1
    assert summary["wal_records_run"] == summary["applied_seq"] == 1 + 240

    with Storage.open(data_dir) as storage:
        assert storage.applied_seq == 241
        assert storage.count_by_state("order") == {"delivered": 60}
        assert storage.wal_holds() == {}  # the example released its hold
        orders = storage.list_by_metadata("run", summary["run"])
        assert len(orders) == 60
        for order in orders:
            assert order.last_event_id.startswith(f"{order.id}->delivered@worker-")
        assert storage.verify() == []


def test_workers_with_keys_shared_by_all_workers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ("--workers", "2", "--orders", "30", "--key-scope", "step")
    summary = run_workers(tmp_path, data_dir, *args)

    assert summary["run_counts"] == {"delivered": 30}
    assert summary["exactly_once"] is True
    assert summary["transitions_written"] == 120
    assert summary["wal_records_run"] == summary["applied_seq"] == 121
    # A shared key answers a lost race quietly: no worker ever sees a ConflictError. Each race
    # it absorbed is a step the worker counted and another worker wrote, each at most once.
    assert summary["conflicts"] == 0
    check_reports_add_up(summary)
    made = steps_in_wal(data_dir, summary["run"])
    assert sum(made.values()) == 120
    for name, report in summary["reports"].items():
        absorbed = report["steps"] - made.get(name, 0)
        others = sum(count for worker, count in made.items() if worker != name)
        assert 0 <= absorbed <= others, (name, report, made)


def test_a_single_worker_never_loses_a_race(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    summary = run_workers(tmp_path, data_dir, "--workers", "1", "--orders", "20")

    assert summary["exactly_once"] is True
    assert summary["conflicts"] == 0 and summary["absorbed_by_key"] == 0
    assert summary["reports"]["worker-1"]["steps"] == summary["transitions_written"] == 80
    assert steps_in_wal(data_dir, summary["run"]) == {"worker-1": 80}
    assert summary["wal_records_run"] == summary["applied_seq"] == 81


# --- the lookup service -------------------------------------------------------------------------


ODD_ID = "odd/id ü"  # a "/" and non-ASCII text: percent-encoded in the URL


def fill(data_dir: Path) -> dict[str, int]:
    """25 orders (13 pending, 12 paid) and one odd instance; return each id's WAL sequence."""
    seqs: dict[str, int] = {}
    with Storage.open(data_dir) as storage:
        for n in range(1, 26):
            seqs[f"order-{n:02d}"] = storage.put_instance(
                Instance(
                    id=f"order-{n:02d}",
                    machine="order",
                    version=1,
                    state="pending" if n % 2 else "paid",
                    ctx={"total": n * 1.5, "lines": [n, "x"]},
                    metadata={"customer": "alice" if n % 3 else "bob", "priority": n % 3},
                )
            )
        seqs[ODD_ID] = storage.put_instance(
            Instance(
                id=ODD_ID,
                machine="parcel",
                version=2,
                state="lost",
                ctx={"blob": b"\x00\x01", "ratio": float("inf")},
            )
        )
    return seqs


def test_lookup_service_answers_from_the_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seqs = fill(data_dir)
    pending = [f"order-{n:02d}" for n in range(1, 26) if n % 2]
    alice = [f"order-{n:02d}" for n in range(1, 26) if n % 3]

    with lookup_service(tmp_path, data_dir) as (url, service):
        assert get(f"{url}/health") == (
            200,
            {"status": "ok", "instances": 26, "applied_seq": 26},
        )

        # by id
        status, body = get(f"{url}/instances/order-03")
        assert status == 200
        assert body | {"created_at": 0, "updated_at": 0} == {
            "id": "order-03",
            "machine": "order",
            "version": 1,
            "state": "pending",
            "ctx": {"total": 4.5, "lines": [3, "x"]},
            "metadata": {"customer": "bob", "priority": 0},
            "status": "active",
            "last_event_id": None,
            "last_wal_offset": seqs["order-03"],
            "created_at": 0,
            "updated_at": 0,
        }
        assert body["created_at"] == body["updated_at"] > 0
        status, body = get(f"{url}/instances/{quote(ODD_ID, safe='')}")
        assert status == 200
        assert (body["id"], body["state"]) == (ODD_ID, "lost")
        assert body["ctx"] == {"blob": {"$base64": "AAE="}, "ratio": {"$float": "inf"}}
        status, body = get(f"{url}/instances/order-99")
        assert status == 404
        assert "order-99" in body["error"]

        # by state: three pages of at most 5, every pending order exactly once, in id order
        items, sizes = all_pages(f"{url}/by-state/order/pending", 5)
        assert [item["id"] for item in items] == pending
        assert sizes == [5, 5, 3]
        assert all(item["state"] == "pending" for item in items)

        # by metadata, exact (str and int labels) and range
        items, _ = all_pages(f"{url}/by-metadata/customer/alice", 4)
        assert sorted(item["id"] for item in items) == alice
        status, body = get(f"{url}/by-metadata/priority/0?type=int")
        assert status == 200
        assert sorted(item["id"] for item in body["items"]) == [
            f"order-{n:02d}" for n in range(3, 26, 3)
        ]
        assert body["next_cursor"] is None
        items, _ = all_pages(f"{url}/by-metadata/priority", 3, start=1, type="int")
        assert len(items) == 25 - 8
        assert all(item["metadata"]["priority"] >= 1 for item in items)

        # by time: everything, newest first, exactly once
        items, _ = all_pages(f"{url}/by-time", 7, start_ms=0, newest_first="true")
        assert sorted(item["id"] for item in items) == sorted(seqs)
        times = [item["updated_at"] for item in items]
        assert times == sorted(times, reverse=True)

        assert get(f"{url}/counts/order") == (
            200,
            {"machine": "order", "counts": {"paid": 12, "pending": 13}, "total": 25},
        )
        assert get(f"{url}/counts/nothing")[1]["total"] == 0

        # writes made by another process after the service opened the store
        with Storage.open(data_dir) as storage:
            moved = storage.transition("order-01", "pending", "paid", event_id="evt-1")
        status, body = get(f"{url}/instances/order-01")
        assert status == 200
        assert (body["state"], body["last_event_id"]) == ("paid", "evt-1")
        assert body["last_wal_offset"] == moved.last_wal_offset
        assert get(f"{url}/counts/order")[1]["counts"] == {"paid": 13, "pending": 12}

        # bad parameters: 400 with a message, whether the service or the store refuses them
        _, page = get(f"{url}/by-state/order/pending?limit=2")
        state_cursor = page["next_cursor"]
        for bad in [
            "/by-state/order/pending?limit=abc",
            "/by-state/order/pending?limit=0",
            "/by-state/order/pending?limit=-3",
            "/by-state/order/pending?limit=1001",
            "/by-state/order/pending?limit=2&limit=3",
            "/by-state/order/pending?cursor=not-a-cursor",
            f"/by-metadata/customer/alice?cursor={state_cursor}",  # another query's cursor
            "/by-state/order/pending?colour=red",
            "/by-metadata/priority/high?type=int",
            "/by-metadata/priority/1?type=complex",
            "/by-metadata/priority/nan?type=float",
            "/by-metadata/priority",
            "/by-time?start_ms=yesterday",
            "/by-time?start_ms=-1",
            "/by-time?newest_first=maybe",
            "/instances/%FF",
            "/instances/" + "x" * 300,
        ]:
            status, body = get(url + bad)
            assert status == 400, (bad, body)
            assert isinstance(body["error"], str) and body["error"], bad

        for unknown in ["/", "/nothing", "/instances", "/instances/a/b", "/by-state/order"]:
            status, body = get(url + unknown)
            assert status == 404, (unknown, body)

        request = urllib.request.Request(f"{url}/instances/order-01", method="DELETE")
        try:
            HTTP.open(request, timeout=10)
            raise AssertionError("DELETE was accepted")
        except urllib.error.HTTPError as error:
            with error:
                assert error.code == 405

        service.terminate()
        assert service.wait(timeout=10) == 0  # SIGTERM closes the store and exits cleanly


def test_lookup_service_beside_the_workers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    Storage.open(data_dir).close()  # an empty store: a service that only reads creates none
    with lookup_service(tmp_path, data_dir) as (url, _service):
        workers = subprocess.Popen(
            workers_command(data_dir, "--workers", "2", "--orders", "20"),
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while workers.poll() is None:  # ask all the while the workers write
                status, body = get(f"{url}/counts/order")
                assert status == 200
                assert body["total"] in (0, 20), body  # the seed is one batch: all or none
                assert set(body["counts"]) <= set(PIPELINE), body
            stdout, stderr = workers.communicate(timeout=60)
        finally:
            if workers.poll() is None:
                workers.kill()
                workers.communicate()
        summary = check_workers_output(workers.returncode, stdout, stderr)

        assert get(f"{url}/counts/order")[1] == {
            "machine": "order",
            "counts": {"delivered": 20},
            "total": 20,
        }
        assert get(f"{url}/health")[1]["applied_seq"] == summary["applied_seq"] == 81
        items, _ = all_pages(f"{url}/by-metadata/run/{summary['run']}", 8)
        assert len({item["id"] for item in items}) == len(items) == 20
        for item in items:
            assert item["state"] == "delivered"
            status, body = get(f"{url}/instances/{quote(item['id'])}")
            assert status == 200
            assert body == item


def run_demo(cwd: Path, data_dir: Path) -> str:
    """``python examples/demo.py DATA_DIR``; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), str(data_dir)],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_demo_runs_twice_on_one_directory(tmp_path: Path) -> None:
    """The README's main job: a second run carries on the same store."""
    outputs = [run_demo(tmp_path, tmp_path / "data") for _ in range(2)]
    assert "point-in-time restore to sequence 2, before the batch: order-1\n" in outputs[0]
    assert "reopened: 5 instances, applied sequence 4" in outputs[0]
    assert "reopened: 5 instances, applied sequence 8" in outputs[1]


def test_the_demo_summarises_a_large_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Storage.open(data_dir) as storage, storage.batch() as batch:
        for n in range(500):
            batch.put_instance(
                Instance(
                    id=f"big-{n:04d}",
                    machine="order",
                    version=1,
                    state="pending",
                    metadata={"customer": "bob"},
                )
            )
    output = run_demo(tmp_path, data_dir)
    assert len(output.splitlines()) < 40  # a summary, not 500 ids
    assert "stored instances (505 in all, the first 10):" in output
    assert "orders of customer bob: big-0000, big-0001" in output
    assert "... and 494 more" in output  # 500 of bob's and 4 of the demo's, 10 shown


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie, which has ended and waits to be reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_until_ended(pids: list[int], timeout: float) -> list[int]:
    """Wait for each of *pids*, children of this process or not, to end (a pidfd is readable
    once its process has ended); return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    running = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone already
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(pidfd)
        if not ready:
            running.append(pid)
    return running


def parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("\nPPid:\t")[1].split()[0])


WORKERS_HOLD = "examples.multiprocess_workers"
RUN_ORDERS = 20000  # a run that lasts far longer than the test needs it to
DEADLINE_S = 60  # a bound on a hung example, not a delay: each wait ends with what it waits for


class WorkersRun:
    """multiprocess_workers.py started in a session of its own (so that the test can send a
    signal to its whole process group, as Ctrl-C does, and kill what is left when it fails),
    stdout on a pipe, stderr in a file."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = tmp_path / "workers.log"
        with self.log.open("w") as err:
            self.process = subprocess.Popen(
                workers_command(data_dir, "--orders", str(RUN_ORDERS)),
                cwd=tmp_path,
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.out = b""

    def worker_pids(self) -> list[int]:
        """The pids the parent prints once the workers run (read up to that line)."""
        prefix = b"workers started: pids "
        deadline = time.monotonic() + DEADLINE_S
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            for line in self.out.split(b"\n")[:-1]:
                if line.startswith(prefix):
                    return [int(pid) for pid in line[len(prefix) :].split()]
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            assert chunk, f"no worker pids (exit {self.process.poll()}): {self.report()}"
            self.out += chunk

    def wait_for_steps(self) -> int:
        """Poll the store, read-only, until the workers have written steps; return how many
        records it holds then."""
        deadline = time.monotonic() + DEADLINE_S
        with Storage.open(StorageConfig(data_dir=self.data_dir, read_only=True)) as storage:
            while (applied := storage.applied_seq) <= 1:  # record 1 is the seed batch
                assert time.monotonic() < deadline, f"no step written: {self.report()}"
                assert self.process.poll() is None, f"the example ended: {self.report()}"
            assert storage.count_instances() == RUN_ORDERS
            assert storage.wal_holds() == {WORKERS_HOLD: 1}  # held while it runs
        return applied

    def finish(self) -> str:
        """Everything it wrote to stdout, once every process holding the pipe is gone."""
        out, _ = self.process.communicate(timeout=DEADLINE_S)
        return (self.out + out).decode()

    def report(self) -> str:
        return f"{self.out.decode()}\n{self.log.read_text()}"

    def kill_all(self) -> None:
        """Kill what is left of the run: the parent and its workers, whoever their parent."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.parametrize(
    ("signum", "whole_group", "code"),
    [
        (signal.SIGTERM, False, 143),  # kill PID
        (signal.SIGINT, False, 130),  # kill -INT PID
        (signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the parent and every worker
    ],
    ids=["SIGTERM", "SIGINT", "Ctrl-C"],
)
def test_the_workers_example_stops_its_workers_and_releases_its_hold(
    tmp_path: Path, signum: int, whole_group: bool, code: int
) -> None:
    data_dir = tmp_path / "data"
    run = WorkersRun(tmp_path, data_dir)
    try:
        pids = run.worker_pids()
        assert len(pids) == 4
        assert [parent_pid(pid) for pid in pids] == [run.process.pid] * 4
        written = run.wait_for_steps()

        if whole_group:
            os.killpg(run.process.pid, signum)
        else:
            run.process.send_signal(signum)
        out = run.finish()

        assert run.process.returncode == code, run.report()
        name = signal.Signals(signum).name
        assert out.splitlines()[-1] == (
            f"interrupted by {name}: stopped 4 workers (exit status 143 143 143 143); "
            f"the WAL hold '{WORKERS_HOLD}' is released"
        )  # every worker exited through its SIGTERM handler, which closed its store
        assert "OK: every order" not in out  # stopped long before the end of its run
        assert [pid for pid in pids if alive(pid)] == []
        assert run.log.read_text() == ""  # no traceback from anyone

        with Storage.open(StorageConfig(data_dir=data_dir, read_only=True)) as storage:
            assert storage.wal_holds() == {}
            assert storage.recovery_needed() is None  # every record written is applied
            counts = storage.count_by_state("order")
            assert sum(counts.values()) == RUN_ORDERS
            assert written <= storage.applied_seq < 1 + RUN_ORDERS * 4
            assert counts.get("pending", 0) < RUN_ORDERS  # the steps made are there
            assert storage.verify() == []
    finally:
        run.kill_all()


def test_workers_whose_parent_is_killed_stop_by_themselves(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = WorkersRun(tmp_path, data_dir)
    try:
        pids = run.worker_pids()
        run.wait_for_steps()

        run.process.kill()  # SIGKILL: no handler runs, no hold is released
        run.process.wait()

        assert wait_until_ended(pids, DEADLINE_S) == []  # each noticed within one step
        assert "interrupted" not in run.finish()
        assert sorted(run.log.read_text().splitlines()) == [
            f"worker-{n}: the parent process is gone; stopping" for n in range(1, 5)
        ]
        with Storage.open(StorageConfig(data_dir=data_dir, read_only=True)) as storage:
            assert storage.wal_holds() == {WORKERS_HOLD: 1}  # as the docstring says
            assert storage.recovery_needed() is None  # the workers closed their stores
        # ... and says how to release it
        done = subprocess.run(
            [sys.executable, "-m", "rstmdb_storage", "release-hold", str(data_dir), WORKERS_HOLD],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert done.returncode == 0, done.stderr
        with Storage.open(StorageConfig(data_dir=data_dir, read_only=True)) as storage:
            assert storage.wal_holds() == {}
    finally:
        run.kill_all()
