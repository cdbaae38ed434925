"""The scripting API's calls, each written once (sans-I/O).

A call is a generator function: it checks its arguments, yields what it needs
done (``effects``: a request, pipelined requests, a submission, a pause) and
gets the results back, pages through listings and decodes records. It never
touches a socket. Two drivers run the same calls:

- ``qntx.api.Bus``: blocking, over ``qntx.bus.client.Client`` (and, with no
  actors running, over the embedded store and Pulse's store: ``calls.local``);
- ``qntx.aio.AsyncBus``: asyncio, over ``AsyncClient``.

``derive.with_calls`` writes each driver's methods from ``CALLS`` with the
call's own signature and defaults, so the two APIs take the same arguments and
cannot drift (tests/unit/test_api_parity.py checks them by introspection). What
each driver writes itself is how it waits: handles, ``flush``, ``wait``,
``follow``, ``events`` and ``close``.

Modules: ``effects`` (effects, the table, reading every page), ``args`` (friendly
arguments as messages), ``attestations``, ``jobs``, ``directives`` (schedules
and limits), ``local`` (no actors running), ``derive`` (the drivers' methods).
"""

from qntx.calls import attestations, directives, jobs  # noqa: F401  (each call registers itself)
from qntx.calls.effects import ATS, CALLS, SERVER, Ask, AskEach, Enqueue, Nap

__all__ = ["ATS", "CALLS", "SERVER", "Ask", "AskEach", "Enqueue", "Nap"]
