"""Group commit across the threads of one process: a leader writes for its followers.

A durable write spends most of its time in ``fdatasync``, with the GIL released. A thread that
comes to write while another thread's write is in flight queues its request here instead of
waiting for the write lock on its own; when the write in flight ends, the first queued thread
becomes the *leader* and writes every queued request at once (in the order they came: one WAL
write of them all, one ``fdatasync``, one LMDB transaction, see :mod:`rstmdb_storage.writes`), then
wakes each of them with its own result. A thread that finds no write in flight leads at once, a
group of one: a lone writer pays two uncontended lock round trips for the queue.

Only the members of a group are woken when it is done, and only the next leader besides them
(every waiter woken to find out whether it was done would take the GIL in turn for nothing).
Woken together, members that write again queue within microseconds, and the next leader waits
for as many as the last group held (:data:`GATHER_SECONDS` at most) before it writes: else
the first to come back would write alone while the others queue behind it, and groups would
alternate between one write and all the others, a sync each (8 threads: about 9k durable
puts/s without the wait, 10-12k with it).
The queue belongs to one process: :meth:`Engine.thread_group
<rstmdb_storage.engine.Engine.thread_group>` makes a new one in a forked child, whose copy of
a leader's state would otherwise wait for a thread that does not exist there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .errors import StorageError
from .fsutil import current_pid

#: how long a leader waits at most for the last group's members to queue again
GATHER_SECONDS = 0.0005


class Request:
    """One thread's write, queued: *work* is what the leader needs to write it; the leader
    sets :attr:`result` (or :attr:`error`) before waking the thread."""

    __slots__ = ("_leads", "_wake", "error", "result", "work")

    def __init__(self, work: Any) -> None:
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self._leads = False
        #: made only for a request that follows (a lone writer leads at once and needs none);
        #: held until released once: done, or called to lead
        self._wake: Any = None

    def settled(self) -> bool:
        return self.result is not None or self.error is not None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class ThreadGroup:
    """The queue of one process's writing threads.

    Example::

        seq = engine.thread_group().submit((changes, payload, key), write_all)
        # write_all(requests) sets every request's result or error, in one go
    """

    def __init__(self) -> None:
        self.pid = current_pid()
        self._lock = threading.Lock()
        #: notified when a request queues while a leader gathers
        self._arrived = threading.Condition(self._lock)
        self._queue: list[Request] = []
        self._leading = False
        self._gathering = False
        #: how many requests the last group wrote
        self._last_size = 0

    def submit(self, work: Any, write: Callable[[list[Request]], None]) -> Any:
        """Have *work* written, by this thread or by the leader of the group it joins; return
        its result or raise its error. *write* gets the group, oldest first, and must settle
        each request; if it raises, every request it did not settle gets that error."""
        request = Request(work)
        with self._lock:
            follows = self._leading
            if follows:  # made before it is queued, where a leader may release it
                request._wake = threading.Lock()
                request._wake.acquire()
            self._queue.append(request)
            self._leading = True
            if self._gathering and self._whole():
                self._arrived.notify()  # once, when the group is whole: not on every arrival
        if follows:
            try:
                request._wake.acquire()
                leads = request._leads
            except BaseException:  # a signal handler raised (KeyboardInterrupt, a timeout)
                self._withdraw(request)
                raise
            if not leads:
                return request.outcome()
        if self._last_size > 1:
            self._gather(request)
        with self._lock:
            group, self._queue = self._queue, []
            self._last_size = len(group)
        try:
            write(group)
        except BaseException as exc:
            shared = exc if isinstance(exc, Exception) else _interrupted(exc)
            for member in group:
                if not member.settled():
                    member.error = exc if member is request else shared
        finally:
            self._hand_over(group, request)
        return request.outcome()

    def _gather(self, request: Request) -> None:
        """Before leading: the last group's other members are coming back to write again
        (woken together, they queue within microseconds); wait for them, a short while at
        most, so that they share this group's sync instead of waiting a whole write for the
        next one."""
        try:
            with self._lock:
                self._gathering = True
                try:
                    self._arrived.wait_for(self._whole, GATHER_SECONDS)
                finally:
                    self._gathering = False
        except BaseException:  # a signal handler raised: the lead passes on
            request._leads = True
            self._withdraw(request)
            raise

    def _whole(self) -> bool:
        """Whether as many requests are queued as the last group held; call holding the lock."""
        return len(self._queue) >= self._last_size

    def _withdraw(self, request: Request) -> None:
        """Take back a request whose thread stopped waiting: if no leader took it yet, it is
        never written; if it was called to lead, the lead passes on, or the queue would wait
        for it forever. (Taken into a group already, it is written, or not, with the group.)"""
        with self._lock:
            if request not in self._queue:
                return
            self._queue.remove(request)
            successor = None
            if request._leads:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor._leads = True
        if successor is not None:
            successor._wake.release()

    def _hand_over(self, group: list[Request], leader: Request) -> None:
        """Wake the group's other members, and the next leader if requests are queued."""
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
            else:
                successor._leads = True
        if successor is not None:
            successor._wake.release()
        for member in group:
            if member is not leader:
                member._wake.release()


def _interrupted(exc: BaseException) -> StorageError:
    """What the followers of a leader stopped by *exc* (KeyboardInterrupt, SystemExit) get:
    their records may or may not have been written."""
    return StorageError(
        f"the thread writing this write's group was interrupted ({type(exc).__name__}): "
        f"the write may or may not have been made"
    )
