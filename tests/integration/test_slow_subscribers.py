"""Slow subscribers on a real bus: what one cannot take is dropped on the bus host
within a byte bound, counted by the subscriber as a gap in the notices' numbers, and
recovered from the store (the python plugin learns a handler created while it was
stopped, though notices keep coming so its quiet resync never runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
import zmq

from qntx.bus.client import Client
from qntx.bus.codec import Decoder
from qntx.bus.gaps import Gaps
from qntx.bus.publisher import QUEUE_BYTES
from qntx.protocol import AtsReply, Attest, Event, NewAttestation
from qntx.protocol.events import NOTICE_MAX_BYTES
from qntx.stored_handlers import handler_attestation
from tests.integration.conftest import wait_for
from tests.integration.test_shared_bus import rss_kb

pytestmark = pytest.mark.timeout(240)

GROUPS = 150  # Attest requests of GROUP records each: one group commit, one notice whole
GROUP = 200
FILL = "x" * 420  # each record's notice is over half of NOTICE_MAX_BYTES: one per piece

PUBLISHER = """
import sys
from qntx.bus.actor import Actor
from qntx.bus.publisher import Publisher
from qntx.protocol import AttestationsStored, StoredNotice

actor = Actor()
events = Publisher(actor, sys.argv[1], topics={b"att.": frozenset({"client"})})
fill = "x" * 420  # (FILL)


def group(g):  # (GROUP)
    return AttestationsStored(stored=[
        StoredNotice(id=f"AS-{g}-{k}", predicates=["p1-" + fill, "p2-" + fill], contexts=["c-" + fill])
        for k in range(200)
    ])


def command():
    words = sys.stdin.readline().split()
    if not words:
        actor.stop()
        return
    for g in range(int(words[1])):
        events.publish(b"att.", group(g))
    print(events.published["att."], events.oversized["att."], flush=True)


actor.add_reader(sys.stdin.fileno(), command)
print("ready", flush=True)
actor.run()
"""


SUBSCRIBER = """
import sys, zmq
from qntx.bus.codec import Decoder
from qntx.bus.gaps import Gaps
from qntx.protocol import Event

sub = zmq.Context.instance().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"att.")
sub.connect(sys.argv[1])
decoder, gaps, received, last = Decoder(Event), Gaps("the subscriber"), 0, 0
for line in sys.stdin:  # each line: read what came, say what was seen
    while sub.poll(300):
        event = decoder.decode(sub.recv_multipart()[1])
        gaps.saw_event(event)
        received, last = received + 1, event.seq
    print(received, last, gaps.missed["att."], flush=True)
