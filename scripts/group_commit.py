"""Group commit across writer processes, on this disk and on a simulated slow one.

N processes (1, 2, 4 by default) open one data directory with the default config (an
``fdatasync`` for every acknowledged write) and make single durable puts of their own ids,
all starting together. For each N it prints the puts per second of all processes together
and how many ``fdatasync`` calls they made: with group commit one sync serves several writes.

``--sync-delay-ms D`` adds D milliseconds to every ``fdatasync`` in the writer processes, as a
slower disk (a cloud volume, a spinning disk) would. Where the sync is the bottleneck the rate
grows with the number of writers; on a fast disk with 2 cores, Python's CPU per write is the
bottleneck instead. Run it from the repository root::

    python scripts/group_commit.py                    # this disk
    python scripts/group_commit.py --sync-delay-ms 2  # a simulated 2 ms sync
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def writer(data_dir: str, name: str, puts: int, delay_s: float, start, ready, syncs) -> None:
    """One writer process: open, say so, wait for the start, put, report its syncs."""
    real_fdatasync, made = os.fdatasync, [0]

    def fdatasync(fd: int) -> None:
        made[0] += 1
        real_fdatasync(fd)
        if delay_s:
            time.sleep(delay_s)  # the simulated disk, not a synchronisation

    os.fdatasync = fdatasync
    from rstmdb_storage import Instance, Storage, StorageConfig

    with Storage.open(StorageConfig(data_dir=data_dir, snapshot_interval=0)) as storage:
        ready.put(name)
        start.wait()
        for i in range(puts):
            storage.put_instance(
                Instance(id=f"{name}-{i}", machine="order", version=1, state="pending")
            )
    syncs.put(made[0])


def run(processes: int, puts: int, delay_s: float, workdir: Path) -> tuple[float, int]:
    data_dir = workdir / f"store-{processes}"
    shutil.rmtree(data_dir, ignore_errors=True)
    context = multiprocessing.get_context("spawn")
    start, ready, syncs = context.Event(), context.Queue(), context.Queue()
    procs = [
        context.Process(
            target=writer, args=(str(data_dir), f"p{n}", puts, delay_s, start, ready, syncs)
        )
        for n in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get()  # every process has the store open before the clock starts
    began = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - began
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit("a writer process failed")
    from rstmdb_storage import Storage

    with Storage.open(data_dir) as storage:
        assert storage.count_instances() == processes * puts
    return processes * puts / elapsed, sum(syncs.get() for _ in procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--puts", type=int, default=2000, help="puts of all processes together")
    parser.add_argument("--sync-delay-ms", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    delay_s = args.sync_delay_ms / 1000
    with tempfile.TemporaryDirectory(prefix="rstmdb-group-commit-") as tmp:
        print(
            f"sync delay {args.sync_delay_ms} ms, {args.puts} puts per run, medians of "
            f"{args.repeats}, {os.cpu_count()} cores"
        )
        base = None
        for processes in args.processes:
            results = [
                run(processes, args.puts // processes, delay_s, Path(tmp))
                for _ in range(args.repeats)
            ]
            rate = statistics.median(r for r, _ in results)
            syncs = statistics.median(s for _, s in results)
            base = base or rate
            print(
                f"  {processes} process(es): {rate:8,.0f} puts/s ({rate / base:.2f}x), "
                f"{syncs:,.0f} fdatasyncs for {args.puts} puts"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
