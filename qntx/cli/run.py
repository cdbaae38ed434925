"""Commands that run actors: ``up`` (everything, supervised) and one command per actor."""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from qntx.cli import app, options, settings


def _actor_logging(label: str) -> None:
    from qntx.log import setup_logging

    setup_logging(label, level="DEBUG" if options.debug else "INFO")


@app.command
def up(
    *,
    workers: Annotated[int | None, Parameter(help="Worker processes (default 2).")] = None,
):
    """Start the bus: every actor as its own supervised process, until Ctrl-C."""
    from qntx.supervisor import Child, Supervisor, actor_command

    _actor_logging("QNTX")
    resolved = settings(workers=workers)
    if resolved.workers < 1:
        from qntx.errors import Invalid

        raise Invalid("--workers must be at least 1")

    def ipc_path(endpoint: str):
        from pathlib import Path

        return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None

    children = [Child("ats", actor_command(resolved, "ats"), ipc_path(resolved.ats_endpoint))]
    return Supervisor(resolved, children).run()


@app.command(show=False)
def ats():
    """Run the ATS actor in the foreground (normally started by `qntx up`)."""
    from qntx.ats.actor import run_ats

    _actor_logging("ATS")
    run_ats(settings())
