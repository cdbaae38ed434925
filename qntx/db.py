"""The PostgreSQL database a bus may keep its stores in: connecting, and the schema's
versions and their upgrade.

psycopg (3) is imported only here and only when a store is configured as
``postgresql://...`` (``store`` in config.toml, ``qntx up --store URL``); it comes
with the optional extra ``qntx[postgres]``, and without it that store fails in one line.

Each store kept in the database (``ats``: the attestations, ``pulse``: the jobs, and
``leader``: the leadership lease of ``qntx.leader``) is a *component* with an ordered list
of migrations, each a list of SQL statements; the table ``qntx_schema`` holds the
version each component is at. ``qntx db upgrade`` (``upgrade``) applies the missing
ones, all in one transaction under an advisory lock, so two upgrades at once do the
work once and a failed one leaves the old version whole. Opening a store never
migrates: ``require_schema`` refuses a database that is not at this version, in one
line that says to run ``qntx db upgrade``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from qntx.errors import Invalid, Unavailable

SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_S = 10
# Held by ``upgrade`` for its transaction: one upgrade at a time per database.
_UPGRADE_LOCK = 0x51_4E_54_58  # "QNTX"


def is_database_url(text: str) -> bool:
    return isinstance(text, str) and text.startswith(SCHEMES)


def check_store_setting(text: str) -> str:
    """``store`` as a setting: empty (LMDB in the home) or a PostgreSQL URL."""
    if text and not is_database_url(text):
        raise Invalid(f"store must be empty (LMDB in the home) or postgresql://..., got {text!r}")
    if text:
        try:
            urlsplit(text).port  # noqa: B018 (reads the host and port: a bad one raises)
        except ValueError as exc:
            raise Invalid(f"store is not a valid URL: {exc}") from None
    return text


def redact(url: str) -> str:
    """``url`` without its password (in the user part or as ``?password=``), for logs,
    errors and stats."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad host or port raises here)
    except ValueError:
        return url.partition("://")[0] + "://(a malformed address)"
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if "password=" in parts.query:
        query = "&".join(
            "password=***" if pair.startswith("password=") else pair for pair in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    # Put together by hand: urlunsplit drops the empty host of postgresql:///db.
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path}{query}"


def psycopg():
    """The psycopg module, or one clear line on how to install it."""
    try:
        import psycopg as module
    except ImportError:
        raise Unavailable(
            "a postgresql:// store needs psycopg 3: pip install 'qntx[postgres]'"
        ) from None
    return module


def connect(url: str, *, application: str = "qntx") -> Any:
    """An autocommit connection (work that must be atomic opens ``conn.transaction()``)."""
    pg = psycopg()
    try:
        return pg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name=application
        )
    except pg.Error as exc:
        raise Unavailable(f"cannot connect to {redact(url)}: {first_line(exc)}") from None


def open_store_connection(url: str, component: str, *, application: str, readonly: bool, setup: tuple[str, ...] = ()) -> Any:
    """A store's connection: ``component``'s schema and the lease's checked (never
    migrated), the ``setup`` statements run (and those every store connection runs:
    ``qntx.leader.STORE_SETUP``), read-only when asked; closed again if any of it fails."""
    from qntx.leader import STORE_SETUP

    conn = connect(url, application=application)
    try:
        require_schema(conn, component, url)
        require_schema(conn, "leader", url)  # every write calls its fence
        for statement in (*STORE_SETUP, *setup):
            conn.execute(statement)
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
    except BaseException:
        conn.close()
        raise
    return conn


