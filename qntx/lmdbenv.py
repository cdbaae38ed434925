"""One LMDB environment with named sub-databases, whose map size takes care of itself.

Owns opening the environment and running transactions on it; the stores that use it
(``qntx.ats.store``, ``qntx.pulse.jobstore``) own their keys and values. A write that
fills the map is retried whole against a map twice the size, and a transaction that
finds the map grown by another process adopts the new size and is retried, so callers
never see either error. ``work`` functions may therefore run more than once and must
not change anything outside the transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import lmdb

T = TypeVar("T")


class LmdbEnv:
    """An LMDB directory opened with the sub-databases ``dbs``; ``read``/``write`` run work."""

    def __init__(
        self,
        path: str | Path,
        dbs: Iterable[str],
        *,
        map_size: int,
        sync: bool = True,
        readonly: bool = False,
    ):
        names = tuple(dbs)
        if not readonly:
            Path(path).mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(path), map_size=map_size, subdir=True, lock=True,
            readonly=readonly, sync=sync, max_dbs=len(names),
        )  # fmt: skip
        # One lock around every transaction: set_mapsize must never race an open txn.
        self._lock = threading.RLock()
        self._dbs = {name: self._env.open_db(name.encode(), create=not readonly) for name in names}

    def db(self, name: str):
        return self._dbs[name]

    def read(self, work: Callable[..., T]) -> T:
        """``work(txn)`` in a read transaction, adopting a map another process has grown."""
        with self._lock:
            while True:
                try:
                    with self._env.begin(buffers=False) as txn:
                        return work(txn)
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)

    def write(self, work: Callable[..., T]) -> T:
        """``work(txn)`` in one write transaction, committed (and synced) before returning."""
        with self._lock:
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        return work(txn)
                except lmdb.MapFullError:
                    # The txn was aborted; retry it whole against a bigger map.
                    self._env.set_mapsize(self._env.info()["map_size"] * 2)
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)

    @property
    def stats(self) -> dict[str, int]:
        """The map size this process uses and the bytes the data occupies in it."""
        info, stat = self._env.info(), self._env.stat()
        return {"map_size": info["map_size"], "used_bytes": (info["last_pgno"] + 1) * stat["psize"]}

    def close(self) -> None:
        with self._lock:
            self._env.close()
