"""Commands that run actors: ``up`` (everything, supervised) and one command per actor."""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from qntx.cli import app, options, settings


def _actor_logging(label: str) -> None:
    from qntx.log import setup_logging

    setup_logging(label, level="DEBUG" if options.debug else "INFO", log_format=settings().log_format)


@app.command
def up(
    *,
    workers: Annotated[int | None, Parameter(help="Worker processes (default 2).")] = None,
    python_pool: Annotated[
        int | None,
        Parameter(help="Python handler jobs run at once (interpreter processes); default: as many as --workers."),
    ] = None,
    bind: Annotated[
        str | None,
        Parameter(help="Serve other hosts: tcp://HOST:PORT is the server; the other sockets take the next 5 ports."),
    ] = None,
    store: Annotated[
        str | None,
        Parameter(
            help="Keep attestations and jobs in PostgreSQL, postgresql://USER@HOST/DB (migrated by `qntx db upgrade`);"
            " several `up` on one database: one leads, the others stand by."
        ),
    ] = None,
):
    """Start the bus: every actor as its own supervised process, until Ctrl-C."""
    import os

    from qntx.supervisor import Child, Supervisor, actor_command

    _actor_logging("QNTX")
    resolved = settings(workers=workers, bind=bind, python_pool_size=python_pool, store=store)
    if resolved.store:
        from qntx.db import check_schema

        check_schema(resolved.store)  # an unmigrated database fails here, in one line
        os.environ["QNTX_STORE"] = resolved.store  # the children resolve their settings again
    if resolved.bind:
        resolved.public("server_endpoint")  # a bad address fails here, once
        os.environ["QNTX_BIND"] = resolved.bind  # the children resolve their settings again
    if resolved.workers < 1:
        from qntx.errors import Invalid

        raise Invalid("--workers must be at least 1")
    if resolved.python_pool_size < 0:
        from qntx.errors import Invalid

        raise Invalid("--python-pool must be at least 1")
    # Python jobs run as many at once as the workers run built-ins, unless said otherwise;
    # the plugin resolves its settings again, so it is told.
    pool = resolved.python_interpreters
    os.environ["QNTX_PYTHON_POOL_SIZE"] = str(pool)
    from loguru import logger

    from qntx.bus.pidlock import lock_holder

    holder = lock_holder(resolved.lock_path("up"))
    if holder is not None:  # said before anything else is (Supervisor.run checks it for good)
        from qntx.errors import Conflict

        raise Conflict(f"qntx is already up on {resolved.home} (pid {holder}); stop it first")
    logger.info("running ats, server, {} worker(s) and the python plugin with {} interpreter(s)", resolved.workers, pool)

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
    lease = None
    if resolved.store:
        from qntx.leader import Lease

        # One `up` per database leads; the others stand by (qntx.leader).
        address = resolved.for_other_hosts("server_endpoint")
        lease = Lease(resolved.store, home=str(resolved.home), address=address)
    return Supervisor(resolved, children, lease=lease).run()


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
    connect: Annotated[
        str | None,
        Parameter(
            help="Join the bus of another host: its server's tcp://HOST:PORT (or workers endpoint); several, "
            "comma-separated, where a standby server may take over."
        ),
    ] = None,
):
    """Run one worker that takes jobs from the server (`qntx up` starts some itself)."""
    from qntx.errors import Invalid
    from qntx.pulse.worker import run_worker

    if capacity < 1:
        raise Invalid("--capacity must be at least 1")
    _actor_logging("Worker")
    connect = connect or options.connect
    if connect is None:
        run_worker(settings(), name, capacity)
        return
    # A worker on another host runs built-ins; plugin jobs go to plugin sessions.
    joined = joined_worker_settings(connect)
    run_worker(joined, name, capacity, joined=bool(joined.connect))


def joined_worker_settings(connect: str):
    """Settings for a worker of the bus whose server is one of ``connect``'s addresses
    (its workers endpoint asked of it; the addresses kept, to find the leading server
    again later). An older peer's workers endpoint given directly is used as it is."""
    from qntx.join import find_server, reachable

    joined = settings(connect=connect)
    address, bus = find_server(joined, connect)
    if bus is None:  # the workers endpoint itself: nothing to join again through
        return settings(connect="", workers_endpoint=address)
    return settings(connect=connect, server_endpoint=address, workers_endpoint=reachable(bus.workers_endpoint, address))


@app.command
def plugin(
    kind: Annotated[str, Parameter(help="Which plugin to run (only `python` exists).")],
    /,
    *,
    connect: Annotated[
        str | None,
        Parameter(help="Run it for the bus of another host: its server's tcp://HOST:PORT (several: comma-separated)."),
    ] = None,
    name: Annotated[str | None, Parameter(help="Its worker session's name (default plugin-python@<host>-<pid>).")] = None,
):
    """Run a plugin actor in the foreground (`qntx up` starts the python plugin itself)."""
    from qntx.errors import Invalid

    if kind != "python":
        raise Invalid(f"unknown plugin {kind!r} (available: python)")
    from plugins.python.plugin import run_python_plugin

    _actor_logging("Python plugin")
    connect = connect or options.connect
    if connect is None:
        run_python_plugin(settings(), name=name)
    else:
        from qntx.join import addresses

        first = addresses(connect)[0]  # (bad input fails here, in one line)
        run_python_plugin(settings(connect=connect, server_endpoint=first), remote=True, name=name)
