"""The scripting API: ``qntx.connect()`` and the ``Bus`` it returns (blocking).

The CLI is a thin layer over this module, so a script gets exactly what the
commands do. Attestation calls go to the ATS actor when ``qntx up`` runs, and
straight to the embedded LMDB store when it does not; job calls need the server
(listings and records read Pulse's store when it is not running).

Every call (``attest``, ``query``, ``submit``, ``jobs``, ``schedule_add``...) is
written once in ``qntx.calls`` and shared with the asyncio ``qntx.aio.AsyncBus``;
this module is their blocking driver, with what only it does: submissions
pipelined under a window, outcomes fetched ahead (``qntx.follow.Outcomes``), and
flushing at exit.
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qntx.bus.client import Client
from qntx.calls import ATS, SERVER, Ask, AskEach, Enqueue, Nap
from qntx.calls.args import (  # noqa: F401  (re-exported: the CLI and scripts import them from here)
    ax_filter,
    handler_for,
    make_filter,
    new_attestation,
    parse_query,
    split_action,
)
from qntx.calls.derive import with_calls
from qntx.calls.local import EmbeddedAts, ats_is_up, server_is_up, with_local_actors  # noqa: F401
from qntx.errors import NotFound, QntxError, Timeout, Unavailable
from qntx.follow import JobEvent, event_sockets, read_event
from qntx.handles import (
    Acceptance,
    JobFailed,
    decoded,
    decoded_event,
    first_failure,
    result_of,
    unconfirmed,
)
from qntx.join import SILENT_HEARTBEATS, join, rejoined, retried
from qntx.protocol import AtsReply, Event, Job, Ping, ServerReply
from qntx.settings import Settings, load_settings

# Submissions a Bus lets wait for their reply before it waits for the oldest.
SUBMIT_WINDOW = 10_000
# Replies that came are read on the way every this many submissions waiting for
# theirs (each look costs system calls; the replies wait in the socket meanwhile).
COLLECT_EVERY = 16

__all__ = ["Bus", "JobFailed", "JobHandle", "connect"]


class JobHandle:
    """A submitted job: ``.id``, ``.accepted()``, ``.record()``, ``.result(timeout)``."""

    def __init__(self, bus: Bus, job_id: str, correlation: bytes | None, *, keyed: bool = False):
        self.bus = bus
        self._id = job_id
        self._keyed = keyed  # an idempotency key may name an older job: the reply says which
        self._correlation = correlation
        self._acceptance = Acceptance(job_id)

    @property
    def id(self) -> str:
        """The job's id: the one it was submitted with, or, with an idempotency key,
        the id of the job the key names (known once the server has answered)."""
        if self._keyed:
            try:
                return self.accepted().id
            except QntxError:
                pass
        return self._id

    def accepted(self, timeout: float | None = None) -> Job:
        """Wait until the server has durably accepted the job; its record then.
        Raises the refusal (e.g. an unknown handler) or a Timeout if no answer came."""
        if not self._acceptance.settled:
            self.bus._settle(self, timeout)
        if self._acceptance.error is not None:  # raised here: flush need not report it again
            self.bus._unreported = [(i, e) for i, e in self.bus._unreported if i != self._id]
        return self._acceptance.outcome()

    def record(self) -> Job:
        return self.bus.job(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job is final; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._keyed and not self._acceptance.settled and len(self.bus._accepting) <= 1:
            # asked while its acceptance comes (with more submissions pending, one batch asks for them all)
            self.bus._ensure_follower().outcomes.prefetch(self._id)
        try:
            self.accepted(timeout)
        except QntxError:
            if self.bus._follower is not None:
                self.bus._follower.outcomes.forget(self._id)
            raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.bus.wait(self.id, timeout=left)

    def result(self, timeout: float | None = None) -> Any:
        """The job's result; raises the refusal of its submission, or JobFailed if it
        failed or was cancelled."""
        return result_of(self.wait(timeout))

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


@with_calls(asynchronous=False)
class Bus:
    """A connection to one QNTX home: attestations, queries and (with `up`) jobs.

    Its calls (``attest``, ``query``, ``submit``, ``jobs``, ...) come from
    ``qntx.calls``, the same as ``AsyncBus``'s."""

    def __init__(self, settings: Settings, *, embedded: bool | None = None):
        if settings.connect:  # a bus on another host: its endpoints, asked of its (leading) server
            settings, embedded = join(settings), False
        self.settings = settings
        if embedded is None:
            embedded = not ats_is_up(settings)
        self._ats = EmbeddedAts(settings) if embedded else self._client(settings.ats_endpoint, AtsReply)
        self._embedded = embedded
        self._server: Client | None = None
        self._follower = None
        self._accepting: dict[bytes, JobHandle] = {}  # submissions waiting for their reply
        self._unreported: list[tuple[str, QntxError]] = []  # refusals settled on the way, not yet raised
        self._closed = False
        _open_buses.add(self)

    def _client(self, endpoint: str, replies: Any) -> Client:
        s = self.settings
        return Client(
            endpoint, replies, timeout_s=s.request_timeout_s, security=s.security, max_message_bytes=s.max_message_bytes
        )

    @property
    def embedded(self) -> bool:
        """True when attestations go straight to the store (no ATS actor running)."""
        return self._embedded

    @property
    def server(self) -> Client:
        """The request connection to the server (made on first use)."""
        if self._server is None:
            self._server = self._client(self.settings.server_endpoint, ServerReply)
        return self._server

    # ---------------------------------------------------------------- the effects the calls ask for

    def _ask(self, effect: Ask) -> Any:
        try:
            return self._ask_once(effect)
        except (Timeout, Unavailable):
            if not (self._moved() and retried(effect.message)):
                raise
        return self._ask_once(effect)  # the same request, to the server that took over

    def _ask_once(self, effect: Ask) -> Any:
        client = self._ats if effect.to == ATS else self.server
        return client.request(effect.message, timeout_s=effect.timeout_s)

    def _ask_each(self, effect: AskEach) -> list[Any]:
        try:
            return self._ask_each_once(effect)
        except (Timeout, Unavailable):
            if not (self._moved() and all(retried(m) for m in effect.messages)):
                raise
        return self._ask_each_once(effect)

    def _ask_each_once(self, effect: AskEach) -> list[Any]:
        if effect.to == ATS:
            return [self._ats.request(m) for m in effect.messages]
        return self.server.request_many(effect.messages)

    def _moved(self) -> bool:
        """Joined through server addresses and the server stopped answering: join again;
        True if another server leads now (every connection then points at it)."""
        joined = rejoined(self.settings)
        if joined is None:
            return False
        self.settings = joined
        self._ats.repoint(joined.ats_endpoint)
        self.server.repoint(joined.server_endpoint)
        return True

    def _nap(self, effect: Nap) -> None:
        time.sleep(effect.seconds)

    def _server_up(self) -> bool:
        return server_is_up(self.settings)

    def _forget_outcome(self, job_id: str) -> None:
        if self._follower is not None:
            self._follower.outcomes.forget(job_id)

    # ---------------------------------------------------------------- submissions

    def _enqueue(self, effect: Enqueue) -> JobHandle:
        try:
            correlation = self.server.send(effect.message)
        except Unavailable:  # not sent at all (no server took the connection): it may go to another
            if not self._moved():
                raise
            correlation = self.server.send(effect.message)
        handle = JobHandle(self, effect.job_id, correlation, keyed=effect.keyed)
        self._accepting[correlation] = handle
        if not effect.keyed:  # (a key may name an older job: its id is known later)
            self._ensure_follower().outcomes.submitted(effect.job_id, handle)
        if len(self._accepting) >= SUBMIT_WINDOW:  # keep the server's queues bounded
            oldest = next(iter(self._accepting.values()))
            self._settle(oldest, None)
            self._note_refusal(oldest)
        elif len(self._accepting) % COLLECT_EVERY == 0:
            self._collect()
        return handle

    # What carries out each effect (a class attribute: no bound methods, no cycle
    # keeping a dropped Bus alive).
    _effects = {Ask: _ask, AskEach: _ask_each, Enqueue: _enqueue, Nap: _nap}

    def _collect(self, wait_s: float = 0.0) -> None:
        """Settle every submission whose reply is already here."""
        for correlation, reply in self.server.arrived(wait_s).items():
            handle = self._accepting.pop(correlation, None)
            if handle is not None:
                handle._acceptance.settle(reply)
                self._note_refusal(handle)
            elif self._follower is not None and self._follower.outcomes.owns(correlation):
                self._follower.outcomes.deliver(correlation, reply)  # an outcome asked for ahead

    def _settle(self, handle: JobHandle, timeout: float | None) -> None:
        """Wait for the reply to one submission."""
        correlation = handle._correlation
        try:
            reply = self.server.take(correlation, timeout)
        except QntxError as exc:
            handle._acceptance.fail(unconfirmed(handle._id, exc))
        else:
            handle._acceptance.settle(reply)
        finally:
            self._accepting.pop(correlation, None)

    def _note_refusal(self, handle: JobHandle) -> None:
        """A submission settled on the way (nobody asked yet): flush() reports it."""
        if handle._acceptance.error is not None:
            self._unreported.append((handle._id, handle._acceptance.error))

    def _accepted_now(self, id: str) -> bool:
        """For a job the server does not know: raise the refusal of this connection's
        submission of it, if it was refused and nobody has heard why yet; True if
        that submission was still waiting for its answer and is accepted now."""
        for handle in list(self._accepting.values()):
            if handle._id == id:
                handle.accepted()  # raises its refusal
                return True
        for job_id, error in self._unreported:
            if job_id == id:
                self._unreported = [(i, e) for i, e in self._unreported if i != id]
                raise error
        return False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submission so far is accepted or refused; raise the first
        refusal (its ``failures`` lists every refused or unconfirmed job id)."""
        failures, self._unreported = self._unreported, []
        deadline = None if timeout is None else time.monotonic() + timeout  # for all of them together
        for handle in list(self._accepting.values()):
            self._settle(handle, None if deadline is None else max(0.0, deadline - time.monotonic()))
            if handle._acceptance.error is not None:
                failures.append((handle._id, handle._acceptance.error))
        if failures:
            raise first_failure(failures)

    # ---------------------------------------------------------------- outcomes and events

    def follow(self, id: str, timeout: float | None = None) -> Iterator[JobEvent]:
        """Job ``id``'s output, progress and state as they happen (asked for over this
        connection), ending with its final JobChanged."""
        for event in self._ensure_follower().follow(id, timeout):
            yield decoded_event(event)

    def wait(self, id: str, *, timeout: float | None = None) -> Job:
        """Block until job ``id`` is final and return its record (with its result).
        A job this connection submitted and the server refused raises the refusal."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return decoded(self._ensure_follower().outcome(id, timeout))
        except NotFound:
            if not self._accepted_now(id):
                raise
        except (Timeout, Unavailable):
            if not self._moved():
                raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return decoded(self._ensure_follower().outcome(id, left))  # asked again (of the server that took over)

    def events(self) -> Iterator[Event]:
        """Every notice of the bus as it happens: the server's (a job changed, handlers
        registered) and the ATS's (attestations created). Notices carry no results,
        output or bodies (``job``, ``follow`` and ``get`` have those); they are fast,
        not guaranteed (a slow reader's are dropped): who needs the state asks."""
        import zmq

        # Joined through server addresses, a quiet stream is a cue to check the server is
        # still there, and to subscribe at the one that took over if it is not.
        quiet_ms = self.settings.heartbeat_s * SILENT_HEARTBEATS * 1000 if self.settings.connect else None
        sockets: list[zmq.Socket] = []
        try:
            while True:
                subscribed = self.settings
                sockets, decoder = event_sockets(zmq.Context.instance(), subscribed)
                poller = zmq.Poller()
                for sock in sockets:
                    poller.register(sock, zmq.POLLIN)
                while self.settings is subscribed:
                    ready = poller.poll(quiet_ms)
                    for sock, _ in ready:
                        event = read_event(sock.recv_multipart(), decoder)
                        if event is not None:
                            yield event
                    if not ready:
                        self._still_there()
                for sock in sockets:
                    sock.close(0)
        finally:
            for sock in sockets:
                sock.close(0)

    def _still_there(self) -> None:
        """Ask the server for a sign of life (joining the one that took over if none comes)."""
        try:
            self._ask(Ask(SERVER, Ping(), timeout_s=self.settings.heartbeat_s * SILENT_HEARTBEATS))
        except QntxError:
            pass  # no server answers yet: asked again after the next quiet spell

    def _ensure_follower(self):
        if self._follower is None:
            from qntx.follow import JobFollower

            self._follower = JobFollower(self.server, self.settings.request_timeout_s)
        return self._follower

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Flush the submissions still waiting for their reply (raising the first
        refusal), then close the connections."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            _open_buses.discard(self)
            self._ats.close()
            if self._server is not None:
                self._server.close()
            if self._follower is not None:
                self._follower.outcomes.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way: report, do not replace it
            self.close()
        except QntxError as error:
            warn_unsettled(error)


