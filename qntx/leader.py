"""Which ``qntx up`` leads a bus kept in PostgreSQL: a lease in the database, fenced by
an epoch.

Two or more ``qntx up --store postgresql://...`` (on different hosts) share one
database. The table ``qntx_leader`` holds one row: the holder (host, home, pid, its
public server address), the ``epoch`` and the time the lease ``expires``, always on
the database's clock (``now()``), never a host's. An ``up`` takes the lease when it
has expired, moving the epoch on by one; while it leads it renews the lease every
``RENEW_S``; the others wait as standbys (rows of ``qntx_standbys`` with the time
they were last seen), bind no bus endpoint, and take over once the lease has been
expired for a moment (``LEASE_TTL_S`` after the leader's last renewal).

Fencing: every write transaction of both stores calls ``qntx_fence(epoch)`` (made by
``MIGRATIONS``), which takes a share lock on the lease row and raises ``FENCED_STATE``
unless the row still carries the epoch this process leads with. A takeover updates
that row, so it waits for a write in flight to commit, and a write that comes after
it finds the new epoch and writes nothing, whatever the old leader believes (paused,
cut off, its clock wrong). A store opened with no epoch (tools, tests) may write
only while no lease is held. The children of a leading ``up`` get the epoch in
``QNTX_EPOCH``; a child whose write is fenced logs one line and exits with
``FENCED_EXIT`` at once, and its ``up`` stops the other actors and stands by again.

The store connections end a transaction left idle (``IDLE_IN_TRANSACTION_MS``): a
paused leader holding the lease row's share lock mid-transaction is cut off by the
database, so it can never block a takeover; the lease's own statements wait for a
lock at most ``LOCK_TIMEOUT_MS`` and try again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from qntx import db
from qntx.errors import Unavailable

LEASE_TTL_S = 3.0  # a lease not renewed for this long may be taken over
RENEW_S = 1.0
STANDBY_POLL_S = 0.2  # how often a standby looks at the lease
EPOCH_ENV = "QNTX_EPOCH"
FENCED_EXIT = 75  # the exit code of an actor whose write was fenced
FENCED_STATE = "QX409"  # the SQLSTATE qntx_fence raises
IDLE_IN_TRANSACTION_MS = 2_000
LOCK_TIMEOUT_MS = 1_000
# Set on every store connection (see the module's docstring).
STORE_SETUP = (f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}",)

MIGRATIONS: list[list[str]] = [
    [  # 1: the lease row, the standbys, the fence every write calls
        "CREATE TABLE qntx_leader ("
        " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " epoch bigint NOT NULL, host text, home text, pid integer, address text,"
        " since timestamptz, renewed timestamptz, expires timestamptz NOT NULL)",
        "INSERT INTO qntx_leader (epoch, expires) VALUES (0, 'epoch')",
        "CREATE TABLE qntx_standbys ("
        " host text NOT NULL, home text NOT NULL, pid integer NOT NULL, address text,"
        " last_seen timestamptz NOT NULL, PRIMARY KEY (host, home))",
        # No epoch (a tool, a test): only while no lease is held.
        "CREATE FUNCTION qntx_fence(writer_epoch bigint) RETURNS boolean LANGUAGE plpgsql AS $$"
        " BEGIN"
        "  IF writer_epoch IS NULL THEN"
        "   PERFORM FROM qntx_leader WHERE expires < now() FOR SHARE;"
        "  ELSE"
        "   PERFORM FROM qntx_leader WHERE epoch = writer_epoch FOR SHARE;"
        "  END IF;"
        "  IF NOT FOUND THEN"
        f"   RAISE EXCEPTION 'fenced: epoch % does not lead', coalesce(writer_epoch::text, '(none)') USING ERRCODE = '{FENCED_STATE}';"
        "  END IF;"
        "  RETURN true;"
        " END $$",
    ],
]


class Fenced(Unavailable):
    """A write refused because this process does not lead the bus (any more)."""


def epoch_from_env() -> int | None:
    """The epoch the actors of a leading ``up`` write with (None: not started by one)."""
    text = os.environ.get(EPOCH_ENV, "")
    return int(text) if text.isdigit() else None


def is_fenced(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == FENCED_STATE


def fenced(epoch: int | None, what: str, exc: BaseException) -> Fenced:
    """A fenced write met by a store (``what`` names it): an actor of a leader (an
    epoch) says so in one line and exits at once, serving nothing more; anyone else
    gets the error."""
    if epoch is not None:
        logger.error("fenced: {} refused a write, epoch {} no longer leads the bus; stopping at once", what, epoch)
        logger.complete()
        os._exit(FENCED_EXIT)
    return Fenced(f"{what}: the bus is led by an `up` on this database; write through it ({db.first_line(exc)})")


def describe(conn) -> dict[str, Any]:
    """The lease's holder, epoch and remaining time, and the standbys, as read now."""
    row = conn.execute(
        "SELECT epoch, host, home, pid, address, expires > now(),"
        " extract(epoch FROM expires - now()), extract(epoch FROM now() - since) FROM qntx_leader"
    ).fetchone()
    epoch, host, home, pid, address, live, left, held = row
    standbys = conn.execute(
        "SELECT host, home, pid, address, extract(epoch FROM now() - last_seen) FROM qntx_standbys"
        " ORDER BY host, home"
    ).fetchall()
    return {
        "epoch": epoch,
        "leader": {"host": host, "home": home, "pid": pid, "address": address, "live": bool(live),
                   "expires_in_s": round(float(left), 3) if live else 0.0,
                   "held_s": round(float(held), 3) if held is not None else 0.0},
        "standbys": [
            {"host": h, "home": o, "pid": p, "address": a, "seen_s_ago": round(float(ago), 3)}
            for h, o, p, a, ago in standbys
        ],
    }  # fmt: skip


