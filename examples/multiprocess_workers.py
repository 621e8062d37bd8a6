"""A pool of worker processes sharing one data directory, moving orders through a pipeline.

Run it from the repository root (by default it takes several seconds)::

    python examples/multiprocess_workers.py                  # 4 workers, 2000 orders
    python examples/multiprocess_workers.py --workers 8 --orders 5000 --data-dir /tmp/shop

and, in a second terminal, answer lookups from the same directory while the workers write::

    python examples/lookup_service.py --data-dir ./rstmdb-data --port 8080
    curl localhost:8080/counts/order

What happens:

1. The parent seeds the orders of this run (ids ``<run>-order-00001`` …, all ``pending``) in
   one batch, a single WAL record; it then retries that batch with the same idempotency key,
   which writes nothing and returns the first batch's sequence number.
2. ``--workers`` processes each open the store themselves and race over all the orders of the
   run, each in its own random order, moving every order one step at a time along
   ``pending -> paid -> packed -> shipped -> delivered`` with ``storage.transition``: a
   conditional write that raises ``ConflictError`` when another worker moved the order first.
   Now and then a worker deliberately repeats a step it has just made, with the same
   idempotency key (as a worker that lost the reply would): the store recognises the key and
   writes nothing.
3. The parent reopens the store and checks, from the WAL itself, that every order of the run
   entered every state exactly once (read with ``storage.read_wal`` and each record's
   ``changes()``), that every step a worker made is in the WAL, and that every order ended
   in ``delivered``; it prints a summary and exits with status 1 if anything is off.

Idempotency keys, two ways (``--key-scope``):

* ``worker`` (the default): a step's key is derived from the order id, the target state and the
  worker making it, i.e. it identifies *this worker's attempt*. A worker's retry of its own
  step is answered quietly, while a worker that lost a race gets ``ConflictError``.
* ``step``: the key is derived from the order id and the target state only, shared by all
  workers. Then a worker that lost a race is *also* answered quietly (the store checks the key
  before the condition, and the key says "this step was made"), so no ``ConflictError`` is
  ever raised and a worker cannot tell whether its own call wrote; the summary counts those
  absorbed races from the WAL instead.

Either way the conditions alone make every step happen at most once; the key decides whether
a repeat is an error or a quiet success. Each run uses a fresh run id, so running it again on
the same directory adds a new set of orders.

To watch a longer run from the lookup service, give it more orders: ``--orders 20000`` keeps
four workers busy for about a minute here. Once the workers run, the parent prints their process
ids (``workers started: pids ...``).

Stopping it: SIGTERM or SIGINT (Ctrl-C) stops it cleanly. The parent sends SIGTERM to the
workers, each of which stops between two steps, closes its store and exits with 143; the parent
then releases the run's WAL hold, prints one line (``interrupted by SIGTERM: ...``) and exits
with 143 (SIGTERM) or 130 (SIGINT). A worker whose parent is gone (killed with SIGKILL) notices
within one step (the end of a pipe only the parent writes to), closes its store and exits; the
hold then stays, and ``rstmdb-storage release-hold DIR examples.multiprocess_workers``
releases it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import queue
import random
import secrets
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rstmdb_storage import ConflictError, Instance, Storage
from rstmdb_storage.changes import PutInstance

MACHINE = "order"
PIPELINE = ("pending", "paid", "packed", "shipped", "delivered")
NEXT_STATE = dict(itertools.pairwise(PIPELINE))
FINAL = PIPELINE[-1]
STEPS = len(PIPELINE) - 1
#: keeps the WAL records of the run through automatic compaction until the check has read them
WAL_HOLD = "examples.multiprocess_workers"
RETRY_RATE = 0.05  # share of steps a worker deliberately repeats (besides its first one)


def open_store(data_dir: str) -> Storage:
    return Storage.open(data_dir)


def order_ids(run: str, orders: int) -> list[str]:
    return [f"{run}-order-{n:05d}" for n in range(1, orders + 1)]


def step_key(order_id: str, target: str, worker: str, scope: str) -> str:
    """The idempotency key of moving *order_id* to *target* (see the module docstring)."""
    key = f"{order_id}->{target}"
    return key if scope == "step" else f"{key}@{worker}"


@dataclass(frozen=True)
class Job:
    data_dir: str
    run: str
    orders: int
    worker: str
    seed: int
    key_scope: str


# --- stopping on a signal -----------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_GRACE_S = 30  # how long stopped workers get to close their stores before SIGKILL


class Interrupted(Exception):
    """A stop signal arrived: stop, cleaning up on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)
        #: the exit statuses of the workers the parent stopped (none if none had started)
        self.worker_exits: list[int | None] = []


class ParentGone(Exception):
    """The parent process died without stopping this worker (killed with SIGKILL)."""


