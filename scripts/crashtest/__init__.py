"""The crash harness as a tool: kill writer processes at named failpoints and at random
moments, and check after each trial that no acknowledged write is lost.

Run it from the repository root::

    python scripts/crashtest.py                  # 100 trials (about 45 s on two cores)
    python scripts/crashtest.py --trials 10000   # the long form (1000 trials: about 7 min)
    python scripts/crashtest.py --seed 7 --writers 2 --data-dir /tmp/store --quick

Each trial starts 1 to ``--writers`` writer processes on one data directory, reused across
trials like a long-running store. The writers make plain puts, batches, transitions,
compare-and-set puts and deletes (``expected_seq``), deletes, snapshots, compactions,
checkpoints, backups and point-in-time restores, with WAL segments of 64 KiB so that they
rotate every few dozen writes; now and then a trial repairs a torn WAL tail instead. Writers die
by SIGKILL at a failpoint (``RSTMDB_FAILPOINTS`` in their environment, see
``rstmdb_storage/failpoints.py``) or when the parent decides, after reading a random number of
their acknowledgements (no sleeps: the kill lands wherever the writer then is).

Each writer prints one JSON line per acknowledged write (op, id, seq, content digest); the
parent keeps the ledger. After each trial it reopens the store and checks that every
acknowledged write is there with exactly its content unless a later acknowledged one replaced
or deleted it; that a write in flight is there whole or not at all, at a sequence number nobody
acknowledged, and that each such number is one write in flight; that the WAL is gap-free from
its first segment to ``applied_seq`` and each record changes the ids the ledger says; that
``verify()`` finds nothing; that every backup or restore made is refused as unfinished or holds
the ledger's state at its sequence number; and that opening never fails.

It uses only the public API. The exit status is 1 when anything was lost or found wrong.

Modules: :mod:`crashtest.workload` (the writer process, the store's configuration, the content
digest), :mod:`crashtest.trials` (planning, starting and killing the writers),
:mod:`crashtest.check` (the ledger and the checks), :mod:`crashtest.cli` (options, figures).
"""