class StoreConnection:
    """One connection of a store (``component``'s), opened by ``open_store_connection``
    and opened again once broken, used by one statement or transaction at a time. A
    database error is ``Unavailable`` naming ``what``; a write the lease's fence
    refused is ``qntx.leader.fenced`` (an actor of a leader stops there)."""

    def __init__(
        self, url: str, component: str, *, application: str, readonly: bool, what: str,
        epoch: int | None = None, setup: tuple[str, ...] = (),
    ):  # fmt: skip
        self.url, self.component, self.application = url, component, application
        self.readonly, self.what, self.epoch, self.setup = readonly, what, epoch, setup
        self._conn: Any = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[Any], Any]) -> Any:
        """``work(connection)`` under the lock (the connection made or made again first)."""
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                conn = self._conn = open_store_connection(
                    self.url, self.component, application=self.application, readonly=self.readonly, setup=self.setup
                )
            try:
                return work(conn)
            except psycopg().Error as exc:
                from qntx import leader

                if leader.is_fenced(exc):
                    raise leader.fenced(self.epoch, self.what, exc) from None
                raise unavailable(exc, self.what) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def unavailable(exc: BaseException, what: str) -> Unavailable:
    """A database error met by a store (``what`` names it) as the error its callers get."""
    if isinstance(exc, psycopg().errors.ReadOnlySqlTransaction):
        return Unavailable(f"{what} is open read-only")
    return Unavailable(f"{what}: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def components() -> dict[str, list[list[str]]]:
    """Every component's migrations, oldest first (version N is the first N applied)."""
    from qntx.ats.sql import MIGRATIONS as ATS
    from qntx.leader import MIGRATIONS as LEADER
    from qntx.pulse.jobstore_pg import MIGRATIONS as PULSE

    return {"ats": ATS, "pulse": PULSE, "leader": LEADER}


def latest(component: str) -> int:
    return len(components()[component])


def versions(conn) -> dict[str, int]:
    """The version each component is at (empty before the first upgrade)."""
    found = conn.execute("SELECT to_regclass('qntx_schema') IS NOT NULL").fetchone()[0]
    if not found:
        return {}
    return dict(conn.execute("SELECT component, version FROM qntx_schema").fetchall())


def require_schema(conn, component: str, url: str) -> None:
    """Refuse a database whose ``component`` schema is not this version's."""
    found = versions(conn)
    have, want = found.get(component, 0), latest(component)
    if have == want:
        return
    where = redact(url)
    if have > want:
        raise Unavailable(
            f"the {component} schema in {where} is version {have}, newer than this qntx ({want}): upgrade qntx"
        )
    if not found:
        state = "has no QNTX schema"
    elif have == 0:
        state = f"has no {component} schema (an older qntx's)"
    else:
        state = f"has {component} schema version {have}, this qntx needs {want}"
    raise Unavailable(f"the database {where} {state}: run `qntx db upgrade --store URL` first")


def check_schema(url: str) -> None:
    """Connect and ``require_schema`` for every component: what ``qntx up`` does first."""
    conn = connect(url, application="qntx up")
    try:
        for component in components():
            require_schema(conn, component, url)
    finally:
        conn.close()


def upgrade(url: str) -> list[tuple[str, int, int]]:
    """Bring every component to its latest version; (component, from, to) for each
    that moved. Idempotent: a database already there is left as it is."""
    pg = psycopg()
    conn = connect(url, application="qntx db upgrade")
    moved: list[tuple[str, int, int]] = []
    try:
        encoding = conn.execute("SHOW server_encoding").fetchone()[0]
        if encoding.upper() not in ("UTF8", "UTF-8"):
            raise Unavailable(f"the database {redact(url)} is {encoding}; QNTX needs a UTF8 database")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS qntx_schema ("
                " component text PRIMARY KEY, version integer NOT NULL,"
                " upgraded_at timestamptz NOT NULL DEFAULT now())"
            )
            have = versions(conn)
            for component, migrations in components().items():
                start = have.get(component, 0)
                if start > len(migrations):
                    raise Unavailable(
                        f"the {component} schema in {redact(url)} is version {start}, newer than this qntx ({len(migrations)})"
                    )
                for statements in migrations[start:]:
                    for statement in statements:
                        conn.execute(statement)
                if start < len(migrations):
                    conn.execute(
                        "INSERT INTO qntx_schema (component, version) VALUES (%s, %s)"
                        " ON CONFLICT (component) DO UPDATE SET version = excluded.version, upgraded_at = now()",
                        (component, len(migrations)),
                    )
                    moved.append((component, start, len(migrations)))
    except pg.Error as exc:
        raise Unavailable(f"upgrading {redact(url)} failed: {first_line(exc)}") from None
    finally:
        conn.close()
    return moved


def check(url: str) -> dict[str, Any]:
    """What ``qntx db check`` prints: the connection, each component's version and
    (once the lease's schema is there) the leader and the standbys."""
    pg = psycopg()
    conn = connect(url, application="qntx db check")
    try:
        row = conn.execute(
            "SELECT current_database(), current_user, current_setting('server_version'),"
            " current_setting('synchronous_commit'), current_setting('fsync')"
        ).fetchone()
        have = versions(conn)
        lease = None
        if have.get("leader", 0):
            from qntx.leader import describe

            lease = describe(conn)
    except pg.Error as exc:
        raise Unavailable(f"checking {redact(url)} failed: {first_line(exc)}") from None
    finally:
        conn.close()
    database, user, server, synchronous_commit, fsync = row
    return {
        "url": redact(url),
        "database": database,
        "user": user,
        "server_version": server,
        "synchronous_commit": synchronous_commit,
        "fsync": fsync,
        "schema": {name: {"version": have.get(name, 0), "latest": latest(name)} for name in components()},
        "leadership": lease,
    }
