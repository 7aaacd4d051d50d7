"""Issue 3: live events (SSE) and the reaper, over real HTTP against the real server.

Each test starts a relay on a free loopback port (conftest `relay`,
`relay_factory`) and reads its event streams with `Stream` below. Time-based
behaviour (ackBy, stale agents, retention) runs on the FakeClock plus
POST /api/system/reap; the reaper thread itself is tested with millisecond
intervals and `wait_until`, never with sleeps.

To know that a stream holds nothing more than expected, a test makes one
more change it knows the stream will carry (a "sentinel" registration) and
checks that it is the next event: the stream is ordered, so anything
unexpected would have come first.
"""

import http.client
import json
import random
import re
import signal
import socket
import threading
import time

import pytest

from conftest import EventReader, wait_until


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Stream(EventReader):
    """The shared SSE reader (conftest), plus waiting for a matching event."""

    def until(self, predicate, timeout=5):
        """Every event before the first one that matches `predicate` (which is consumed)."""
        found = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no matching event within %.1f s; got %r" % (timeout, found)
            event = self.next_event(remaining)
            assert event is not None, "stream ended after %r" % found
            if predicate(event):
                return found
            found.append(event)

    def until_registered(self, relay, agent_id, timeout=5):
        """Register `agent_id` (the sentinel) and return every event before its agent.status."""
        relay.register(agent_id)
        return self.until(lambda e: e["event"] == "agent.status" and e["data"]["id"] == agent_id, timeout)



