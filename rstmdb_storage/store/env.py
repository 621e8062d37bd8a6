"""The LMDB environment of a data directory, shared by everything in one process.

LMDB allows one open environment per path per process (py-lmdb #412), forbids using it after
``fork()`` (lmdb.h, "Caveats"), and can fail to open while another process opens or closes it at
the same moment (py-lmdb #289, #309, #340). So:

* one :class:`LmdbEnvironment` per data directory per process, reference-counted and shared by
  every :class:`~rstmdb_storage.Storage` on it, keyed by the directory's real path;
* around a fork, no LMDB call of ours is in flight (:class:`ForkGate`); the child marks every
  inherited environment *stale*, and its next use closes the inherited handle and opens a
  fresh one, while the parent carries on; no read transaction is cached
  (``max_spare_txns=0``), so none can cross a fork;
* opening happens under the directory's open lock (:mod:`.locks`), retried with a short
  backoff on "Invalid argument", and every process with the environment open holds a shared
  lock on its users lock, so that recovery, which may replace ``data.mdb``, never races
  another opener or user;
* ``sync=False``: the WAL carries durability, LMDB is flushed at checkpoints (see
  :mod:`rstmdb_storage.maintenance`); ``writemap`` is never used (a full disk then kills the process
  with SIGBUS instead of raising);
* the map grows geometrically when full, and adopts a size grown by another process; either
  happens with no transaction of this process open (the write mutex and the gate keep them
  out), as LMDB requires;
* the calls on every write and lookup (``begin``, ``get``, ``put``, ``replace``, ``delete``)
  pass py-lmdb their arguments by position: it parses keywords slowly (``txn.get(key,
  db=db)`` 0.45 us against 0.27 for ``txn.get(key, None, db)``; ``env.begin(db=db)`` 0.64
  against 0.47 for ``env.begin(db)``), and a put makes five such calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import lmdb

from ..config import ALL_DATABASES, DB_INSTANCES, DB_META, INDEXES_DIR, StorageConfig
from ..errors import IndexesCorruptionError, StorageError, StorageFullError
from ..failpoints import failpoint
from ..fsutil import fsync_dir
from .locks import open_lock, users_lock

MAX_DATABASES = 16
_OPEN_ATTEMPTS = 8
_MAP_GROWTH_ATTEMPTS = 24
_GROW_AT = 0.8  # of the map in use
_EARLY_GROWTH_WAIT = 0.05  # seconds an early growth waits for the reads in flight

T = TypeVar("T")

_registry: dict[str, LmdbEnvironment] = {}
_registry_lock = threading.Lock()


class LmdbEnvironment:
    """One open LMDB environment and its named sub-databases."""

    def __init__(self, path: Path, config: StorageConfig) -> None:
        self.path = path
        self.pid = os.getpid()
        self.stale = False
        self.refs = 0
        #: LMDB write transactions are bound to a thread; this serialises ours in-process
        #: (LMDB's own mutex serialises processes), and every change of the map size.
        #: Reentrant: a read that must adopt a grown map takes it, maybe inside a write.
        self.write_mutex = threading.RLock()
        #: counts threads inside LMDB calls outside the write mutex (see :class:`ForkGate`)
        self.gate = ForkGate()
        self.read_only = config.read_only
        self._users_fd = users_lock(path, config)
        try:
            self.env, self.dbs = _open(path, config)
        except BaseException:
            self._release_users_lock()
            raise
        self.instances = self.dbs[DB_INSTANCES]
        self.meta = self.dbs[DB_META]

    # --- transactions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction; adopts a map grown by another process. LMDB's own
        errors inside it become typed ones (:func:`lmdb_error`)."""
        self.gate.enter()
        try:
            txn = self._begin(write=False)
            try:
                yield txn
            except lmdb.Error as exc:
                raise lmdb_error(self.path, exc, "reading") from exc
            finally:
                txn.abort()
        finally:
            self.gate.leave()

    def lookup(self, key: bytes) -> bytes | None:
        """``instances[key]``, in a read transaction of its own: the hot path of every lookup,
        with :class:`ForkGate`'s enter and leave inlined. A fork waiting at the gate, or a map
        grown by another process, sends it the slow way, through :meth:`read`."""
        gate = self.gate
        gate.active.append(None)
        try:
            if not gate.closing:
                with self.env.begin(self.instances) as txn:  # (db): see the docstring
                    return txn.get(key)
        except lmdb.MapResizedError:
            pass  # the slow path adopts the new size
        except lmdb.Error as exc:
            raise lmdb_error(self.path, exc, "reading") from exc
        finally:
            gate.active.pop()  # leave(), inlined
            if gate.closing:
                gate.wake_closers()
        with self.read() as txn:
            return txn.get(key, db=self.instances)

    def begin_write(self) -> lmdb.Transaction:
        """Begin a write transaction; the caller holds :attr:`write_mutex`."""
        return self._begin(write=True)

    def begin_nested(self, parent: lmdb.Transaction) -> lmdb.Transaction:
        """A write transaction nested in *parent*: its changes are thrown away by ``abort()``
        and leave *parent* as it was."""
        return self.env.begin(write=True, parent=parent)

    def copy_to(self, fd: int, txn: lmdb.Transaction) -> None:
        """Write a compacted copy of the environment as *txn* sees it to the descriptor *fd*."""
        self.env.copyfd(fd, compact=True, txn=txn)

    def reader_check(self) -> None:
        """Clear the reader slots of processes that are gone (PITFALLS 5: now and then)."""
        self.env.reader_check()

    def _begin(self, write: bool) -> lmdb.Transaction:
        """Begin a transaction: a write holding :attr:`write_mutex`, a read inside the gate."""
        for _ in range(_OPEN_ATTEMPTS):
            try:
                return self.env.begin(None, None, write)  # (db, parent, write)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                if write:
                    self.set_map_size(0)
                    continue  # a reader must first leave the gate that the change closes
                self.gate.leave()
                try:
                    with self.write_mutex:
                        self.set_map_size(0)
                finally:
                    self.gate.enter()
            except lmdb.ReadersFullError:
                self.env.reader_check()  # slots of killed processes
        return self.env.begin(write=write)

    def set_map_size(self, size: int, wait: float | None = None) -> bool:
        """Set the map size (0: adopt the size another process grew it to) while no
        transaction of this process is open, as LMDB requires (py-lmdb also invalidates every
        open transaction, #475); return whether it was set. Call holding :attr:`write_mutex`,
        which keeps write transactions out, with no transaction open in this thread: closing
        the gate waits for the reads in flight (at most *wait* seconds, when given) and holds
        new ones back."""
        if not self.gate.close(wait):
            return False
        try:
            self.env.set_mapsize(size)
        finally:
            self.gate.open()
        return True

    def grow(self, attempt: int) -> None:
        """Double the map size after a ``MapFullError`` aborted a write (attempt 1, 2, …).
        Call holding :attr:`write_mutex` with no transaction open in this thread."""
        failpoint("lmdb.before_grow")
        current = self.env.info()["map_size"]
        if attempt > _MAP_GROWTH_ATTEMPTS:
            raise StorageFullError(
                f"{self.path}: the LMDB map is full at {current} bytes and doubling it "
                f"{_MAP_GROWTH_ATTEMPTS} times did not make room for the write"
            )
        self._double(current, wait=None)

    def grow_if_nearly_full(self) -> bool:
        """Double the map when its used pages pass 80% of it (PITFALLS 4: grow early, not
        only when a write fails); return whether it grew. Call holding :attr:`write_mutex`
        with no transaction open in this thread. A long read in flight (a snapshot's copy)
        makes it give up rather than hold this process's writes back until the read ends;
        the next call tries again."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        if used < info["map_size"] * _GROW_AT:
            return False
        return self._double(info["map_size"], wait=_EARLY_GROWTH_WAIT)

    def _double(self, current: int, wait: float | None) -> bool:
        try:
            return self.set_map_size(current * 2, wait)
        except lmdb.Error as exc:
            raise StorageFullError(
                f"{self.path}: could not grow the LMDB map beyond {current} bytes ({exc})"
            ) from exc

    def stats(self) -> dict[str, object]:
        """What ``mdb_stat -e -r -a`` reports: the map, each named table, the reader table
        (with slots of processes that are gone counted as stale), read in one transaction."""
        with self.read() as txn:
            info = self.env.info()
            page_size = self.env.stat()["psize"]
            tables = {}
            for name, db in self.dbs.items():
                stat = txn.stat(db)
                pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
                tables[name.decode()] = {**stat, "bytes": pages * page_size}
        rows = (line.split() for line in self.env.readers().splitlines()[1:])
        pids = [int(row[0]) for row in rows if row and row[0].isdigit()]
        return {
            "page_size": page_size,
            "map_size": info["map_size"],
            "map_used": (info["last_pgno"] + 1) * page_size,
            "last_txnid": info["last_txnid"],
            "tables": tables,
            "readers": {
                "max": info["max_readers"],
                "high_water": info["num_readers"],  # slots ever taken, not in use now
                "active": len(pids),
                "stale": sum(1 for pid in set(pids) if not _alive(pid)),
            },
        }

    def alone(self) -> bool:
        """Whether no other process has the environment open. When none has, the shared
        lock on ``users.lock`` is exclusive until :meth:`share` (an opener waits)."""
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            # A failed conversion may have dropped the shared lock first (flock(2)).
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            return False

    def share(self) -> None:
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold every other thread's reads at the gate for the body, while the calling thread
        goes through it (a heal replays into the file it put in place). Call holding
        :attr:`write_mutex` with no transaction open in this thread."""
        self.gate.close()
        self.gate.owner = threading.get_ident()
        try:
            yield
        finally:
            self.gate.open()

    def reopen(self, config: StorageConfig, replace: Callable[[], T]) -> T:
        """Close the LMDB handle, ``replace()`` the file, open the new one; return what
        ``replace`` did. Call :meth:`paused`, alone (:meth:`alone`)."""
        self.env.close()
        try:
            return replace()
        finally:
            self.env, self.dbs = _open(self.path, config)
            self.instances = self.dbs[DB_INSTANCES]
            self.meta = self.dbs[DB_META]

    def reopen_if_panicked(self, config: StorageConfig) -> bool:
        """Open the environment again if LMDB has refused every transaction since a commit
        failed writing its meta page (``MDB_PANIC``); return whether it did. Call holding
        :attr:`write_mutex` with no transaction open in this thread."""
        try:
            self.env.begin().abort()
            return False
        except lmdb.PanicError:
            pass
        except lmdb.Error:
            return False  # another trouble, which the caller reports
        with self.paused():
            self.reopen(config, lambda: None)
        return True

    def sync(self) -> None:
        """Flush the environment to disk (``fdatasync`` of ``data.mdb``)."""
        self.gate.enter()
        try:
            failpoint("lmdb.sync")
            self.env.sync(True)
        finally:
            self.gate.leave()

    def close(self) -> None:
        try:
            self.env.close()
        finally:
            self._release_users_lock()

    def _release_users_lock(self) -> None:
        if self._users_fd >= 0:
            os.close(self._users_fd)  # the lock goes with the last descriptor (forks share it)
            self._users_fd = -1