def warn_unsettled(error: QntxError) -> None:
    failures = getattr(error, "failures", [])
    print(f"qntx: {len(failures) or 1} submitted job(s) were refused or not confirmed: {error}", file=sys.stderr)


_open_buses: weakref.WeakSet[Bus] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """At interpreter exit, submissions still unconfirmed are settled, and reported."""
    for bus in list(_open_buses):
        try:
            bus.close()
        except QntxError as error:
            warn_unsettled(error)
        except Exception:  # sockets may already be gone this late
            pass


def connect(home: str | Path | None = None, *, embedded: bool | None = None, **settings: Any) -> Bus:
    """Connect to the bus of ``home`` ($QNTX_HOME, default ~/.qntx), or to the bus of
    another host through its server's address: ``connect("tcp://HOST:PORT")`` (this
    home's keys authenticate; a bus that does not answer raises Unavailable). Where a
    standby server may take over, give every server's address (a comma-separated
    string or a list): the bus joins the one that leads, and again when it changes."""
    home, settings = split_address(home, settings)
    return Bus(load_settings(home, **settings), embedded=embedded)


def split_address(home: str | Path | None, settings: dict[str, Any]) -> tuple[str | Path | None, dict[str, Any]]:
    """``connect("tcp://…")`` names a server (or several: ``"tcp://a:7400,tcp://b:7400"``,
    or a list of them), not a home."""
    if isinstance(home, (list, tuple)):
        return None, {**settings, "connect": ",".join(str(address) for address in home)}
    if isinstance(home, str) and home.startswith("tcp://"):
        return None, {**settings, "connect": home}
    if isinstance(settings.get("connect"), (list, tuple)):
        return home, {**settings, "connect": ",".join(str(address) for address in settings["connect"])}
    return home, settings


def __getattr__(name: str) -> Any:
    if name == "AsyncBus":  # (``qntx.AsyncBus``) asyncio is imported only when asked for
        from qntx.aio import AsyncBus

        return AsyncBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
