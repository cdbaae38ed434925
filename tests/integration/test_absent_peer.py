"""No send blocks a loop: an actor's requests to a peer that is absent wait in its own
pending table and fail at their timeout, however many there are, while the actor
keeps answering (issue: a server whose ATS was down for long enough froze)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qntx.bus.client import Client
from qntx.bus.messages import Ping, Pong
from qntx.protocol import ServerReply
from tests.integration.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(90)

# Well past the 1,000 messages a DEALER queues for a peer before a send blocks, and
# enough that a resend timer per call (not one for the queue) would keep the loop in
# its timers until the calls expire, whatever the machine's speed.
CALLS = 10_000

ACTOR = textwrap.dedent("""
    import sys
    from qntx.bus.actor import Actor
    from qntx.bus.messages import Ping, Pong
    from qntx.protocol import AtsReply, Query, Filter

    run_dir, calls = sys.argv[1], int(sys.argv[2])

    class Lonely(Actor):
        name = "lonely"

        def setup(self):
            self.serve(f"ipc://{run_dir}/lonely.sock", Ping, {Ping: lambda m, r: Pong(actor="lonely", pid=self.pid)})
            self.peer = self.connect(f"ipc://{run_dir}/nobody.sock", AtsReply)
            self.answers = {}
            self.call_later(0.1, self.flood)

        def flood(self):
            for _ in range(calls):
                self.peer.call(Query(filter=Filter(subjects=["x"])), self.answered, timeout_s=2.0)
            print("sent", flush=True)

        def answered(self, reply):
            code = getattr(reply, "code", type(reply).__name__)
            self.answers[code] = self.answers.get(code, 0) + 1
            if sum(self.answers.values()) == calls:
                print("answered", sorted(self.answers.items()), flush=True)

    Lonely().run()
""")


def test_requests_to_an_absent_peer_never_block_the_loop(tmp_path: Path):
    process = subprocess.Popen(
        [sys.executable, "-c", ACTOR, str(tmp_path), str(CALLS)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert process.stdout.readline().strip() == "sent"
        with Client(f"ipc://{tmp_path}/lonely.sock", ServerReply, timeout_s=5) as client:
            for _ in range(20):  # it answers, all the while its calls wait for nobody
                # (a loop blocked in a send would never answer; 2 s leaves room for a loaded machine)
                started = time.monotonic()
                assert isinstance(client.request(Ping()), Pong)
                assert time.monotonic() - started < 2
                time.sleep(0.05)
        line = wait_for(process.stdout.readline, 30, what="every call answered")
        assert line.strip() == f"answered [('unavailable', {CALLS})]"
    finally:
        process.kill()
        process.wait(10)