def read(url: str) -> dict[str, Any]:
    """``describe`` on a connection of its own (``qntx status``, ``qntx db check``)."""
    conn = db.connect(url, application="qntx leader read")
    try:
        return describe(conn)
    finally:
        conn.close()


def holder_line(info: dict[str, Any]) -> str:
    leader = info["leader"]
    if not leader["live"]:
        return f"none (epoch {info['epoch']}, the lease has expired)"
    return f"{leader['host']} {leader['address']} (home {leader['home']}, pid {leader['pid']}, epoch {info['epoch']})"


def standby_line(standby: dict[str, Any]) -> str:
    return (
        f"{standby['host']} {standby['address']} (home {standby['home']}, pid {standby['pid']},"
        f" seen {standby['seen_s_ago']:.1f}s ago)"
    )


class Lease:
    """One ``up``'s side of the lease: take it or stand by, renew it, give it back."""

    def __init__(self, url: str, *, home: str, address: str):
        self.url = url
        self.identity = {"host": socket.gethostname(), "home": home, "pid": os.getpid(), "address": address}
        self.epoch: int | None = None
        self._pg = db.psycopg()
        self._conn = None

    def _run(self, work: Callable[[Any], Any]) -> Any:
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = None
                conn = db.connect(self.url, application="qntx lease")
                try:  # kept once its timeouts are set: a connection lost in between is made again
                    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                    conn.execute(f"SET statement_timeout = {int(LEASE_TTL_S * 1000)}")
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            return work(self._conn)
        except self._pg.Error as exc:  # (as Unavailable, which every caller handles: renewals go on)
            raise Unavailable(f"the lease in {db.redact(self.url)}: {db.first_line(exc)}") from None

    def try_take(self) -> int | None:
        """Take the lease if it has expired (the epoch moves on): the new epoch, or None."""
        me = self.identity
        row = self._run(
            lambda conn: conn.execute(
                "UPDATE qntx_leader SET epoch = epoch + 1, host = %s, home = %s, pid = %s, address = %s,"
                " since = now(), renewed = now(), expires = now() + make_interval(secs => %s)"
                " WHERE expires < now() RETURNING epoch",
                (me["host"], me["home"], me["pid"], me["address"], LEASE_TTL_S),
            ).fetchone()
        )
        if row is None:
            return None
        self.epoch = row[0]
        self._run(lambda conn: conn.execute(
            "DELETE FROM qntx_standbys WHERE host = %s AND home = %s", (me["host"], me["home"])
        ))  # fmt: skip
        return self.epoch

    def renew(self) -> bool:
        """Move the expiry on; False when another took the lease (this one is fenced)."""
        row = self._run(
            lambda conn: conn.execute(
                "UPDATE qntx_leader SET renewed = now(), expires = now() + make_interval(secs => %s)"
                " WHERE epoch = %s RETURNING 1",
                (LEASE_TTL_S, self.epoch),
            ).fetchone()
        )
        return row is not None

    def release(self) -> None:
        """Give the lease back (a clean stop): a standby takes over at once."""
        if self.epoch is None:
            return
        try:
            self._run(lambda conn: conn.execute("UPDATE qntx_leader SET expires = now() WHERE epoch = %s", (self.epoch,)))
        except Unavailable as exc:
            logger.warning("could not give the lease back (a standby takes over when it expires): {}", exc)
        self.epoch = None

    def seen(self) -> None:
        """Register (or refresh) this ``up`` as a standby."""
        me = self.identity
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO qntx_standbys (host, home, pid, address, last_seen) VALUES (%s, %s, %s, %s, now())"
                " ON CONFLICT (host, home) DO UPDATE SET pid = excluded.pid, address = excluded.address,"
                " last_seen = now()",
                (me["host"], me["home"], me["pid"], me["address"]),
            )
        )

    def leave(self) -> None:
        me = self.identity
        try:
            self._run(lambda conn: conn.execute(
                "DELETE FROM qntx_standbys WHERE host = %s AND home = %s AND pid = %s", (me["host"], me["home"], me["pid"])
            ))  # fmt: skip
        except Unavailable:
            pass  # the row ages out: status shows when it was last seen

    def describe(self) -> dict[str, Any]:
        return self._run(describe)

    def wait_to_lead(self, stopping: Callable[[], bool]) -> int | None:
        """Take the lease, or stand by until it can be taken: the epoch, or None when
        ``stopping()`` turned true first."""
        told = None
        while not stopping():
            try:
                epoch = self.try_take()
                if epoch is not None:
                    return epoch
                self.seen()
                info = self.describe()
                leader = (info["epoch"], info["leader"]["host"], info["leader"]["address"])
                if leader != told:
                    logger.info("standby: {} leads the bus; taking over if its lease expires", holder_line(info))
                    told = leader
            except Unavailable as exc:
                logger.warning("standby: {}; trying again", exc)
                time.sleep(1.0)
            time.sleep(STANDBY_POLL_S)
        self.leave()
        return None

    def keep(self, lost: Callable[[str], None], done: threading.Event) -> threading.Thread:
        """Renew every ``RENEW_S`` on a thread of its own until ``done``; ``lost(why)``
        once the lease is gone (taken over, or not renewed for ``LEASE_TTL_S``)."""

        def loop() -> None:
            renewed = time.monotonic()
            while not done.wait(RENEW_S):
                try:
                    if self.renew():
                        renewed = time.monotonic()
                        continue
                    info = self.describe()
                    lost(f"epoch {self.epoch} was taken over: {holder_line(info)} leads")
                    return
                except Unavailable as exc:
                    if time.monotonic() - renewed > LEASE_TTL_S:
                        lost(f"the lease could not be renewed for {LEASE_TTL_S:g}s ({exc})")
                        return

        thread = threading.Thread(target=loop, name="lease", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