class RawStream:
    """An SSE request on a bare socket, for what http.client hides: the
    header block and the chunked framing exactly as sent."""

    def __init__(self, host, port, path="/api/events", rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connect, so the advertised window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((host, port))
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n"
                           % (path, port)).encode("ascii"))
        self.buffer = b""

    def _fill(self, deadline):
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the stream")
        self.buffer += data

    def _read_until(self, marker, deadline):
        while marker not in self.buffer:
            self._fill(deadline)
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def head(self, timeout=5):
        """(status, {lower-case header: value}, [raw header lines])."""
        lines = self._read_until(b"\r\n\r\n", time.monotonic() + timeout).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, lines

    def chunk(self, timeout=5):
        """The payload of the next chunk (b"" for the last-chunk marker)."""
        deadline = time.monotonic() + timeout
        size = int(self._read_until(b"\r\n", deadline).split(b";")[0], 16)
        while len(self.buffer) < size + 2:
            self._fill(deadline)
        payload, crlf, self.buffer = self.buffer[:size], self.buffer[size:size + 2], self.buffer[size + 2:]
        assert crlf == b"\r\n", "chunk of %d bytes not followed by CRLF: %r" % (size, crlf)
        return payload

    def read_to_end(self, timeout=5):
        """Read until the server ends the connection: the last bytes received
        (b"0\r\n\r\n" after a clean end), or None if it never ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._fill(deadline)
            except (EOFError, ConnectionResetError):
                return self.buffer
            except socket.timeout:
                return None
            self.buffer = self.buffer[-16:]  # keep the tail: the last-chunk marker and the CRLF before it
        return None

    def close(self):
        self.sock.close()


@pytest.fixture
def open_stream():
    """open_stream(relay, path, headers) -> Stream; closed after the test."""
    opened = []

    def start(relay, path="/api/events", headers=None):
        stream = Stream(relay, path, headers)
        opened.append(stream)
        return stream

    yield start
    for stream in opened:
        stream.close()


def reap(relay):
    r = relay.call("POST", "/api/system/reap")
    assert r.status == 200, r
    return r.json["reaped"]


def receipts(relay, message_id):
    r = relay.call("GET", "/api/messages/%d/receipts" % message_id)
    assert r.status == 200, r
    return {x["agentId"]: x for x in r.json["receipts"]}


def sse_clients(relay):
    return relay.call("GET", "/api/stats").json["sseClients"]


def kinds(events):
    return [e["event"] for e in events]


# ---------------------------------------------------------------------------
# The wire format
# ---------------------------------------------------------------------------


def test_stream_is_chunked_event_stream_with_retry_first_then_frames_and_keepalives(relay_factory):
    relay = relay_factory(sse_keepalive_ms=50)
    stream = RawStream(relay.host, relay.port)
    try:
        status, headers, _ = stream.head()
        assert status == 200
        assert headers["content-type"].split(";")[0].strip() == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert headers["transfer-encoding"].lower() == "chunked"
        assert "content-length" not in headers

        first = stream.chunk()
        assert re.match(rb"retry: \d+\n\n", first), first
        relay.register("a1")
        body, started = b"", time.monotonic()
        while body.count(b": keepalive\n\n") < 3 or b"event: agent.status" not in body:
            assert time.monotonic() - started < 1, body  # 3 keepalives at 50 ms take ~150 ms
            piece = stream.chunk()
            assert piece, "the stream ended"
            body += piece
        frame = re.search(rb"id: (\d+)\nevent: agent\.status\ndata: (.*)\n\n", body)
        assert frame, body
        assert json.loads(frame.group(2))["id"] == "a1"
        # nothing but frames and comment lines on the wire
        for block in body.split(b"\n\n")[:-1]:
            assert block.startswith((b"id: ", b":")), block
    finally:
        stream.close()


def test_keepalives_keep_coming_while_unrelated_traffic_flows(relay_factory):
    """A `for` stream that nothing concerns still gets a comment every SSE_KEEPALIVE_MS,
    even while the relay is busy with other agents' messages."""
    relay = relay_factory(sse_keepalive_ms=50)
    for agent_id in ("quiet", "a", "b"):
        relay.register(agent_id)
    stream = RawStream(relay.host, relay.port, "/api/events?for=quiet")
    stop = threading.Event()

    def chatter():
        conn = http.client.HTTPConnection(relay.host, relay.port, timeout=10)
        while not stop.is_set():
            conn.request("POST", "/api/messages", json.dumps({"from": "a", "to": "b", "body": "x"}),
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
            stop.wait(0.01)
        conn.close()

    sender = threading.Thread(target=chatter)
    try:
        stream.head()
        stream.chunk()  # retry
        sender.start()
        body, deadline = b"", time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                body += stream.chunk(timeout=deadline - time.monotonic())
            except socket.timeout:
                break
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(5)
        stream.close()
    assert b"event:" not in body
    assert body.count(b": keepalive") >= 4, body


# ---------------------------------------------------------------------------
# Every state change emits its event
# ---------------------------------------------------------------------------


def test_every_state_change_emits_its_event(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock)
    stream = open_stream(relay)
    assert stream.status == 200

    def expect(*types):
        events = stream.take(len(types))
        assert kinds(events) == list(types), events
        return events

    def call(method, path, body=None, status=200):
        r = relay.call(method, path, body)
        assert r.status == status, r
        return r.json

    relay.register("a")
    assert expect("agent.status")[0]["data"]["status"] == "online"
    relay.register("b", tags=["x"])
    assert expect("agent.status")[0]["data"]["id"] == "b"
    call("PATCH", "/api/agents/a", {"status": "busy"})
    assert expect("agent.status")[0]["data"]["status"] == "busy"
    call("PATCH", "/api/agents/a", {"status": "offline"})
    assert expect("agent.status")[0]["data"]["status"] == "offline"
    call("POST", "/api/agents/a/heartbeat")  # an offline agent comes back
    assert expect("agent.status")[0]["data"]["status"] == "online"
    call("PATCH", "/api/agents/a", {"tags": ["t1"]})
    assert expect("agent.updated")[0]["data"]["tags"] == ["t1"]
    call("PATCH", "/api/agents/a/label", {"label": "alpha"})
    assert expect("agent.updated")[0]["data"]["label"] == "alpha"

    direct = relay.send("a", "b", "hello")
    assert expect("message.new")[0]["data"]["id"] == direct["id"]
    work = relay.send("a", "tag:x", "take me", claimable=True)
    assert expect("message.new")[0]["data"]["id"] == work["id"]
    call("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "b"})
    claimed = expect("message.claimed")[0]["data"]
    assert (claimed["id"], claimed["claimedBy"]) == (work["id"], "b")
    call("PATCH", "/api/messages/%d" % direct["id"], {"agentId": "b", "read": True})
    read = expect("message.read")[0]["data"]
    assert (read["agentId"], read["ids"]) == ("b", [direct["id"]])
    call("POST", "/api/messages/read", {"agentId": "b", "ids": [work["id"]]})
    assert expect("message.read")[0]["data"]["ids"] == [work["id"]]
    call("DELETE", "/api/messages/%d" % direct["id"])
    assert expect("message.deleted")[0]["data"]["id"] == direct["id"]

    late = relay.send("a", "b", "answer within 10 s", ackBy=10)
    expect("message.new")
    clock.advance(11)
    reap(relay)
    bounced, notice = expect("message.bounced", "message.new")
    assert bounced["data"]["id"] == late["id"]
    assert (notice["data"]["from"], notice["data"]["to"], notice["data"]["kind"]) == ("relay", "a", "system")

    clock.advance(200)  # past the default STALE_TTL_MS of 120 s
    reap(relay)
    stale = expect("agent.status", "agent.status")
    assert {(e["data"]["id"], e["data"]["status"]) for e in stale} == {("a", "offline"), ("b", "offline")}
    call("DELETE", "/api/agents/b")
    assert expect("agent.removed")[0]["data"]["id"] == "b"
    assert stream.until_registered(relay, "sentinel") == []


# ---------------------------------------------------------------------------
# Stored events: ids, replay, restart, reset
# ---------------------------------------------------------------------------


def test_event_ids_are_global_gap_free_and_increasing_under_concurrent_writers(relay, open_stream):
    live = open_stream(relay)
    for agent_id in ("a", "b", "c", "d"):
        relay.register(agent_id)

    def chatter(sender):
        for i in range(25):
            relay.send(sender, "broadcast", "%s %d" % (sender, i))

    threads = [threading.Thread(target=chatter, args=(s,)) for s in ("a", "b", "c", "d")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    events = live.take(4 + 100)
    ids = [e["id"] for e in events]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[0] == 1

    replayed = open_stream(relay, "/api/events?since=0").take(len(ids))
    assert [(e["id"], e["event"], e["data"]) for e in replayed] == [(e["id"], e["event"], e["data"]) for e in events]


def test_an_event_is_published_only_after_its_change_is_stored_and_refusals_emit_nothing(relay, open_stream):
    relay.register("a")
    relay.register("b")
    stream = open_stream(relay)
    for i in range(20):
        relay.send("a", "b", "m%d" % i)
        event = stream.next_event()
        # a subscriber acting on the event finds the change already there
        assert relay.call("GET", "/api/messages/%d" % event["data"]["id"]).status == 200
    refused = [relay.call("POST", "/api/messages", {"from": "a", "to": "nobody", "body": "x"}),
               relay.call("POST", "/api/messages", {"from": "a", "to": "b", "body": "x", "replyTo": 999}),
               relay.call("POST", "/api/messages", {"from": "a", "to": "tag:x", "body": "x", "ackBy": 5}),
               relay.call("PATCH", "/api/agents/a", {"status": "asleep"}),
               relay.call("POST", "/api/messages/1/claim", {"agentId": "b"})]
    assert [r.status for r in refused] == [404, 404, 400, 400, 400]
    assert stream.until_registered(relay, "sentinel") == []
    event_ids = [e["id"] for e in open_stream(relay, "/api/events?since=0").take(23)]
    assert event_ids == list(range(1, 24))  # and no id was used up by a refusal


@pytest.mark.parametrize("how", ["Last-Event-ID", "since"])
def test_reconnecting_gets_exactly_what_it_missed_in_order_then_live_events(relay, open_stream, how):
    first = open_stream(relay)
    relay.register("a")
    relay.register("b")
    last_seen = first.take(2)[-1]["id"]
    first.close()

    missed = [relay.send("a", "b", "missed %d" % i)["id"] for i in range(5)]
    relay.call("PATCH", "/api/agents/a", {"label": "renamed"})
    if how == "since":
        again = open_stream(relay, "/api/events?since=%d" % last_seen)
    else:
        again = open_stream(relay, headers={"Last-Event-ID": str(last_seen)})
    replayed = again.take(6)
    assert [e["id"] for e in replayed] == list(range(last_seen + 1, last_seen + 7))
    assert kinds(replayed) == ["message.new"] * 5 + ["agent.updated"]
    assert [e["data"]["id"] for e in replayed[:5]] == missed

    live = relay.send("b", "a", "live")
    event = again.next_event()
    assert (event["id"], event["event"], event["data"]["id"]) == (last_seen + 7, "message.new", live["id"])


def test_resuming_while_messages_flow_misses_nothing_and_repeats_nothing(relay):
    relay.register("a")
    relay.register("b")
    total = 300

    def sender():
        conn = http.client.HTTPConnection(relay.host, relay.port, timeout=10)
        for i in range(total):
            conn.request("POST", "/api/messages", json.dumps({"from": "a", "to": "b", "body": "m%d" % i}),
                         {"Content-Type": "application/json"})
            assert conn.getresponse().read()
        conn.close()

    thread = threading.Thread(target=sender)
    thread.start()
    seen, messages, rng = [], [], random.Random(3)
    try:
        reconnects = 0
        while len(messages) < total:
            last = seen[-1] if seen else 0
            if reconnects % 2:
                stream = Stream(relay, "/api/events?since=%d" % last)
            else:
                stream = Stream(relay, headers={"Last-Event-ID": str(last)})
            try:
                for _ in range(rng.randint(1, 40)):
                    event = stream.next_event(10)
                    assert event is not None
                    seen.append(event["id"])
                    if event["event"] == "message.new":
                        messages.append(event["data"]["id"])
                    if len(messages) == total:
                        break
            finally:
                stream.close()
            reconnects += 1
    finally:
        thread.join(30)
    assert seen == list(range(1, len(seen) + 1))
    assert messages == list(range(1, total + 1))
    assert reconnects > 10


def test_events_and_their_ids_survive_a_restart(relay_factory, tmp_path, open_stream):
    db_path = str(tmp_path / "restart.db")
    before = relay_factory(db_path=db_path)
    before.register("a")
    before.register("b")
    before.send("a", "b", "before the restart")
    old = open_stream(before, "/api/events?since=0").take(3)
    before.server.stop()

    after = relay_factory(db_path=db_path)
    message = after.send("b", "a", "after the restart")
    after.register("c")
    resumed = open_stream(after, headers={"Last-Event-ID": str(old[-1]["id"])})
    new = resumed.take(2)
    assert [e["id"] for e in new] == [old[-1]["id"] + 1, old[-1]["id"] + 2]
    assert kinds(new) == ["message.new", "agent.status"]
    assert new[0]["data"]["id"] == message["id"]

    everything = open_stream(after, "/api/events?since=0").take(5)
    assert [e["id"] for e in everything] == [1, 2, 3, 4, 5]
    assert [(e["event"], e["data"]) for e in everything[:3]] == [(e["event"], e["data"]) for e in old]


def test_resume_from_before_the_oldest_kept_event_starts_with_stream_reset(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock, retention_days=1)
    relay.register("a")
    relay.register("b")
    for i in range(3):
        relay.send("a", "b", "old %d" % i)
    watcher = open_stream(relay)
    clock.advance(2 * 86400)
    reap(relay)
    # the reap itself reports a and b going offline (and, 2 days idle, removed)
    kept = watcher.until_registered(relay, "fresh")
    assert kept and kept[0]["id"] > 5
    oldest = kept[0]["id"]

    stale = open_stream(relay, headers={"Last-Event-ID": "2"})
    reset = stale.next_event()
    assert reset["event"] == "stream.reset"
    relay.send("fresh", "broadcast", "after the reset")
    stale.until(lambda e: e["event"] == "message.new" and e["data"]["body"] == "after the reset")  # then live

    fine = open_stream(relay, "/api/events?since=%d" % (oldest - 1))
    first = fine.next_event()
    assert (first["event"], first["id"]) == (kept[0]["event"], oldest)


# ---------------------------------------------------------------------------
# ?for= and ?types=
# ---------------------------------------------------------------------------


def test_for_stream_delivers_what_concerns_the_agent_and_the_firehose_everything(relay, open_stream):
    relay.register("me", tags=["Backend"], capabilities=["review"], label="Fixer", machine="mac1")
    relay.register("ops-only", channels=["ops"], tags=["backend"])
    relay.register("other", tags=["frontend"], label="Painter", machine="mac2")
    relay.register("peer")
    mine = open_stream(relay, "/api/events?for=me")
    ops = open_stream(relay, "/api/events?for=ops-only")
    firehose = open_stream(relay)

    reaches_me = [relay.send("peer", to, "for me")["id"] for to in (
        "me", "id:me", "tag:backend", "tag:BACKEND", "cap:Review", "label:fixer", "machine:MAC1",
        "channel:ops", "broadcast")]
    reaches_me.append(relay.send("peer", "tag:backend", "channelled", channel="dev")["id"])
    not_me = [relay.send("peer", to, "not for me")["id"] for to in (
        "other", "id:other", "tag:frontend", "cap:ops", "label:painter", "machine:mac2")]
    not_me.append(relay.send("me", "broadcast", "my own group message")["id"])  # the sender never receives it
    not_me.append(relay.send("me", "tag:backend", "my own tag message")["id"])
    relay.call("PATCH", "/api/agents/other", {"tags": ["frontend", "css"]})  # agent.updated: not mine
    relay.call("PATCH", "/api/agents/other", {"status": "busy"})  # agent.status: everyone's
    relay.call("DELETE", "/api/agents/peer")  # agent.removed: everyone's

    got = mine.until_registered(relay, "sentinel")
    assert [e["data"]["id"] for e in got if e["event"] == "message.new"] == reaches_me
    assert [(e["event"], e["data"]["id"]) for e in got if not e["event"].startswith("message.")] == [
        ("agent.status", "other"), ("agent.removed", "peer")]

    # channel filter: ops-only hears unchannelled and #ops traffic, not #dev
    got = ops.until(lambda e: e["event"] == "agent.status" and e["data"]["id"] == "sentinel")
    ops_ids = [e["data"]["id"] for e in got if e["event"] == "message.new"]
    assert ops_ids == [reaches_me[i] for i in (2, 3, 7, 8)] + not_me[-2:]

    everything = firehose.until(lambda e: e["event"] == "agent.status" and e["data"]["id"] == "sentinel")
    assert sorted(e["data"]["id"] for e in everything if e["event"] == "message.new") == sorted(reaches_me + not_me)
    assert "agent.updated" in kinds(everything)


def test_for_stream_carries_the_agents_own_status_and_follows_its_tag_changes(relay, open_stream):
    relay.register("me", tags=["old"])
    relay.register("peer")
    mine = open_stream(relay, "/api/events?for=me")
    relay.call("PATCH", "/api/agents/me", {"status": "busy"})
    event = mine.next_event()
    assert (event["event"], event["data"]["id"], event["data"]["status"]) == ("agent.status", "me", "busy")
    relay.call("PATCH", "/api/agents/me", {"tags": ["new"]})
    assert mine.next_event()["event"] == "agent.updated"
    fresh = relay.send("peer", "tag:new", "to the new tag")
    relay.send("peer", "tag:old", "to the old tag")
    got = mine.until_registered(relay, "sentinel")
    assert [(e["event"], e["data"]["id"]) for e in got] == [("message.new", fresh["id"])]


def test_for_stream_message_ids_equal_the_inbox_for_many_messages_of_every_target_kind(relay, open_stream):
    rng = random.Random(7)
    agents = {
        "b": dict(tags=["api", "db"], capabilities=["review"], label="Builder", machine="m1", channels=["ops"]),
        "c": dict(tags=["api"], capabilities=["chat"], label="Checker", machine="m2", channels=[]),
        "d": dict(tags=["web"], capabilities=["review", "chat"], label="Doc", machine="m1", channels=["dev"]),
        "e": dict(tags=["db"], capabilities=[], label="Echo", machine="m3", channels=["ops", "dev"]),
    }
    for agent_id, fields in agents.items():
        relay.register(agent_id, **fields)
    streams = {agent_id: open_stream(relay, "/api/events?for=" + agent_id) for agent_id in agents}
    targets = (["b", "c", "d", "e", "id:b", "id:c", "broadcast", "channel:ops", "channel:dev", "channel:misc"]
               + ["tag:" + t for t in ("api", "API", "db", "web", "none")]
               + ["cap:" + c for c in ("review", "chat", "none")]
               + ["label:" + x for x in ("builder", "CHECKER", "doc", "echo", "nobody")]
               + ["machine:" + m for m in ("m1", "M2", "m3", "m9")])
    sent = 0
    for i in range(300):
        body = {"from": rng.choice(["b", "c", "d", "e", "outsider"]), "to": rng.choice(targets), "body": "m%d" % i}
        if rng.random() < 0.4:
            body["channel"] = rng.choice(["ops", "dev", "misc"])
        if rng.random() < 0.2:
            body["claimable"] = True
        r = relay.call("POST", "/api/messages", body)
        assert r.status == 201, r
        sent += 1
    for agent_id, stream in streams.items():
        got = stream.until_registered(relay, "sentinel-" + agent_id)
        on_stream = [e["data"]["id"] for e in got if e["event"] == "message.new"]
        in_inbox = [m["id"] for m in relay.inbox(agent_id, limit=1000)]
        assert 0 < len(in_inbox) < sent
        assert on_stream == in_inbox, agent_id


def test_the_send_answer_the_stored_message_and_its_event_are_the_same_record(relay, open_stream):
    """The answer to a send is built as it is stored (not read back), so it
    must equal what GET answers and what message.new carries, field by field."""
    relay.register("a")
    relay.register("b", tags=["ops"])
    stream = open_stream(relay, "/api/events?types=message.new")
    root = relay.send("a", "b", "root")
    sent = [root, relay.send("a", "tag:ops", "with everything", channel="Ops", subject="s", claimable=True,
                             replyTo=root["id"], meta={"k": [1, "é"]}, ttlSeconds=600)]
    sent.append(relay.send("a", "b", "acked", ackBy=60))
    events = [stream.next_event(10)["data"] for _ in sent]
    for answer, event in zip(sent, events):
        stored = relay.call("GET", "/api/messages/%d" % answer["id"]).json
        assert answer == stored == event
    assert sent[1]["threadId"] == root["id"] == root["threadId"] and sent[2]["threadId"] == sent[2]["id"]
    assert sent[1]["recipients"] == ["b"] and sent[1]["expiresAt"] is not None


def test_types_narrows_the_stream(relay, open_stream):
    relay.register("a")
    relay.register("b")
    narrow = open_stream(relay, "/api/events?types=message.new,agent.removed")
    both = open_stream(relay, "/api/events?for=b&types=message.new")
    m1 = relay.send("a", "b", "one")
    m2 = relay.send("a", "tag:nobody", "two")
    relay.call("PATCH", "/api/agents/a", {"label": "x", "status": "busy"})
    relay.call("DELETE", "/api/agents/a")
    m3 = relay.send("b", "b", "three")
    got = narrow.take(4)
    assert [(e["event"], e["data"]["id"]) for e in got] == [
        ("message.new", m1["id"]), ("message.new", m2["id"]), ("agent.removed", "a"), ("message.new", m3["id"])]
    got = both.take(2)
    assert [(e["event"], e["data"]["id"]) for e in got] == [("message.new", m1["id"]), ("message.new", m3["id"])]


@pytest.mark.parametrize("query", ["types=message.new,message.exploded", "types=bogus", "for=a&types=message"])
def test_unknown_event_type_is_400_naming_types(relay, query):
    relay.register("a")
    r = relay.call("GET", "/api/events?" + query)
    assert r.status == 400, r
    assert r.json["field"] == "types"
    assert sse_clients(relay) == 0


def test_stream_for_an_unknown_agent_is_404(relay):
    r = relay.call("GET", "/api/events?for=ghost")
    assert r.status == 404, r
    assert r.json["code"] == "unknown_agent"
    assert sse_clients(relay) == 0


# ---------------------------------------------------------------------------
# Slow subscribers
# ---------------------------------------------------------------------------


def test_a_stuck_subscriber_never_slows_senders_or_other_subscribers(relay, open_stream):
    """A subscriber that stops reading fills its socket buffers, then its
    bounded queue, and is cut off; sends keep answering 201 meanwhile and
    a subscriber that keeps reading gets every event in order."""
    relay.register("a")
    relay.register("b")
    body = "x" * 4000
    normal = open_stream(relay, "/api/events?types=message.new")
    stuck = RawStream(relay.host, relay.port, "/api/events?types=message.new", rcvbuf=4096)  # never read
    wait_until(lambda: sse_clients(relay) == 2)

    received = []

    def read_all():
        while True:
            event = normal.next_event(30)
            if event is None or event["data"]["body"] == "done":
                return
            received.append(event["data"]["id"])

    reader = threading.Thread(target=read_all)
    reader.start()
    statuses, sent = [], []
    conn = http.client.HTTPConnection(relay.host, relay.port, timeout=10)

    def send(text):
        conn.request("POST", "/api/messages", json.dumps({"from": "a", "to": "b", "body": text}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        statuses.append(response.status)
        return json.loads(response.read())["id"]

    started = time.monotonic()
    try:
        # at least 3000 events of 4 KB (more than the socket buffers and the
        # queue hold here); then on, in batches, until the stuck one is cut
        while len(sent) < 3000 or (sse_clients(relay) > 1 and len(sent) < 12000):
            sent += [send("%d %s" % (len(sent) + i, body)) for i in range(100)]
        send("done")
        elapsed = time.monotonic() - started
    finally:
        conn.close()
        reader.join(30)
    try:
        assert statuses == [201] * (len(sent) + 1)
        assert elapsed < 20
        assert received == sent
        assert sse_clients(relay) == 1, "the stuck subscriber is still connected after %d events" % len(sent)
        assert stuck.read_to_end(10) is not None, "the stuck subscriber's connection was never closed"
    finally:
        stuck.close()


# ---------------------------------------------------------------------------
# Delivery receipts and ackBy
# ---------------------------------------------------------------------------


def test_reading_the_inbox_marks_delivered_and_marking_read_sets_read_at(relay):
    relay.register("a")
    relay.register("b", tags=["team"])
    relay.register("c", tags=["team"])
    group = relay.send("a", "tag:team", "to the team")
    assert receipts(relay, group["id"]) == {
        "b": {"agentId": "b", "deliveredAt": None, "readAt": None},
        "c": {"agentId": "c", "deliveredAt": None, "readAt": None}}

    relay.inbox("b")
    got = receipts(relay, group["id"])
    assert got["b"]["deliveredAt"] is not None and got["b"]["readAt"] is None
    assert got["c"]["deliveredAt"] is None

    r = relay.call("PATCH", "/api/messages/%d" % group["id"], {"agentId": "b", "read": True})
    assert r.status == 200 and r.json["read"] is True
    assert receipts(relay, group["id"])["b"]["readAt"] is not None

    second = relay.send("a", "c", "direct")
    r = relay.call("POST", "/api/messages/read", {"agentId": "c", "ids": [group["id"], second["id"]]})
    assert r.json == {"marked": 2}
    for message_id in (group["id"], second["id"]):
        got = receipts(relay, message_id)["c"]
        assert got["readAt"] is not None and got["deliveredAt"] is not None

    third = relay.send("a", "tag:team", "up to")
    assert relay.call("POST", "/api/messages/read", {"agentId": "b", "upTo": third["id"]}).json == {"marked": 1}
    assert receipts(relay, third["id"])["b"]["readAt"] is not None
    assert receipts(relay, third["id"])["c"]["readAt"] is None


def test_receiving_message_new_on_its_own_stream_marks_delivered(relay, open_stream):
    relay.register("a")
    relay.register("b", tags=["team"])
    relay.register("c", tags=["team"])
    stream = open_stream(relay, "/api/events?for=b")
    direct = relay.send("a", "b", "direct")
    group = relay.send("a", "tag:team", "group")
    assert [e["data"]["id"] for e in stream.take(2)] == [direct["id"], group["id"]]
    wait_until(lambda: receipts(relay, direct["id"])["b"]["deliveredAt"] is not None, timeout=2)
    wait_until(lambda: receipts(relay, group["id"])["b"]["deliveredAt"] is not None, timeout=2)
    assert receipts(relay, group["id"])["c"]["deliveredAt"] is None  # c has no stream and read nothing
    assert receipts(relay, direct["id"])["b"]["readAt"] is None


def test_a_stream_that_filters_out_message_new_does_not_mark_delivered(relay, open_stream):
    relay.register("a")
    relay.register("b")
    stream = open_stream(relay, "/api/events?for=b&types=agent.status")
    message = relay.send("a", "b", "never shown on that stream")
    assert stream.until_registered(relay, "sentinel") == []
    relay.relay.deliveries.flush()  # what the housekeeping thread does every 100 ms
    assert receipts(relay, message["id"])["b"]["deliveredAt"] is None


def test_unread_direct_message_with_ack_by_bounces_to_the_sender(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock)
    relay.register("a")
    relay.register("b")
    sender_stream = open_stream(relay, "/api/events?for=a")
    message = relay.send("a", "b", "please confirm", ackBy=10)
    relay.inbox("b")  # delivered is not read: it still bounces
    clock.advance(11)
    reap(relay)
    got = sender_stream.until_registered(relay, "sentinel")
    bounced = [e for e in got if e["event"] == "message.bounced"]
    assert len(bounced) == 1 and bounced[0]["data"]["id"] == message["id"]
    notices = [m for m in relay.inbox("a") if m["kind"] == "system"]
    assert len(notices) == 1
    assert notices[0]["from"] == "relay" and notices[0]["to"] == "a"
    assert str(message["id"]) in notices[0]["body"]
    clock.advance(11)
    reap(relay)  # a bounce happens once
    assert len([m for m in relay.inbox("a") if m["kind"] == "system"]) == 1


def test_a_message_read_in_time_does_not_bounce(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock)
    relay.register("a")
    relay.register("b")
    firehose = open_stream(relay)
    message = relay.send("a", "b", "please confirm", ackBy=10)
    clock.advance(5)
    r = relay.call("PATCH", "/api/messages/%d" % message["id"], {"agentId": "b", "read": True})
    assert r.status == 200, r
    clock.advance(6)
    reap(relay)
    got = firehose.until_registered(relay, "sentinel")
    assert kinds(got) == ["message.new", "message.read"]
    assert relay.inbox("a") == []


@pytest.mark.parametrize("to", ["tag:x", "cap:x", "label:x", "machine:x", "channel:x", "broadcast"])
def test_ack_by_on_a_group_target_is_400_naming_ack_by(relay, to):
    relay.register("a", tags=["x"])
    before = relay.snapshot()
    r = relay.call("POST", "/api/messages", {"from": "a", "to": to, "body": "hi", "ackBy": 10})
    assert r.status == 400, r
    assert r.json["field"] == "ackBy"
    assert relay.snapshot() == before


# ---------------------------------------------------------------------------
# The reaper
# ---------------------------------------------------------------------------


def test_reaper_marks_stale_agents_offline_then_removes_long_offline_ones(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock, stale_ttl_ms=60000, offline_prune_ms=3600000)
    relay.register("a")
    relay.register("b")
    stream = open_stream(relay)
    clock.advance(30)
    assert relay.call("POST", "/api/agents/b/heartbeat").status == 200
    clock.advance(31)
    counts = reap(relay)
    assert (counts["stale"], counts["pruneOffline"]) == (1, 0)
    event = stream.next_event()
    assert (event["event"], event["data"]["id"], event["data"]["status"]) == ("agent.status", "a", "offline")
    assert relay.call("GET", "/api/agents/a").json["status"] == "offline"
    assert relay.call("GET", "/api/agents/b").json["status"] == "online"

    clock.advance(3559)  # a: 3620 s since last seen, b: 3590 s
    counts = reap(relay)
    assert (counts["stale"], counts["pruneOffline"]) == (1, 1)
    got = stream.take(2)
    assert [(e["event"], e["data"]["id"]) for e in got] == [("agent.status", "b"), ("agent.removed", "a")]
    assert relay.call("GET", "/api/agents/a").status == 404
    assert relay.call("GET", "/api/agents/b").json["status"] == "offline"
    assert stream.until_registered(relay, "sentinel") == []


def test_reaper_prunes_messages_and_events_past_retention(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock, retention_days=1)
    relay.register("a")
    relay.register("b")
    old = [relay.send("a", "b", "old %d" % i)["id"] for i in range(3)]
    clock.advance(0.5 * 86400)
    watcher = open_stream(relay)
    fresh = relay.send("a", "b", "fresh")
    fresh_event = watcher.next_event()
    clock.advance(0.6 * 86400)
    reap(relay)

    remaining = [m["id"] for m in relay.call("GET", "/api/messages?limit=1000").json["messages"]]
    assert remaining == [fresh["id"]]
    assert all(relay.call("GET", "/api/messages/%d" % i).status == 404 for i in old)
    replay = open_stream(relay, "/api/events?since=%d" % (fresh_event["id"] - 1))
    first = replay.next_event()
    assert (first["id"], first["event"], first["data"]["id"]) == (fresh_event["id"], "message.new", fresh["id"])
    assert open_stream(relay, "/api/events?since=0").next_event()["event"] == "stream.reset"


def test_reaper_thread_marks_an_idle_agent_offline_by_itself(relay_factory, open_stream):
    relay = relay_factory(stale_ttl_ms=100, reap_interval_ms=50)
    stream = open_stream(relay)
    relay.register("idle")
    assert stream.next_event()["data"]["status"] == "online"
    event = stream.next_event(timeout=3)
    assert (event["event"], event["data"]["id"], event["data"]["status"]) == ("agent.status", "idle", "offline")
    assert relay.call("GET", "/api/agents/idle").json["status"] == "offline"


def test_reaper_step_errors_are_contained(relay_factory, clock, open_stream):
    relay = relay_factory(clock=clock)
    relay.register("a")
    stream = open_stream(relay)
    clock.advance(300)
    server_relay = relay.relay

    def boom(now):
        server_relay.emit("agent.updated", {"id": "a", "half": "done"})  # rolled back with the step
        raise RuntimeError("boom")

    result = server_relay.run_steps([("boom", boom), ("stale", server_relay.mark_stale_offline)], server_relay.now())
    assert result == {"boom": None, "stale": 1}
    event = stream.next_event()
    assert (event["event"], event["data"]["id"], event["data"]["status"]) == ("agent.status", "a", "offline")
    assert event["id"] == 2  # the rolled-back event left no trace and no gap
    assert stream.until_registered(relay, "sentinel") == []


def test_reaper_thread_keeps_going_after_a_failing_step(relay_factory):
    relay = relay_factory(stale_ttl_ms=100, reap_interval_ms=50)
    server_relay = relay.relay
    failures = []

    def boom(now):
        failures.append(now)
        raise RuntimeError("boom")

    original = server_relay.reap_steps
    server_relay.reap_steps = lambda: [("boom", boom)] + original()
    relay.register("idle")
    wait_until(lambda: relay.call("GET", "/api/agents/idle").json["status"] == "offline", timeout=3)
    wait_until(lambda: len(failures) >= 3, timeout=3)


# ---------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------


def test_sigterm_ends_every_open_stream_promptly_and_exits_0(spawn_relay):
    spawned = spawn_relay()
    assert spawned.url, spawned.first_line
    host, port = spawned.url.split("//")[1].rsplit(":", 1)
    streams = [RawStream(host, int(port)) for _ in range(50)]
    try:
        for stream in streams:
            status, _, _ = stream.head()
            assert status == 200
            assert stream.chunk().startswith(b"retry:")
        started = time.monotonic()
        spawned.proc.send_signal(signal.SIGTERM)
        assert spawned.proc.wait(5) == 0
        assert time.monotonic() - started < 2
        # each stream was ended by the relay (the last chunk), not just dropped with the process
        tails = [stream.read_to_end(2) for stream in streams]
        assert [tail is not None and tail.endswith(b"0\r\n\r\n") for tail in tails] == [True] * 50, tails
    finally:
        for stream in streams:
            stream.close()
