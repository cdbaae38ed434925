"""``qntx ui``: the live web dashboard (``qntx.ui``)."""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from qntx.cli import app, options, settings


@app.command
def ui(
    *,
    port: Annotated[int, Parameter(help="TCP port to listen on (0: any free one).")] = 8765,
    host: Annotated[
        str, Parameter(help="Address to listen on; a non-loopback one needs --allow-remote.")
    ] = "127.0.0.1",
    allow_remote: Annotated[
        bool,
        Parameter(help="Allow a non-loopback --host; every request then needs the access token."),
    ] = False,
    open_: Annotated[
        bool, Parameter(name="--open", help="Open the dashboard in a browser.")
    ] = False,
    public_url: Annotated[
        str | None,
        Parameter(
            help="Where people open it through a (TLS) proxy, e.g. https://qntx.example "
            "(ui_public_url); actions from that origin are accepted."
        ),
    ] = None,
):
    """Serve a live dashboard of the bus: actors, queue, jobs, handlers, attestations."""
    from qntx.ui.server import serve

    serve(
        settings(connect=options.connect, ui_public_url=public_url),
        host=host, port=port, allow_remote=allow_remote, open_browser=open_,
    )  # fmt: skip
