"""``qntx keys``: this host's CURVE key pair and the keys it authorises, with their roles.

A host that serves a bus on tcp admits only the keys it authorised (``allow``), each
with its roles; a host that joins one needs the server's public key (``server``).
docs/DEPLOY.md walks through it.
"""

from __future__ import annotations

from typing import Annotated

from cyclopts import App, Parameter

from qntx.cli import app, settings

keys_app = App(name="keys", help="CURVE keys for tcp: this host's pair, authorised keys and their roles.")
app.command(keys_app)


@keys_app.default
def make():
    """Make this host's key pair if it is missing, and list the authorised keys."""
    from qntx.bus.security import make_keys

    keys_dir = settings().keys_dir
    for path in make_keys(keys_dir):
        print(f"created  {path}")
    list_()


@keys_app.command
def show():
    """This host's public key, to authorise it on another host (`qntx keys allow`)."""
    from qntx.bus.security import host_public_key, make_keys

    keys_dir = settings().keys_dir
    make_keys(keys_dir)
    print(host_public_key(keys_dir))


@keys_app.command
def allow(
    name: Annotated[str, Parameter(help="A name for the key (e.g. the host's name).")],
    public_key: Annotated[str, Parameter(help="Its public key, as `qntx keys show` prints it there.")],
    /,
    *,
    role: Annotated[
        list[str], Parameter(help="client, worker, plugin or admin; repeat it for several.", consume_multiple=False)
    ],
):
    """Authorise a key with its roles (again: replace its roles). New connections see it at once."""
    from qntx.bus.security import allow as allow_key

    entry = allow_key(settings().keys_dir, name, public_key, role)
    print(f"allowed  {entry.name}  {', '.join(entry.roles)}")


@keys_app.command
def revoke(name: Annotated[str, Parameter(help="The name it was allowed under.")], /):
    """Revoke a key: refused from now on, its open connections within a heartbeat."""
    from qntx.bus.security import revoke as revoke_key

    revoke_key(settings().keys_dir, name)
    print(f"revoked  {name}")


@keys_app.command
def server(public_key: Annotated[str, Parameter(help="The public key of the bus's host (`qntx keys show` there).")], /):
    """Trust the bus server this host joins with --connect."""
    from qntx.bus.security import set_server_key

    set_server_key(settings().keys_dir, public_key)
    print("server key set")


@keys_app.command(name="list")
def list_():
    """The authorised keys: name, roles, when added."""
    from qntx.bus.security import AUTHORIZED, read_authorized

    entries = read_authorized(settings().keys_dir / AUTHORIZED)
    if not entries:
        print("no key is authorised (run `qntx keys`)")
    for entry in sorted(entries.values(), key=lambda e: e.name):
        print(f"{entry.name:<20} {','.join(entry.roles):<28} {entry.added}  {entry.key}")
