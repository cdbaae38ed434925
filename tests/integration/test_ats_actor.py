"""The ATS actor as a real process on real ipc sockets with a real LMDB."""

from __future__ import annotations

import threading

import msgspec
import pytest
import zmq

from qntx.bus.client import Client
from qntx.errors import Conflict, Invalid, NotFound
from qntx.protocol import AtsReply, AttestationsStored, Event, Ping, Pong

pytestmark = pytest.mark.timeout(90)


def test_attest_query_get_stats_through_the_bus(bus):
    process = bus.start_ats()
    with bus.connect() as b:
        assert not b.embedded
        pong = b.ping()
        assert pong.actor == "ats" and pong.pid == process.pid
        record = b.attest("alice", "knows", "work", actors="bob", attributes={"since": 2020}, source="test")
        assert record.id.startswith("AS-ALICE-KNOWS-WORK-")
        assert record.attributes == {"since": 2020} and record.source == "test"
        assert b.get(record.id) == record
        many = b.attest_many([{"subjects": ["carol"], "predicates": ["knows"]}, {"subjects": ["dave"]}])
        assert [r.subjects for r in many] == [["carol"], ["dave"]]
        assert [r.id for r in b.query(predicates="KNOWS")] == [many[0].id, record.id]
        assert b.query(subjects=["alice"], actors=["BOB"])[0].id == record.id
        assert b.ax("alice is knows of work by bob")[0].id == record.id
        assert b.stats().attestations == 3
        with pytest.raises(NotFound):
            b.get("AS-NOPE---22222222")


def test_errors_are_typed_and_nothing_partial_is_written(bus):
    bus.start_ats()
    with bus.connect() as b:
        first = b.attest("x", id="AS-X---AAAAAAAA")
        with pytest.raises(Conflict):
            b.attest_many([{"subjects": ["y"]}, {"subjects": ["z"], "id": first.id}])
        assert b.query(subjects=["y"]) == []  # the batch was all or nothing
        with pytest.raises(Invalid):
            b.attest([])
        with pytest.raises(Invalid):
            b.ax("alice is *")
        assert b.ping().actor == "ats"


def test_group_commit_serves_many_concurrent_writers(bus):
    bus.start_ats()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with bus.connect() as b:
                for i in range(50):
                    b.attest(f"w{n}", "wrote", attributes={"i": i})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with bus.connect() as b:
        assert b.stats().attestations == 400
        assert len(b.query(subjects="w3")) == 50


def test_a_big_batch_and_small_writers_meanwhile_all_answer_and_are_all_found(bus):
    """A batch past APPLY_AT starts an index write behind the journal; small writers
    commit meanwhile. Every writer gets its records, and reads find every one."""
    from qntx.ats.actor import APPLY_AT

    bus.start_ats()
    big_size = APPLY_AT + 1
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def big() -> None:
        try:
            with bus.connect() as b:
                results["big"] = b.attest_many([{"subjects": [f"big{i}"], "predicates": ["bulk"]} for i in range(big_size)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=big)
    thread.start()
    with bus.connect() as b:
        small = [b.attest("small", "one", attributes={"i": i}) for i in range(20)]
        thread.join(60)
        assert not errors
        assert len(results["big"]) == big_size
        assert b.stats().attestations == big_size + 20
        assert {r.id for r in b.query(predicates="bulk", limit=big_size + 10)} == {r.id for r in results["big"]}
        assert [r.id for r in b.query(subjects="small")] == [r.id for r in reversed(small)]


def test_new_attestations_are_published(bus):
    bus.start_ats()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"att.")
    sub.connect(bus.settings.ats_events_endpoint)
    decoder = msgspec.msgpack.Decoder(Event)
    try:
        with bus.connect() as b:
            received = []
            for i in range(50):  # the subscription needs a moment to reach the publisher
                b.attest("eve", "said", attributes={"n": i})
                if sub.poll(100):
                    topic, body = sub.recv_multipart()
                    received.append((topic, decoder.decode(body)))
                    break
        assert received, "no event arrived"
        topic, event = received[0]
        assert topic == b"att.eve" and isinstance(event, AttestationsStored)
        (notice,) = event.stored
        assert notice.predicates == ["said"] and notice.seq > 0
        assert b'"n"' not in body and b"\xa1n" not in body  # a notice: never the attributes
    finally:
        sub.close(0)


def test_a_group_commit_is_one_notice_of_its_records(bus):
    bus.start_ats()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"att.")
    sub.connect(bus.settings.ats_events_endpoint)
    decoder = msgspec.msgpack.Decoder(Event)
    try:
        with bus.connect() as b:
            for i in range(50):  # the subscription needs a moment to reach the publisher
                made = b.attest_many([{"subjects": [f"m{i}-{k}"], "predicates": ["many"]} for k in range(3)])
                if sub.poll(100):
                    topic, body = sub.recv_multipart()
                    break
            else:
                pytest.fail("no event arrived")
        event = decoder.decode(body)
        assert topic == b"att."
        assert isinstance(event, AttestationsStored)
        assert [n.id for n in event.stored] == [r.id for r in made]
        assert [n.seq for n in event.stored] == [r.seq for r in made] and made[0].seq > 0
        assert not sub.poll(200)  # and no event per record besides
    finally:
        sub.close(0)


def test_a_read_right_after_each_acknowledgement_sees_it(bus):
    """Acknowledged means journaled; the indexes follow behind, and every read
    waits for them: a query, a get and the count each see the record just written."""
    bus.start_ats()
    with bus.connect() as b:
        for i in range(30):
            record = b.attest(f"now{i}", "seen")
            assert [r.id for r in b.query(subjects=f"now{i}")] == [record.id]
            assert b.get(record.id).id == record.id
            assert b.stats().attestations == i + 1


def test_data_survives_a_kill_9_of_the_actor(bus):
    import signal

    process = bus.start_ats()
    with bus.connect() as b:
        ids = [r.id for r in b.attest_many([{"subjects": [f"s{i}"]} for i in range(100)])]
    process.stop(signal.SIGKILL)
    bus.start_ats()
    with bus.connect() as b:
        assert {r.id for r in b.query(limit=1000)} == set(ids)


def test_cli_goes_through_the_bus_when_up_and_embedded_when_not(bus):
    created = bus.run("handler", "create", "vacancies", "--code", "print('hi')")
    assert created.returncode == 0, created.stderr
    bus.start_ats()
    with bus.connect() as b:
        assert not b.embedded
    created = bus.run("handler", "create", "other", "--code", "print('hi')")
    assert created.returncode == 0, created.stderr
    listed = bus.run("handler", "list")
    assert "python.other" in listed.stdout and "python.vacancies" in listed.stdout


def test_ping_over_a_raw_client(bus):
    process = bus.start_ats()
    with Client(bus.settings.ats_endpoint, AtsReply) as client:
        reply = client.request(Ping())
    assert isinstance(reply, Pong) and reply.pid == process.pid