class ForkGate:
    """Counts the threads inside LMDB calls so that ``fork()``, or a change of the map size,
    can wait until none is.

    A forked child must close the environment it inherited before it can open its own, and
    py-lmdb's ``close()`` waits for every LMDB call that was in flight when the parent forked:
    those threads do not exist in the child, so it would wait forever. The before-fork hook
    therefore takes every environment's write mutex (all write transactions run under it) and
    closes this gate, which waits for the reads and syncs in flight to finish. A change of the
    map size does the same (:meth:`LmdbEnvironment.set_map_size`): LMDB remaps the file under
    any transaction left open.

    Readers register in a deque, whose ``append`` and ``pop`` are atomic under the GIL and
    cheaper than a lock; a reader that finds the gate closing backs out and waits. Closing
    nests (a map growth inside a heal), and the thread that holds it closed for a heal
    (:meth:`LmdbEnvironment.replacing_file`) goes through it.
    """

    __slots__ = ("_changed", "active", "closing", "owner", "pinned")

    def __init__(self) -> None:
        self.active: deque[None] = deque()
        #: threads holding a read open across calls (a ``Reader``), and how many each holds
        self.pinned: dict[int, int] = {}
        #: how many closes are in force (0: open)
        self.closing = 0
        #: the thread that passes a closed gate, or None
        self.owner: int | None = None
        self._changed = threading.Condition()

    def enter(self) -> None:
        self.active.append(None)
        # Checked after registering, so fork() either sees us or we see it.
        if self.closing and self.owner != threading.get_ident():
            self.leave()
            with self._changed:
                self._changed.wait_for(lambda: not self.closing)
            self.enter()

    def leave(self) -> None:
        self.active.pop()
        if self.closing:
            self.wake_closers()

    def wake_closers(self) -> None:
        """Tell a close waiting for the threads inside that one left."""
        with self._changed:
            self._changed.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Hold new entries back and wait for the threads inside to leave; return True. With
        a *timeout*, give up when they are still inside by then: open again, return False."""
        # Never for the calling thread's own readers: they cannot leave while it waits (a
        # fork inside a reader's with block; the child drops the inherited handle anyway).
        own = self.pinned.get(threading.get_ident(), 0)
        with self._changed:
            self.closing += 1
            if self._changed.wait_for(lambda: len(self.active) <= own, timeout):
                return True
        self.open()
        return False

    def open(self) -> None:
        with self._changed:
            self.closing -= 1
            if not self.closing:
                self.owner = None
            self._changed.notify_all()


def acquire(config: StorageConfig, lock_held: bool = False) -> LmdbEnvironment:
    """The environment of *config*'s data directory in this process, opened if needed (under
    :func:`open_lock`, unless the caller holds it: *lock_held*)."""
    if not lock_held and not config.read_only:
        with open_lock(config):
            return acquire(config, lock_held=True)
    path = config.path / INDEXES_DIR
    key = os.path.realpath(path)
    with _registry_lock:
        env = _registry.get(key)
        if env is None or env.stale:
            if env is not None:
                _drop_inherited(env)
            env = LmdbEnvironment(path, config)
            _registry[key] = env
        elif env.read_only and not config.read_only:
            raise StorageError(
                f"{path} is open read-only in this process; close those stores before opening "
                f"it for writing"
            )
        env.refs += 1
        return env


def release(env: LmdbEnvironment) -> None:
    """Drop one reference; close the environment when nobody in this process uses it."""
    with _registry_lock:
        env.refs -= 1
        if env.refs > 0 or env.stale:
            return
        key = os.path.realpath(env.path)
        if _registry.get(key) is env:
            del _registry[key]
    env.close()


def _drop_inherited(env: LmdbEnvironment) -> None:
    # Closing the inherited handle in the child is what lets py-lmdb open the path again; LMDB's
    # close only clears reader slots owned by the *calling* pid, so the parent is unaffected.
    with contextlib.suppress(lmdb.Error):
        env.close()


def _before_fork() -> None:
    _registry_lock.acquire()
    for env in _live_environments():
        env.write_mutex.acquire()
        env.gate.close()


def _after_fork_in_parent() -> None:
    for env in _live_environments():
        env.gate.open()
        env.write_mutex.release()
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for env in _registry.values():
        env.stale = True  # closed and reopened on the child's next use


def _live_environments() -> list[LmdbEnvironment]:
    pid = os.getpid()
    return [env for env in _registry.values() if not env.stale and env.pid == pid]


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def _open(path: Path, config: StorageConfig) -> tuple[lmdb.Environment, dict[bytes, object]]:
    try:
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                return _open_once(path, config)
            except lmdb.InvalidParameterError:
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.005 * 2**attempt)  # lmdb.h: opening races another open/close
        raise StorageError(f"{path}: could not open the LMDB environment")
    except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as exc:
        raise IndexesCorruptionError(
            f"{path} is not a readable LMDB environment ({exc})",
            path=str(path),
        ) from exc
    except lmdb.Error as exc:
        raise lmdb_error(path, exc, "opening") from exc


def _open_once(path: Path, config: StorageConfig) -> tuple[lmdb.Environment, dict[bytes, object]]:
    read_only = config.read_only
    created = not (path / "data.mdb").exists()
    if read_only and created:
        raise StorageError(f"{path} holds no LMDB environment to open read-only")
    env = lmdb.open(
        str(path),
        map_size=_opening_map_size(path / "data.mdb", config.map_size),
        subdir=True,
        max_dbs=MAX_DATABASES,
        max_readers=config.max_readers,
        max_spare_txns=0,
        sync=False,
        metasync=False,
        writemap=False,
        readahead=False,
        readonly=read_only,
        # Without write access to the lock file there is no reader table: only safe when
        # nobody writes, which is so when nobody can.
        lock=not read_only or _writable(path / "lock.mdb"),
        create=not read_only,
        mode=config.file_mode,
    )
    try:
        if read_only:
            # py-lmdb keeps handles opened in a read transaction of our own only until it
            # ends; without one it opens them in a transaction it commits.
            return env, {name: env.open_db(name, create=False) for name in ALL_DATABASES}
        env.reader_check()
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name, txn=txn, create=True) for name in ALL_DATABASES}
        if created:
            env.sync(True)
            fsync_dir(path)  # the new data.mdb and lock.mdb are durable names from now on
    except BaseException:
        env.close()
        raise
    return env, dbs


def _opening_map_size(data_file: Path, configured: int) -> int:
    """The map to open with: *configured*, doubled as :meth:`LmdbEnvironment.grow_if_nearly_full`
    would double it until the file fills less than :data:`_GROW_AT` of it.

    A store that has grown past its configured map would otherwise be opened with a map as
    large as its file, and grown by the first background pass: a remap, which drops every page
    this process had mapped (opening a 10M-instance store, lookups in its first seconds made
    122k/s against 151k/s with no growth)."""
    try:
        size = data_file.stat().st_size
    except FileNotFoundError:
        return configured
    map_size = configured
    while size >= map_size * _GROW_AT:
        map_size *= 2
    return map_size


def lmdb_error(path: Path, exc: lmdb.Error, doing: str) -> StorageError:
    """The typed error for an LMDB error met while *doing* ("reading", "writing"): damage LMDB
    noticed itself (it has no page checksums, so it notices only broken structure) is an
    :class:`IndexesCorruptionError`; a full disk, however LMDB spells it, a
    :class:`StorageFullError`; anything else a :class:`StorageError`."""
    if isinstance(exc, lmdb.CorruptedError | lmdb.PageNotFoundError | lmdb.InvalidError):
        return IndexesCorruptionError(
            f"{path} is damaged: LMDB reports {exc}",
            path=str(path),
        )
    full = isinstance(exc, lmdb.DiskError) or any(words in str(exc) for words in _FULL_DISK)
    # LMDB turns a short write of its pages (ENOSPC halfway) into EIO: ask the filesystem.
    if full or ("Input/output error" in str(exc) and _nearly_full(path)):
        return StorageFullError(f"{path}: no space left on the device while {doing} ({exc})")
    return StorageError(f"{path}: {doing} the LMDB environment failed ({exc})")


#: how py-lmdb spells ENOSPC and EDQUOT when it raises a plain lmdb.Error
_FULL_DISK = ("No space left on device", "Disk quota exceeded")
#: free space below which an I/O error of LMDB's is taken for a full disk
_NEARLY_FULL = 1 << 20


def _nearly_full(path: Path) -> bool:
    try:
        found = os.statvfs(path)
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < _NEARLY_FULL


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _writable(path: Path) -> bool:
    if path.exists():
        return os.access(path, os.W_OK)
    return os.access(path.parent, os.W_OK)
