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

    children = [
        Child("ats", actor_command(resolved, "ats"), ipc_path(resolved.ats_endpoint)),
        Child("server", actor_command(resolved, "server"), ipc_path(resolved.server_endpoint)),
        *(
            Child(f"worker-{n}", actor_command(resolved, "worker", "--name", f"worker-{n}"))
            for n in range(1, resolved.workers + 1)
        ),
        Child("plugin-python", actor_command(resolved, "plugin", "python"), ipc_path(resolved.plugin_endpoint("python"))),
    ]
    return Supervisor(resolved, children).run()


@app.command(show=False)
def ats():
    """Run the ATS actor in the foreground (normally started by `qntx up`)."""
    from qntx.ats.actor import run_ats

    _actor_logging("ATS")
    run_ats(settings())


@app.command(show=False)
def server():
    """Run the server actor (with Pulse) in the foreground (normally started by `qntx up`)."""
    from qntx.server import run_server

    _actor_logging("QNTX Server")
    run_server(settings())


@app.command
def worker(
    *,
    name: Annotated[str | None, Parameter(help="Worker name (default worker-<host>-<pid>).")] = None,
    capacity: Annotated[int, Parameter(help="Job attempts this worker runs at once.")] = 8,
    connect: Annotated[str | None, Parameter(help="The server's workers endpoint (default: this home's).")] = None,
):
    """Run one worker that takes jobs from the server (`qntx up` starts some itself)."""
    from qntx.errors import Invalid
    from qntx.pulse.worker import run_worker

    if capacity < 1:
        raise Invalid("--capacity must be at least 1")
    _actor_logging("Worker")
    run_worker(settings(workers_endpoint=connect), name, capacity)


@app.command
def plugin(
    kind: Annotated[str, Parameter(help="Which plugin to run (only `python` exists).")],
    /,
):
    """Run a plugin actor in the foreground (`qntx up` starts the python plugin itself)."""
    from qntx.errors import Invalid

    if kind != "python":
        raise Invalid(f"unknown plugin {kind!r} (available: python)")
    from plugins.python.plugin import run_python_plugin

    _actor_logging("Python plugin")
    run_python_plugin(settings())


@app.command
def keys():
    """Make the CURVE key pairs for tcp endpoints (if missing) and list them.

    A host that binds tcp:// endpoints uses keys/server.key_secret; clients need a
    copy of server.key and their own client key pair, whose public half goes into
    the server's keys/authorized/.
    """
    from qntx.bus.security import make_keys

    resolved = settings()
    created = set(make_keys(resolved.keys_dir))
    for path in sorted(resolved.keys_dir.rglob("*.key*")):
        mark = "created" if path in created else "exists "
        print(f"{mark}  {path}")
