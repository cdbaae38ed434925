"""QNTX: a ZeroMQ actor bus with an attestation store and a durable job scheduler.

Scripting entry point::

    import qntx
    bus = qntx.connect()
    bus.attest(["alice"], ["knows"], ["work"])
"""

__version__ = "0.1.0"


def connect(home=None, **settings):
    """Connect to the bus of ``home`` (default ``$QNTX_HOME`` or ``~/.qntx``)."""
    from qntx.api import connect as _connect

    return _connect(home, **settings)


def __getattr__(name):
    # Lazy re-exports keep `import qntx` cheap for the CLI.
    if name in ("Bus", "JobHandle", "JobFailed", "AsyncBus"):
        import qntx.api

        return getattr(qntx.api, name)
    if name in ("QntxError", "NotFound", "Invalid", "Unavailable", "Timeout", "Conflict"):
        import qntx.errors

        return getattr(qntx.errors, name)
    raise AttributeError(name)
