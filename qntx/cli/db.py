"""``qntx db``: the PostgreSQL database a bus keeps its stores in (``store`` in
config.toml, or ``--store URL``). ``upgrade`` creates and migrates the schema, the
only command that does (a bus never migrates on start); ``check`` prints the
connection and each store's schema version. Both the ATS and Pulse's jobs are kept there.
"""

from __future__ import annotations

import json
from typing import Annotated

from cyclopts import App, Parameter

from qntx.cli import app, settings

db_app = App(name="db", help="The PostgreSQL database of the stores: upgrade its schema, check it.")
app.command(db_app)

StoreOption = Annotated[
    str | None,
    Parameter(help="postgresql://USER@HOST/DB (default: `store` in config.toml or $QNTX_STORE)."),
]


def _url(store: str | None) -> str:
    from qntx.errors import Invalid

    url = settings(store=store).store
    if not url:
        raise Invalid("no database: give --store postgresql://... or set store in config.toml")
    return url


@db_app.command
def upgrade(*, store: StoreOption = None):
    """Create the schema, or migrate it to this version; safe to run again."""
    from qntx import db

    url = _url(store)
    moved = db.upgrade(url)
    for component, start, end in moved:
        print(f"upgraded {component} schema {start} -> {end}")
    if not moved:
        print(f"schema up to date in {db.redact(url)}")


@db_app.command
def check(*, store: StoreOption = None, json_: Annotated[bool, Parameter(name="--json", help="Print JSON.")] = False):
    """The connection, each store's schema version and the leader; exit 3 when a schema is not current."""
    from qntx import db

    info = db.check(_url(store))
    if json_:
        print(json.dumps(info))
    else:
        print(f"connected  {info['url']} (database {info['database']}, user {info['user']}, PostgreSQL {info['server_version']})")
        print(f"durability synchronous_commit={info['synchronous_commit']} fsync={info['fsync']}")
        for name, schema in info["schema"].items():
            state = "current" if schema["version"] == schema["latest"] else "run `qntx db upgrade`"
            print(f"schema     {name} version {schema['version']} of {schema['latest']} ({state})")
        lease = info["leadership"]
        if lease is not None:
            from qntx.leader import holder_line, standby_line

            print(f"leader     {holder_line(lease)}")
            for standby in lease["standbys"]:
                print(f"standby    {standby_line(standby)}")
    return 0 if all(s["version"] == s["latest"] for s in info["schema"].values()) else 3