class Stopper:
    """Turns the first stop signal into :class:`Interrupted`, raised wherever the main thread
    is, except inside ``with STOPPER.deferred():`` blocks: an exception in the middle of a
    store's write or of its ``close`` would leave work for recovery, so the store calls run in
    such blocks and the signal raises when the block ends. Later signals are only noted: the
    clean-up that the first one started runs to its end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._raised = False
        self._depth = 0

    def install(self, *signums: int) -> None:
        self.signum, self._raised, self._depth = None, False, 0  # a forked worker starts afresh
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        self._raise_if_due()

    def _raise_if_due(self) -> None:
        if self.signum is not None and not self._raised and not self._depth:
            self._raised = True
            raise Interrupted(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self._raise_if_due()


STOPPER = Stopper()


@contextmanager
def opened(data_dir: str) -> Iterator[Storage]:
    """The store, opened and closed with stop signals deferred; what runs in between may be
    interrupted (the readers here, and the worker between two steps)."""
    storage: Storage | None = None
    try:
        with STOPPER.deferred():
            storage = open_store(data_dir)
        yield storage
    finally:
        if storage is not None:
            with STOPPER.deferred():
                storage.close()


# --- the worker processes -----------------------------------------------------------------------


def worker_main(job: Job, start: Any, results: Any, parent_alive: Any, parent_end: Any) -> None:
    """Entry point of a worker process, started with the stop signals blocked: report its
    counts (or its traceback) on *results*.

    SIGTERM (from the parent, when it is stopped) ends the worker between two steps, its store
    closed, with status 143. Ctrl-C in a terminal reaches the whole process group: the workers
    ignore SIGINT, and the parent, which handles it, stops them. *parent_alive* is the read end
    of a pipe whose write end only the parent holds (*parent_end*, which a forked worker
    inherited and closes): it reads as ready, at its end, once the parent is gone."""
    parent_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    STOPPER.install(signal.SIGTERM)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a SIGTERM meanwhile raises
        results.put(("ok", job.worker, work(job, start, parent_alive)))
    except Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the store was closed on the way out
    except ParentGone as gone:
        sys.stderr.write(f"{job.worker}: {gone}\n")  # one write: the workers' lines stay whole
        sys.stderr.flush()
        sys.exit(1)  # nobody is left to report to
    except BaseException:
        start.abort()  # the others stop waiting for this one
        results.put(("error", job.worker, traceback.format_exc()))
        sys.exit(1)  # the parent shows the traceback


def work(job: Job, start: Any, parent_alive: Any) -> dict[str, int]:
    rng = random.Random(job.seed)
    stats = Counter(steps=0, conflicts=0, retries=0, retries_refused=0)
    with opened(job.data_dir) as storage:  # every process opens the store itself
        start.wait(timeout=60)  # all workers start racing at once
        todo = order_ids(job.run, job.orders)
        while todo:
            rng.shuffle(todo)
            unfinished = []
            for order_id in todo:
                if parent_alive.poll():  # nothing is ever written: ready means end of file
                    raise ParentGone("the parent process is gone; stopping")
                with STOPPER.deferred():  # SIGTERM stops the worker between two steps
                    if take_step(storage, order_id, job, rng, stats):
                        unfinished.append(order_id)
            todo = unfinished
    return dict(stats)


def take_step(
    storage: Storage, order_id: str, job: Job, rng: random.Random, stats: Counter[str]
) -> bool:
    """Try to move *order_id* one step on, now and then repeating the step; False when it was
    already delivered."""
    order = storage.get_instance(order_id)
    if order is None:
        raise RuntimeError(f"order {order_id} vanished")
    target = NEXT_STATE.get(order.state)
    if target is None:
        return False  # delivered: nothing left to do for this order
    if advance(storage, order, target, job, stats) and (
        stats["steps"] == 1 or rng.random() < RETRY_RATE
    ):
        # A deliberate retry, as after a lost reply: the same call, the same key.
        stats["retries"] += 1
        if not advance(storage, order, target, job, stats, retry=True):
            stats["retries_refused"] += 1
    return True


def advance(
    storage: Storage,
    order: Instance,
    target: str,
    job: Job,
    stats: Counter[str],
    retry: bool = False,
) -> bool:
    """Try one step; True when the store answered without a conflict."""
    try:
        storage.transition(
            order.id,
            order.state,
            target,
            event_id=f"{order.id}->{target}@{job.worker}",
            idempotency_key=step_key(order.id, target, job.worker, job.key_scope),
        )
    except ConflictError:
        if not retry:
            stats["conflicts"] += 1  # another worker moved it first
        return False
    if not retry:
        stats["steps"] += 1
    return True


# --- the parent ---------------------------------------------------------------------------------


def seed(storage: Storage, run: str, orders: int) -> tuple[int, int]:
    """Put the run's orders in one batch, then retry it; return (its sequence, the retry's)."""
    created = int(time.time() * 1000)

    def put_all(key: str) -> int | None:
        with storage.batch(idempotency_key=key) as batch:
            for n, order_id in enumerate(order_ids(run, orders), 1):
                batch.put_instance(
                    Instance(
                        id=order_id,
                        machine=MACHINE,
                        version=1,
                        state="pending",
                        ctx={"total": round(9.5 + n % 40 * 2.25, 2), "items": 1 + n % 4},
                        metadata={"run": run, "customer": f"customer-{n % 7}", "priority": n % 3},
                        created_at=created,
                    ),
                    expected_seq=0,  # create only
                )
        return batch.seq

    first = put_all(f"{run}:seed")
    again = put_all(f"{run}:seed")
    assert first is not None and again is not None
    return first, again


def run_workers(jobs: list[Job]) -> list[dict[str, int]]:
    """Run one process per job; raise if any of them fails. When a stop signal interrupts it,
    stop the workers first (their exit statuses go on the :class:`Interrupted` raised)."""
    mp = multiprocessing.get_context()
    start = mp.Barrier(len(jobs))
    results = mp.Queue()
    parent_alive, parent_end = mp.Pipe(duplex=False)
    processes = [
        mp.Process(
            target=worker_main,
            args=(job, start, results, parent_alive, parent_end),
            name=job.worker,
        )
        for job in jobs
    ]
    reports: dict[str, dict[str, int]] = {}
    errors: list[str] = []
    try:
        # Started with the stop signals blocked, so that a worker (a fork inherits the parent's
        # handlers) installs its own before it takes one; one that came meanwhile to the parent
        # raises here, once they are unblocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for process in processes:
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        print(f"workers started: pids {' '.join(str(p.pid) for p in processes)}", flush=True)
        while len(reports) + len(errors) < len(jobs):
            try:
                status, worker, payload = results.get(timeout=1.0)
            except queue.Empty:
                if not any(process.is_alive() for process in processes):
                    errors.append("a worker process died without reporting")
                    break
                continue
            if status == "ok":
                reports[worker] = payload
            else:
                errors.append(f"{worker} failed:\n{payload}")
        stop_workers(processes, terminate=bool(errors))
    except Interrupted as interrupted:
        interrupted.worker_exits = stop_workers(processes, terminate=True)
        raise
    except BaseException:
        stop_workers(processes, terminate=True)
        raise
    finally:
        parent_alive.close()
        parent_end.close()  # only now: the workers stopped, and this tells them nothing
    if errors:
        raise RuntimeError("\n".join(errors))
    return [reports[job.worker] for job in jobs]


def stop_workers(processes: list[Any], terminate: bool) -> list[int | None]:
    """Wait for the workers that started to end, after SIGTERM when *terminate*; SIGKILL any
    still running after WORKER_GRACE_S. Return their exit statuses."""
    started = [process for process in processes if process.pid is not None]
    if terminate:
        for process in started:
            process.terminate()
    deadline = time.monotonic() + WORKER_GRACE_S
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in started:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in started]


def check_wal(storage: Storage, first_seq: int, ids: set[str]) -> tuple[Counter[str], int]:
    """How many times each (order, state) of the run was written, from the WAL records from
    *first_seq* on; and how many of those records there are."""
    written: Counter[str] = Counter()
    records = 0
    for record in storage.read_wal(first_seq):
        records += 1
        for change in record.changes():
            if isinstance(change, PutInstance) and change.id in ids:
                _, state, _ = change.indexed_fields()
                written[f"{change.id} {state}"] += 1
    return written, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--orders", type=int, default=2000, help="orders to move (default 2000)")
    parser.add_argument("--data-dir", default="rstmdb-data", help="default ./rstmdb-data")
    parser.add_argument(
        "--key-scope",
        choices=("worker", "step"),
        default="worker",
        help="idempotency key per worker's step (default) or per step, shared by all workers",
    )
    parser.add_argument("--json", action="store_true", help="end with the summary as JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.orders < 1:
        parser.error("--workers and --orders must be at least 1")

    STOPPER.install(*STOP_SIGNALS)
    try:
        return run_example(args)
    except Interrupted as interrupted:
        exits = interrupted.worker_exits
        workers = (
            f"stopped {len(exits)} workers (exit status {' '.join(map(str, exits))})"
            if exits
            else "no workers were running"
        )
        print(
            f"interrupted by {interrupted.name}: {workers}; the WAL hold {WAL_HOLD!r} is released",
            flush=True,
        )
        return 128 + interrupted.signum


def run_example(args: argparse.Namespace) -> int:
    run = f"r{time.strftime('%H%M%S')}{secrets.token_hex(2)}"
    ids = order_ids(run, args.orders)
    held = False
    try:
        # One step as far as a stop signal goes: the hold taken and the orders seeded, or not.
        with STOPPER.deferred(), open_store(args.data_dir) as storage:
            first_seq = storage.applied_seq + 1
            storage.hold_wal(WAL_HOLD, first_seq)
            held = True
            seeded, retried = seed(storage, run, args.orders)
            print(
                f"run {run}: seeded {args.orders} orders in {args.data_dir} as one batch, WAL "
                f"sequence {seeded}; the same batch again (same idempotency key) got sequence "
                f"{retried} and wrote nothing (applied sequence still {storage.applied_seq})"
            )
        # The parent holds no open store while the workers run (they open their own).

        jobs = [
            Job(
                args.data_dir, run, args.orders, f"worker-{n}", secrets.randbits(32), args.key_scope
            )
            for n in range(1, args.workers + 1)
        ]
        started = time.monotonic()
        reports = run_workers(jobs)
        elapsed = time.monotonic() - started
        for job, report in zip(jobs, reports, strict=True):
            print(
                f"  {job.worker}: {report['steps']} steps, {report['conflicts']} conflicts, "
                f"{report['retries']} deliberate retries"
            )

        with opened(args.data_dir) as storage:
            written, records = check_wal(storage, first_seq, set(ids))
            applied = storage.applied_seq
            finals = (storage.get_instance(order_id) for order_id in ids)
            run_counts = Counter(order.state if order else "(missing)" for order in finals)
            store_counts = storage.count_by_state(MACHINE)
    finally:
        if held:  # however this ended: the hold must not outlive the run
            with STOPPER.deferred(), open_store(args.data_dir) as storage:
                storage.release_wal(WAL_HOLD)

    problems: list[str] = []

    expected = {f"{i} {state}" for i in ids for state in PIPELINE}
    missing = sorted(expected - written.keys())
    repeated = sorted(key for key, times in written.items() if times > 1)
    steps_written = sum(written.values()) - len(ids)  # every write but the seed
    steps = sum(r["steps"] for r in reports)
    conflicts = sum(r["conflicts"] for r in reports)
    retries = sum(r["retries"] for r in reports)
    refused = sum(r["retries_refused"] for r in reports)
    absorbed = steps - steps_written  # answered without an error, yet nothing was written
    if missing:
        problems.append(f"{len(missing)} (order, state) pairs never written, e.g. {missing[0]}")
    if repeated:
        problems.append(f"{len(repeated)} (order, state) pairs written twice, e.g. {repeated[0]}")
    if run_counts != {FINAL: args.orders}:
        problems.append(f"not every order is {FINAL}: {dict(run_counts)}")
    if refused:
        problems.append(f"{refused} deliberate retries were refused with ConflictError")
    if args.key_scope == "worker" and absorbed:
        problems.append(f"{absorbed} steps reported made are not in the WAL")
    if seeded != retried:
        problems.append(f"the retried seed batch got sequence {retried}, not {seeded}")

    summary: dict[str, Any] = {
        "run": run,
        "workers": args.workers,
        "orders": args.orders,
        "key_scope": args.key_scope,
        "seconds": round(elapsed, 3),
        "run_counts": dict(run_counts),
        "count_by_state": store_counts,
        "transitions_written": steps_written,
        "transitions_expected": args.orders * STEPS,
        "conflicts": conflicts,
        "absorbed_by_key": absorbed,
        "deliberate_retries": retries,
        "wal_records_run": records,
        "applied_seq": applied,
        "first_seq": first_seq,
        "exactly_once": not (missing or repeated or run_counts != {FINAL: args.orders}),
        "ok": not problems,
        "problems": problems,
    }
    print(f"{args.workers} workers moved {args.orders} orders in {elapsed:.2f} s")
    print(f"  orders of this run per state: {dict(run_counts)}")
    print(f"  count_by_state({MACHINE!r}) over the whole store: {store_counts}")
    print(
        f"  transitions written: {steps_written} (expected {args.orders} x {STEPS} = "
        f"{args.orders * STEPS}), {steps_written / elapsed:.0f}/s"
    )
    print(f"  conflicts (another worker won the race): {conflicts}")
    if args.key_scope == "step":
        print(f"  lost races answered quietly by the shared idempotency key: {absorbed}")
    print(
        f"  deliberate retries with the same key: {retries}, {refused} refused"
        + ("" if repeated else "; the WAL shows that none of them wrote")
    )
    print(
        f"  WAL records: {records} since this run began (sequences {first_seq}..{applied}), "
        f"{applied} in the store"
    )
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}")
    else:
        print(f"OK: every order of run {run} entered each state exactly once and is {FINAL}")
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    sys.stdout.flush()
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