"""


def test_a_stopped_subscriber_costs_the_publisher_its_byte_bound_at_most_and_counts_exactly_what_it_lost(tmp_path):
    """Groups of 200 attestations, 280 KB of notices each, published to a subscriber
    stopped with SIGSTOP: the publisher's memory grows by no more than the bound, and
    the subscriber's count of what it missed is what the publisher sent less what
    it got."""
    endpoint = f"ipc://{tmp_path}/events"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    subscriber = None
    try:
        assert publisher.stdout.readline().strip() == "ready"
        subscriber = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, endpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

        def publish(groups: int) -> int:
            publisher.stdin.write(f"flood {groups}\n")
            publisher.stdin.flush()
            published, oversized = map(int, publisher.stdout.readline().split())
            assert oversized == published // GROUP  # every group went in pieces
            return published

        def seen() -> tuple[int, int, int]:
            subscriber.stdin.write("\n")
            subscriber.stdin.flush()
            received, last, missed = map(int, subscriber.stdout.readline().split())
            return received, last, missed

        wait_for(lambda: publish(1) and seen()[0], what="the subscription applied")
        received, start, missed = seen()
        assert missed == 0 and start == publish(0)
        os.kill(subscriber.pid, signal.SIGSTOP)
        publish(50)  # the queues fill up: 10,000 pieces of 1.4 KB
        before = rss_kb(publisher.pid, "RssAnon")
        published = publish(300)  # 84 MB of notices
        growth = rss_kb(publisher.pid, "RssAnon") - before
        assert growth < 2 * QUEUE_BYTES / 1024, f"the publisher grew by {growth} KB with a stalled subscriber"
        os.kill(subscriber.pid, signal.SIGCONT)
        queued = seen()[0] - received  # what was queued for it: the first notices of the flood
        publish(1)  # one more group: the gap before its first piece counts too
        _, last, missed = seen()
        assert last == published + GROUP
        # numbered start + 1 .. published before that group, and it got ``queued`` of them
        assert missed == published - start - queued > 40_000
    finally:
        for process in (subscriber, publisher):
            if process is not None:
                os.kill(process.pid, signal.SIGCONT)
                process.stdin.close()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)



def record(tag: str, n: int) -> NewAttestation:
    return NewAttestation(
        subjects=[f"{tag}{n}"], predicates=[f"p1-{FILL}", f"p2-{FILL}"], contexts=[f"c-{FILL}"], actors=["flood"]
    )


def flood(ats: Client, tag: str) -> set[str]:
    ids: set[str] = set()
    for g in range(GROUPS):
        reply = ats.request(Attest(items=[record(tag, g * GROUP + k) for k in range(GROUP)]))
        ids.update(r.id for r in reply.records)
    return ids


def actor_pid(bus, prefix: str) -> int:
    with bus.connect() as client:
        return next(a.pid for a in client.status().actors if a.name.startswith(prefix))


def test_a_stopped_plugin_counts_what_it_lost_and_learns_the_handler_created_meanwhile(bus):
    bus.env["QNTX_HEARTBEAT_S"] = "20"  # (stopped for longer than 3 health checks of 1 s, it would be killed)
    up = bus.start_up_with({"hello": "_result = 'hello'"})
    plugin_pid = actor_pid(bus, "plugin")
    settings = bus.settings
    assert NOTICE_MAX_BYTES / 2 < len(record("f", 0).predicates[0]) * 3 < NOTICE_MAX_BYTES

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"att.")
    sub.connect(settings.ats_events_endpoint)
    decoder, gaps = Decoder(Event), Gaps("the test")
    stream_stop = threading.Event()
    stopped = False
    try:
        with Client(settings.ats_endpoint, AtsReply, timeout_s=30) as ats:
            wait_for(lambda: ats.request(Attest(items=[record("hello", 0)])) and sub.poll(100), what="a notice")
            while sub.poll(200):
                gaps.saw_event(decoder.decode(sub.recv_multipart()[1]))
            assert gaps.total == 0

            # The plugin is stopped and the test's subscriber does not read: a flood
            # of notices, then a handler created, then more notices.
            os.kill(plugin_pid, signal.SIGSTOP)
            stopped = True
            written = flood(ats, "a")
            assert bus.run("handler", "create", "late", "--code", "_result = 'late'").returncode == 0
            written |= flood(ats, "b")

            received: set[str] = set()

            def read(wait_ms: int) -> None:
                while sub.poll(wait_ms):
                    event = decoder.decode(sub.recv_multipart()[1])
                    gaps.saw_event(event)
                    received.update(n.id for n in event.stored)

            read(500)  # what was queued for it
            marker = ats.request(Attest(items=[record("marker", 0)])).records[0].id
            read(2000)
            assert marker in received
            lost = len(written - received) + 1  # (+ the handler's own attestation)
            assert lost > 20_000, lost
            assert gaps.missed == {"att.": lost}

            # Notices keep coming (its quiet resync never runs): the gap is what makes it read the store again.
            def stream() -> None:
                with Client(settings.ats_endpoint, AtsReply, timeout_s=30) as streamer:
                    n = 0
                    while not stream_stop.wait(0.3):
                        streamer.request(Attest(items=[NewAttestation(subjects=[f"tick{n}"], predicates=["tick"])]))
                        n += 1

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            os.kill(plugin_pid, signal.SIGCONT)
            stopped = False
            up.wait_output("Registering plugin async handler plugin=python handler=python.late\n", timeout=60)
            with bus.connect() as client:
                assert client.submit("python.late", None).result(timeout=30) == "late"
            # It counts what it lost once it reads past its queue into the newer notices.
            # (Stopped for longer than its quiet resync, as under load, the resync that
            # is overdue when it wakes may find the handler before the gap does.)
            plugin_log = bus.home / "logs" / "plugin-python.log"
            wait_for(
                lambda: "the python plugin's handler discovery missed" in plugin_log.read_text(), 30,
                what="the plugin's count of the notices it missed",
            )  # fmt: skip
    finally:
        stream_stop.set()
        if stopped:
            os.kill(plugin_pid, signal.SIGCONT)
        sub.close(0)


def test_a_stopped_dashboard_counts_what_it_missed_and_tells_its_pages_to_fetch_again(bus):
    """The dashboard's hub, stopped while notices flood, finds the gap when it resumes:
    it logs what it missed and every page is told to ``resync`` (no other notice of
    this flood would make it: attestations that are not handlers change no page)."""
    from tests.integration.test_ui import start_ui

    bus.start_up()
    ui, base = start_ui(bus)
    lines: list[str] = []
    response = urllib.request.urlopen(base + "/api/events", timeout=60)

    def read() -> None:
        try:
            for line in response:
                lines.append(line.decode())
        except Exception:  # closed at the end of the test
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped = False
    try:
        wait_for(lambda: "event: bus\n" in lines, what="the page connected")
        with Client(bus.settings.ats_endpoint, AtsReply, timeout_s=30) as ats:
            probe = handler_attestation("probe", "_result = 1")  # the hub tells its pages: it reads the notices
            wait_for(lambda: ats.request(Attest(items=[probe])) and "event: handlers\n" in lines, what="the hub")
            os.kill(ui.pid, signal.SIGSTOP)
            stopped = True
            flood(ats, "d")
            os.kill(ui.pid, signal.SIGCONT)
            stopped = False
            # The hub drains what was queued for it; the next notice that reaches it shows the gap.
            wait_for(lambda: ats.request(Attest(items=[record("after", 0)])) and "event: resync\n" in lines,
                     timeout=20, interval=0.2, what="resync sent to the page")  # fmt: skip
        assert "the dashboard missed" in ui.output()
    finally:
        if stopped:
            os.kill(ui.pid, signal.SIGCONT)
        response.close()


def test_an_attestation_with_a_long_subject_still_has_its_notice(bus):
    """The subject goes in the topic only when short: a notice never passes 2 KiB,
    and one whose topic alone would is not left out."""
    bus.start_ats()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"att.")
    sub.connect(bus.settings.ats_events_endpoint)
    try:
        with Client(bus.settings.ats_endpoint, AtsReply, timeout_s=10) as ats:
            wait_for(lambda: ats.request(Attest(items=[record("short", 0)])) and sub.poll(100), what="a notice")
            while sub.poll(200):
                sub.recv_multipart()
            long = NewAttestation(subjects=["s" * 3000], predicates=["is"])
            stored = ats.request(Attest(items=[long])).records[0].id
            assert sub.poll(5000), "no notice for the attestation with a long subject"
            topic, body = sub.recv_multipart()
            assert topic == b"att." and [n.id for n in Decoder(Event).decode(body).stored] == [stored]
    finally:
        sub.close(0)
