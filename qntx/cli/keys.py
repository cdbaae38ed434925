"""``qntx keys``: this host's CURVE key pair and the keys it authorises, with their roles.

A host that serves a bus on tcp admits only the keys it authorised (``allow``), each
with its roles; a host that joins one needs the server's public key (``server``).
docs/DEPLOY.md walks through it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter

from qntx.cli import app, fail, settings

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
    """This host's public key, to authorise it on another host (`qntx keys allow`).

    On a terminal the key is shell-quoted, so it can be pasted into a command line as
    it is; piped, it is the bare 40 characters. `keys allow` and `keys server` take both.
    """
    import shlex

    from qntx.bus.security import host_public_key, make_keys

    keys_dir = settings().keys_dir
    make_keys(keys_dir)
    key = host_public_key(keys_dir)
    print(shlex.quote(key) if sys.stdout.isatty() else key)


# Z85 keys may begin with "-", so the key is taken as a value even when it looks like an option.
KeyArgument = Annotated[
    str | None,
    Parameter(
        allow_leading_hyphen=True,
        help="The public key as `qntx keys show` prints it there (quoted or not; it may begin with '-').",
    ),
]
KeyOption = Annotated[str | None, Parameter(name="--key", allow_leading_hyphen=True, help="The public key, as an option.")]
FromOption = Annotated[
    str | None,
    Parameter(
        name="--from",
        allow_leading_hyphen=True,
        help="Read the public key from a file ('-' for standard input): the output of `keys show`, or a host.key file.",
    ),
]


def _one_key(positional: str | None, key: str | None, from_: str | None) -> str:
    given = [v for v in (positional, key, from_) if v is not None]
    if len(given) != 1:
        fail("give the public key once: as an argument, with --key KEY, or with --from FILE|-")
    if from_ is None:
        return given[0]
    if from_ == "-":
        return sys.stdin.read()
    try:
        return Path(from_).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the key from {from_}: {getattr(exc, 'strerror', None) or exc}")


@keys_app.command
def allow(
    name: Annotated[str, Parameter(help="A name for the key (e.g. the host's name).")],
    public_key: KeyArgument = None,
    /,
    *,
    key: KeyOption = None,
    from_: FromOption = None,
    role: Annotated[
        list[str],
        Parameter(help="client, developer, worker, plugin or admin; repeat it for several.", consume_multiple=False),
    ],
):
    """Authorise a key with its roles (again: replace its roles). New connections see it at once."""
    from qntx.bus.security import allow as allow_key

    entry = allow_key(settings().keys_dir, name, _one_key(public_key, key, from_), role)
    print(f"allowed  {entry.name}  {', '.join(entry.roles)}")


@keys_app.command
def revoke(name: Annotated[str, Parameter(help="The name it was allowed under.")], /):
    """Revoke a key: refused from now on, its open connections within a heartbeat."""
    from qntx.bus.security import revoke as revoke_key

    revoke_key(settings().keys_dir, name)
    print(f"revoked  {name}")


@keys_app.command
def server(public_key: KeyArgument = None, /, *, key: KeyOption = None, from_: FromOption = None):
    """Trust the bus server this host joins with --connect (its `qntx keys show`)."""
    from qntx.bus.security import set_server_key

    set_server_key(settings().keys_dir, _one_key(public_key, key, from_))
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
