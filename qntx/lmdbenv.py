"""One LMDB environment with named sub-databases, whose map size takes care of itself.

Owns opening the environment and running transactions on it; the stores that use it
(``qntx.ats.store``, ``qntx.pulse.jobstore``) own their keys and values. A write that
fills the map is retried whole against a map twice the size, and a transaction that
finds the map grown by another process adopts the new size and is retried, so callers
never see either error. ``work`` functions may therefore run more than once and must
not change anything outside the transaction.

A write that cannot be made, because the disk is full or the map reached its
configured maximum (``max_map_size``), raises ``Unavailable`` ("disk full: ...") and
leaves the environment as it was: readers go on, and writes work again once there is
room. The environment is never opened with ``writemap``, so a full disk is an error
on commit, never a SIGBUS in the middle of a write.

Transactions may run in several threads at once (LMDB allows readers beside the one
writer; the ATS commits on a writer thread while its loop answers queries). Only a
map resize needs the environment to itself, so transactions share a lock that a
resize takes exclusively.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

import lmdb

from qntx.errors import Unavailable

T = TypeVar("T")

# A failed commit with less free space than this on the filesystem is a full disk
# (LMDB reports a short write as an I/O error, not as ENOSPC).
DISK_FULL_MARGIN = 4 << 20


class _ResizeLock:
    """Shared for transactions, exclusive for a resize (which must not overlap any)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if not self._shared:
                self._cond.notify_all()

    def exclusive(self, action: Callable[[], object]) -> None:
        """Run ``action`` alone; the caller must not hold the lock shared."""
        with self._cond:
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive = True
        try:
            action()
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# How often a long-lived process frees the reader slots of dead processes.
READER_CHECK_S = 60.0


class HasReaders(Protocol):
    def clear_stale_readers(self) -> int: ...


def clear_stale_readers_logged(store: HasReaders, what: str) -> None:
    """For a timer: free dead readers' slots and say so when there were any."""
    freed = store.clear_stale_readers()
    if freed:
        from loguru import logger

        logger.warning("freed {} reader slot(s) of dead processes in {}", freed, what)


class LmdbEnv:
    """An LMDB directory opened with the sub-databases ``dbs``; ``read``/``write`` run work."""

    def __init__(
        self,
        path: str | Path,
        dbs: Iterable[str],
        *,
        map_size: int,
        max_map_size: int = 0,
        sync: bool = True,
        readonly: bool = False,
    ):
        """``max_map_size``: the map never grows past it (0: only the disk limits it)."""
        names = tuple(dbs)
        self.path = Path(path)
        self._max_map_size = max_map_size
        if max_map_size:
            map_size = min(map_size, max_map_size)
        if not readonly:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(path), map_size=map_size, subdir=True, lock=True,
            readonly=readonly, sync=sync, max_dbs=len(names),
        )  # fmt: skip
        self._lock = _ResizeLock()
        self._dbs = {}
        for name in names:
            try:
                self._dbs[name] = self._env.open_db(name.encode(), create=not readonly)
            except lmdb.NotFoundError:  # read-only, and made by an older version without it
                self._dbs[name] = None
        if not readonly:
            self.clear_stale_readers()

    def db(self, name: str):
        """The named sub-database (None: absent from a store opened read-only)."""
        return self._dbs[name]

    def read(self, work: Callable[..., T]) -> T:
        """``work(txn)`` in a read transaction, adopting a map another process has grown."""
        return self._run(work, write=False)

    def write(self, work: Callable[..., T]) -> T:
        """``work(txn)`` in one write transaction, committed (and synced) before returning."""
        return self._run(work, write=True)

    def _run(self, work: Callable[..., T], *, write: bool) -> T:
        while True:
            self._lock.acquire_shared()
            try:
                with self._env.begin(write=write, buffers=False) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                # The txn was aborted; retry it whole against a bigger map.
                grow = self._grow_map
            except lmdb.MapResizedError:
                grow = lambda: self._env.set_mapsize(0)  # noqa: E731  (adopt the other process's size)
            except (lmdb.DiskError, lmdb.PanicError) as exc:
                raise self._write_failed(exc) from None
            except lmdb.Error as exc:
                if type(exc) is not lmdb.Error:  # a misuse (a key too long...), not the disk
                    raise
                raise self._write_failed(exc) from None
            finally:
                self._lock.release_shared()
            self._lock.exclusive(grow)

    def _grow_map(self) -> None:
        """Double the map, up to its maximum; Unavailable when it is already there."""
        size = self._env.info()["map_size"]
        if self._max_map_size and size >= self._max_map_size:
            raise Unavailable(
                f"disk full: {self.path} reached its maximum map size of "
                f"{self._max_map_size >> 20} MiB"
            )
        bigger = size * 2
        self._env.set_mapsize(min(bigger, self._max_map_size) if self._max_map_size else bigger)

    def _write_failed(self, exc: lmdb.Error) -> Unavailable:
        """The typed error of a transaction the disk refused."""
        free = shutil.disk_usage(self.path).free
        if free < DISK_FULL_MARGIN:
            return Unavailable(f"disk full: {free >> 10} KiB free for {self.path}")
        return Unavailable(f"{self.path}: write failed: {exc}")

    @property
    def stats(self) -> dict[str, int]:
        """The map size this process uses and the bytes the data occupies in it."""
        info, stat = self._env.info(), self._env.stat()
        return {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * stat["psize"]}

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died in the middle of a read (a
        kill -9): a stale reader pins old pages and makes the file grow. Returns how
        many it freed. Called on open; long-lived writers call it now and then."""
        return self._env.reader_check()

    def close(self) -> None:
        self._lock.exclusive(self._env.close)
