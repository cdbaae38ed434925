"""The bus with its attestations in PostgreSQL: `qntx db upgrade` and `check`, an
unmigrated database refused at start in one line, and the seed flow on
`qntx up --store URL` (handler create, ix, ax) against the real server of tests/pg.py.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import wait_for
from tests.pg import pg_empty_url, pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def test_db_upgrade_is_versioned_idempotent_and_checked(bus, pg_empty_url):  # noqa: F811
    url = pg_empty_url
    check = bus.run("db", "check", "--store", url)
    assert check.returncode == 3, check.stderr
    assert "ats version 0 of 1 (run `qntx db upgrade`)" in check.stdout
    assert "pulse version 0 of 1 (run `qntx db upgrade`)" in check.stdout

    first = bus.run("db", "upgrade", "--store", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "upgraded ats schema 0 -> 1\nupgraded pulse schema 0 -> 1\nupgraded leader schema 0 -> 1\n"
    again = bus.run("db", "upgrade", "--store", url)
    assert again.returncode == 0 and again.stdout.startswith("schema up to date"), again.stderr

    check = bus.run("db", "check", "--store", url, "--json")
    assert check.returncode == 0, check.stderr
    info = json.loads(check.stdout)
    assert info["schema"] == {c: {"version": 1, "latest": 1} for c in ("ats", "pulse", "leader")}
    assert info["database"] == url.partition("?")[0].rpartition("/")[2]


def test_bad_store_settings_fail_in_one_line(bus, pg_server):  # noqa: F811
    nowhere = pg_server.url("no_such_database")
    for args in (("db", "check", "--store", nowhere), ("up", "--store", nowhere)):
        result = bus.run(*args)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("error: cannot connect to ") and result.stderr.count("\n") == 1
    wrong = bus.run("up", "--store", "mysql://x")
    assert wrong.returncode == 2 and "store must be empty" in wrong.stderr and "Traceback" not in wrong.stderr
    none = bus.run("db", "upgrade")
    assert none.returncode == 2 and "no database" in none.stderr


def test_up_refuses_an_unmigrated_database(bus, pg_empty_url):  # noqa: F811
    result = bus.run("up", "--store", pg_empty_url, timeout=30)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "has no QNTX schema: run `qntx db upgrade --store URL` first" in result.stderr
    import psycopg  # here: the fixture has skipped the test where it is missing

    with psycopg.connect(pg_empty_url) as conn:  # and it created nothing there
        assert conn.execute("SELECT to_regclass('ats_attestations')").fetchone()[0] is None


def test_seed_flow_on_postgresql(bus, pg_empty_url):  # noqa: F811
    url = pg_empty_url
    assert bus.run("db", "upgrade", "--store", url).returncode == 0
    up = bus.start_up("--store", url)
    created = bus.run("handler", "create", "vacancies", "--code", "print('Hello from vacancies handler')")
    assert created.returncode == 0, created.stderr
    up.wait_output("handler=python.vacancies", timeout=10)

    ran = bus.run("ix", "vacancies", "some", "args")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "Hello from vacancies handler\n"

    made = bus.run("as", "alice", "is", "engineer", "of", "acme")
    assert made.returncode == 0, made.stderr
    found = bus.run("ax", "ALICE", "is", "Engineer", "--json")
    assert found.returncode == 0, found.stderr
    [record] = json.loads(found.stdout)
    assert record["subjects"] == ["alice"] and record["contexts"] == ["acme"]
    handlers = json.loads(bus.run("ax", "is", "handler", "of", "python", "--json").stdout)
    assert [h["subjects"] for h in handlers] == [["vacancies"]]

    # They are in the database, in commit order, and the home has no LMDB store.
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, seq FROM ats_attestations ORDER BY seq").fetchall()
    assert [id for id, _ in rows] == [handlers[0]["id"], record["id"]]
    assert [seq for _, seq in rows] == [1, 2]
    assert not (bus.home / "ats" / "data.mdb").exists()

    # A restart finds the handler in the database again.
    assert up.stop() == 0
    again = bus.start_up("--store", url)
    again.wait_output("handler=python.vacancies", timeout=10)
    ran = bus.run("ix", "vacancies")
    assert ran.returncode == 0 and ran.stdout == "Hello from vacancies handler\n", ran.stderr
    wait_for(lambda: "(store postgresql://" in again.output(), what="the ATS naming its store")


def test_the_embedded_api_reads_and_writes_the_database_while_the_bus_is_down(bus, pg_url):  # noqa: F811
    import psycopg

    import qntx

    with qntx.connect(bus.home, store=pg_url) as api:
        assert api.embedded
        stored = api.attest("bob", "maintainer", "qntx")
        [found] = api.query(subjects="BOB")
    assert found.id == stored.id
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT id FROM ats_attestations").fetchall() == [(stored.id,)]
    assert not (bus.home / "ats" / "data.mdb").exists()
