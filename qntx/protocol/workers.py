"""Worker sessions: admission, the jobs each is sent, what it reports."""

from __future__ import annotations

import msgspec

from qntx.bus.messages import Message
from qntx.protocol.records import NIL, Job, JobError, Progress
from qntx.protocol.server import JobProgress

#
# A worker session talks to Pulse over three pipes (docs/PROTOCOL.md §5.4):
#   control: its DEALER (routing id = its session id) to the workers ROUTER:
#            WorkerReady up; WorkerWelcome and CancelRunning down.
#   jobs:    a PULL connected to the PUSH the server binds for this session alone:
#            Dispatch down. Pulse never sends a session more than its credit.
#   results: a PUSH connected to the server's results PULL, the one sink of every
#            worker: JobDone and JobProgress up.


class WorkerReady(Message):
    """A worker's hello and heartbeat: how many jobs it takes at once (``credit``;
    0 while it stops) and the leases it holds, so a restarted server adopts them."""

    worker: str
    credit: int = 1
    pid: int = 0
    session: str = ""  # its session id (also the routing id of its control DEALER)
    leases: list[int] = msgspec.field(default_factory=list)
    jobs_endpoint: str = ""  # the jobs PUSH it is connected to ("" until welcomed)
    plugin: str = ""  # a plugin taking its own jobs through this session ("": a plain worker)
    host: str = ""  # the host it runs on


class WorkerWelcome(Message):
    """The server's answer to a new session: where its jobs come from and where
    its results go."""

    jobs_endpoint: str
    results_endpoint: str


class JobDone(Message):
    """The outcome of one run (lease) of a job."""

    job_id: str
    lease: int
    success: bool
    attempt: int = 0
    result: msgspec.Raw = NIL
    error: JobError | None = None
    logs: str = ""
    progress: Progress | None = None  # the last progress reported, if any
    # Not the handler's doing (the worker stopped, the plugin went away): the run
    # is given back to the queue and uses no attempt.
    interrupted: bool = False
    # The session that ran it, on a result sent again to a server that took over
    # (which may not know yet that the run is that session's: the result claims it).
    session: str = ""
    # ms (wall clock): when the handler's code began, for a run that ended before its
    # JobStarted went out (a plugin says "started" only for runs that last); 0: unsaid.
    started_at: int = 0


class Dispatch(Message):
    """One run of a job, sent to the worker session that holds ``lease``."""

    lease: int
    job: Job
    trace: str | None = None  # traced jobs: the traceparent of Pulse's span of this run


class CancelRunning(Message):
    """The server asks a worker to stop the run holding ``lease``."""

    lease: int
    job_id: str = ""


WorkerMessage = WorkerReady
WorkerCommand = WorkerWelcome | CancelRunning
WorkerJob = Dispatch
WorkerResult = JobDone | JobProgress
