"""Issue 11: the tests a trusted message system runs on itself.

Every test drives the real relay over real sockets on loopback: in-process
(`relay_factory`) where a test injects a fault into the outside world (a
full or read-only disk) or races many clients, as a subprocess
(`spawn_relay`) where it kills the relay or measures its memory, threads
and open files. Nothing here mocks the relay.

  1. Crash safety     SIGKILL in the middle of concurrent sends, claims, task
                      updates and callback deliveries; every 2xx survives
  2. Races            claim races, concurrent ingress of one dedupeKey,
                      transactions that share one COMMIT (group commit)
  3. Storage faults   disk full (max_page_count), read-only file (chattr +i)
  4. Bad input        schemathesis over /api/openapi.json, hostile JSON
                      values, a raw-socket fuzzer, ambiguous HTTP framing
  5. Exhaustion       500 slowloris connections and 500 idle SSE streams
  6. Browser attacks  cross-site text/plain fetch, form posts, DNS rebinding:
                      as raw requests and in a real headless Chromium
  7. Soak verdict     bench/soak.py's judge of drift and leaks

The heavy tests are marked `slow` (still part of the suite: the whole file
takes about two and a half minutes on two cores). Counts scale by
environment variable for longer runs: RELIABILITY_CRASH_TRIALS (20),
RELIABILITY_CLAIM_RACES (1000), RELIABILITY_FUZZ_EXAMPLES (schemathesis
examples per operation, 30), RELIABILITY_FUZZ_MUTATIONS (400). The
schemathesis test needs `pip install schemathesis` and skips without it;
the Chromium test needs Debian's `chromium` and skips without it.
bench/soak.py is the long-running counterpart (10 minutes by default).
"""

import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import agent_relay
from conftest import TEST_DB_URL, EventReader, StubServer, wait_until

CRASH_TRIALS = int(os.environ.get("RELIABILITY_CRASH_TRIALS", "20"))
CLAIM_RACES = int(os.environ.get("RELIABILITY_CLAIM_RACES", "1000"))
FUZZ_EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "30"))
FUZZ_MUTATIONS = int(os.environ.get("RELIABILITY_FUZZ_MUTATIONS", "400"))

OPS_TOKEN = "ops-token-reliability-01"
HOOK_SECRET = "reliability-hook-secret"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def strict_json(raw):
    """Parse as RFC 8259 JSON: NaN and Infinity (which Python's json writes
    and reads) are not JSON, and a browser's JSON.parse rejects them."""
    def refuse(name):
        raise ValueError("%s is not JSON" % name)
    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


class Connection:
    """One keep-alive HTTP/1.1 connection that reconnects after an error."""

    def __init__(self, host, port, timeout=10):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def call(self, method, path, body=None, token=None, headers=None):
        """(status, decoded JSON answer); raises OSError/HTTPException when the relay is gone."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body)
            sent["Content-Type"] = "application/json"
        if token:
            sent["Authorization"] = "Bearer " + token
        try:
            self.conn.request(method, path, body=data, headers=sent)
            answer = self.conn.getresponse()
            raw = answer.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if answer.will_close:
            self.close()
        return answer.status, (strict_json(raw) if raw else None)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def endpoint(url):
    """(host, port) of an `http://host:port` URL."""
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
    return host, int(port)


def process_usage(pid):
    """(RSS in KiB, threads, open file descriptors) of a process, from /proc."""
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return int(fields["VmRSS"][0]), int(fields["Threads"][0]), len(os.listdir("/proc/%d/fd" % pid))


def integrity_check(db_path, scratch):
    """PRAGMA integrity_check on a copy of the database and its WAL, taken
    while no relay runs: the check itself must not change what the next
    relay finds (the last connection to close checkpoints the WAL)."""
    os.makedirs(scratch, exist_ok=True)
    copy = os.path.join(scratch, "check.db")
    for suffix in ("", "-wal"):
        if os.path.exists(copy + suffix):
            os.remove(copy + suffix)
        if os.path.exists(db_path + suffix):
            shutil.copyfile(db_path + suffix, copy + suffix)
    conn = sqlite3.connect(copy)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def all_messages(conn):
    """Every stored message by id (paged with `since`)."""
    found, since = {}, 0
    while True:
        status, answer = conn.call("GET", "/api/messages?limit=1000&since=%d" % since)
        assert status == 200, answer
        for message in answer["messages"]:
            found[message["id"]] = message
        if len(answer["messages"]) < 1000:
            return found
        since = answer["messages"][-1]["id"]


def stream_client(host, port):
    """What conftest's EventReader needs to open a stream."""
    return types.SimpleNamespace(host=host, port=port, token=None)


def integrations(receiver_url=None):
    """AGENT_RELAY_INTEGRATIONS with one integration, `ops`, for cap:work (and its callbacks)."""
    entry = {"name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create", "tasks:read", "tasks:write"],
             "targets": ["cap:work"]}
    if receiver_url:
        entry.update(callbackUrl=receiver_url, callbackSecret=HOOK_SECRET)
    return json.dumps([entry])


class CallbackReceiver:
    """A loopback webhook endpoint that records every delivery by its
    webhook-id. While `flaky`, it refuses about a fifth of them (503) and
    takes a few milliseconds over each, so a SIGKILL often lands while a
    delivery is in flight or waiting for its retry."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.flaky = True
        self.lock = threading.Lock()
        self.delivered = {}  # webhook-id -> (task id, event)
        self.refused = 0
        receiver = self

        def respond(handler, body):
            with receiver.lock:
                refuse = receiver.flaky and receiver.rng.random() < 0.2
                delay = receiver.rng.uniform(0.002, 0.02) if receiver.flaky else 0
            time.sleep(delay)
            if refuse:
                with receiver.lock:
                    receiver.refused += 1
            else:
                payload = json.loads(body)
                with receiver.lock:
                    receiver.delivered[handler.headers["webhook-id"]] = (payload["task"]["id"], payload["event"])
            return 503 if refuse else 200, [], b""

        self.http = StubServer(respond)
        self.url = self.http.url + "/hook"

    def counts(self):
        """Distinct deliveries per (task id, event)."""
        with self.lock:
            return collections.Counter(self.delivered.values())

    def close(self):
        self.http.close()


# ---------------------------------------------------------------------------
# 1. Crash safety
# ---------------------------------------------------------------------------


class Ledger:
    """What the relay acknowledged with a 2xx across the crash trials, and
    what was only attempted (a request cut off by the kill may or may not
    have committed; only an answered one is a promise)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.agents = set()
        self.messages = {}  # id -> body
        self.claimable = []
        self.message_winners = collections.defaultdict(set)
        self.tasks = {}  # id -> dedupeKey
        self.task_winners = collections.defaultdict(set)
        self.statuses_tried = collections.defaultdict(list)
        self.statuses_acked = collections.defaultdict(list)
        self.callbacks = collections.Counter()  # (task id, event) -> acknowledged changes
        self.events = {}  # event id -> type, as a live stream delivered it (one watcher, resuming)
        self.last_event_id = None

    def message(self, message_id, body, claimable):
        with self.lock:
            self.messages[message_id] = body
            if claimable:
                self.claimable.append(message_id)

    def pick_claimable(self, rng):
        with self.lock:
            recent = self.claimable[-8:]
            if not recent:
                return None
            return rng.choice(recent if rng.random() < 0.8 else self.claimable)

    def task(self, task_id, key):
        with self.lock:
            self.tasks[task_id] = key
            self.callbacks[(task_id, "task.created")] += 1

    def pick_unclaimed_task(self, rng):
        with self.lock:
            open_ids = [t for t in list(self.tasks)[-8:] if not self.task_winners.get(t)]
            return rng.choice(open_ids) if open_ids else None

    def task_claimed(self, task_id, agent_id):
        with self.lock:
            first = agent_id not in self.task_winners[task_id]  # the holder claiming again only renews
            self.task_winners[task_id].add(agent_id)
            if first:
                self.callbacks[(task_id, "task.claimed")] += 1

    def status_tried(self, task_id, status):
        with self.lock:
            self.statuses_tried[task_id].append(status)

    def status_acked(self, task_id, status):
        with self.lock:
            self.statuses_acked[task_id].append(status)
            self.callbacks[(task_id, "task.status")] += 1


class CrashTraffic:
    """Concurrent senders, claimers (messages and tasks, racing each other)
    and an integration creating tasks, against one relay until stopped."""

    SENDERS = ("sender-0", "sender-1")
    WORKERS = ("worker-0", "worker-1", "worker-2")

    def __init__(self, host, port, ledger, trial):
        self.host, self.port = host, port
        self.ledger = ledger
        self.trial = trial
        self.stopping = threading.Event()
        self.errors = []
        self.threads = []
        steps = [(self._sender, name) for name in self.SENDERS] + [(self._claimer, name) for name in self.WORKERS]
        steps.append((self._ingress, "ops"))
        for number, (step, name) in enumerate(steps):
            rng = random.Random("%d-%d" % (trial, number))
            self.threads.append(threading.Thread(target=self._loop, args=(step, name, rng), daemon=True))
        self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def start(self):
        for thread in self.threads:
            thread.start()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)
            assert not thread.is_alive(), "a traffic thread is stuck"
        assert not self.errors, self.errors

    def _loop(self, step, name, rng):
        conn = Connection(self.host, self.port, timeout=5)
        count = 0
        while not self.stopping.is_set():
            count += 1
            try:
                step(conn, name, rng, count)
            except (OSError, http.client.HTTPException):
                self.stopping.wait(0.005)  # the relay is gone (killed): keep trying until told to stop
        conn.close()

    def _watch(self):
        """Follow the firehose, resuming with Last-Event-ID after every cut,
        kill and restart: ids must only ever increase."""
        ledger = self.ledger
        while not self.stopping.is_set():
            headers = {} if ledger.last_event_id is None else {"Last-Event-ID": str(ledger.last_event_id)}
            try:
                stream = EventReader(stream_client(self.host, self.port), "/api/events", headers)
            except (OSError, http.client.HTTPException):
                self.stopping.wait(0.005)
                continue
            try:
                while True:
                    event = stream.next_event(timeout=30)
                    if event is None:
                        break
                    if ledger.last_event_id is not None and event["id"] <= ledger.last_event_id:
                        self.errors.append("event %d after %d" % (event["id"], ledger.last_event_id))
                    if event["event"] == "stream.reset":
                        self.errors.append("a resume got stream.reset: %r" % event)
                    ledger.events[event["id"]] = event["event"]
                    ledger.last_event_id = event["id"]
            except (OSError, http.client.HTTPException, ValueError):
                pass  # killed mid-frame
            finally:
                stream.close()

    def _sender(self, conn, name, rng, count):
        body = "trial %d %s #%d" % (self.trial, name, count)
        claimable = count % 2 == 0
        status, answer = conn.call("POST", "/api/messages", {"from": name, "to": "cap:work", "body": body,
                                                             "claimable": claimable})
        if status == 201:
            self.ledger.message(answer["id"], body, claimable)

    def _claimer(self, conn, name, rng, count):
        if rng.random() < 0.5:
            message_id = self.ledger.pick_claimable(rng)
            if message_id is None:
                return
            status, answer = conn.call("POST", "/api/messages/%d/claim" % message_id, {"agentId": name})
            if status == 200:
                with self.ledger.lock:
                    self.ledger.message_winners[message_id].add(name)
            return
        task_id = self.ledger.pick_unclaimed_task(rng)
        if task_id is None:
            return
        status, answer = conn.call("POST", "/api/tasks/%d/claim" % task_id, {"agentId": name})
        if status != 200:
            return
        self.ledger.task_claimed(task_id, name)
        for new_status in ("in_progress", "done"):
            self.ledger.status_tried(task_id, new_status)
            status, _ = conn.call("PATCH", "/api/tasks/%d/status" % task_id,
                                  {"claimToken": answer["claimToken"], "status": new_status})
            if status != 200:
                return
            self.ledger.status_acked(task_id, new_status)

    def _ingress(self, conn, name, rng, count):
        key = "trial-%d-job-%d" % (self.trial, count)
        status, answer = conn.call("POST", "/api/integrations/events", {
            "type": "job", "title": key, "dedupeKey": key, "target": "cap:work"}, token=OPS_TOKEN)
        if status == 201:
            self.ledger.task(answer["task"]["id"], key)
        self.stopping.wait(0.04)


def check_acknowledged_state(conn, ledger):
    """Everything answered 2xx is there, and every claim has one winner."""
    status, answer = conn.call("GET", "/api/agents?limit=1000")
    assert status == 200
    assert ledger.agents <= {a["id"] for a in answer["agents"]}
    messages = all_messages(conn)
    lost = [i for i, body in ledger.messages.items() if i not in messages or messages[i]["body"] != body]
    assert not lost, "acknowledged messages lost or changed: %r" % lost[:10]
    for message_id, winners in ledger.message_winners.items():
        assert len(winners) == 1, "message %d has two claim winners: %r" % (message_id, winners)
        assert messages[message_id]["claimedBy"] in winners, messages[message_id]
    status, answer = conn.call("GET", "/api/tasks?limit=1000")
    assert status == 200 and len(answer["tasks"]) < 1000, "too many tasks to list in one page"
    tasks = {t["id"]: t for t in answer["tasks"]}
    lost = [i for i in ledger.tasks if i not in tasks]
    assert not lost, "acknowledged tasks lost: %r" % lost[:10]
    for task_id, winners in ledger.task_winners.items():
        assert len(winners) == 1, "task %d has two claim winners: %r" % (task_id, winners)
        assert tasks[task_id]["claimedBy"] in winners, tasks[task_id]
        tried, acked = ledger.statuses_tried[task_id], ledger.statuses_acked[task_id]
        # The stored status is the last acknowledged one, or one tried after it
        # whose answer the kill cut off.
        allowed = tried[len(acked) - 1:] if acked else ["claimed"] + tried
        assert tasks[task_id]["status"] in allowed, (tasks[task_id], tried, acked)
    return messages


@pytest.mark.slow
def test_sigkill_during_concurrent_traffic_loses_nothing_acknowledged(spawn_relay, tmp_path):
    """CRASH_TRIALS times: start the relay on the same database, run
    concurrent sends, claims, task claims and updates and callback
    deliveries, SIGKILL it at a random moment, check the database file, and
    restart. Every 2xx answer must still hold after each restart, no claim
    may ever have had two winners, PRAGMA integrity_check passes after each
    kill, and after the last restart every pending callback is delivered.
    A watcher follows the event stream throughout, resuming with
    Last-Event-ID after each restart: it never sees an id go backwards, and
    the stored log holds every event it saw, with nothing it skipped."""
    receiver = CallbackReceiver(seed=11)
    ledger = Ledger()
    db_path = str(tmp_path / "crash.db")
    rng = random.Random(2026)
    pending_at_kill = 0  # acknowledged task changes whose callback had not arrived when the relay died
    base_env = {"AGENT_RELAY_INTEGRATIONS": integrations(receiver.url), "CALLBACK_RETRY_BASE_MS": "20",
                "CALLBACK_MAX_ATTEMPTS": "1000", "CALLBACK_TIMEOUT_MS": "2000", "REAP_INTERVAL_MS": "100"}
    try:
        for trial in range(CRASH_TRIALS + 1):
            # One trial in four runs with DURABILITY=full: both must survive a process crash.
            env = dict(base_env, DURABILITY="full" if trial % 4 == 3 else "normal")
            relay = spawn_relay(env=env, db_path=db_path)
            assert relay.url, relay.first_line
            conn = Connection(*endpoint(relay.url))
            check_acknowledged_state(conn, ledger)
            if trial == CRASH_TRIALS:
                break
            for agent_id in CrashTraffic.SENDERS + CrashTraffic.WORKERS + ("probe-%d" % trial,):
                status, _ = conn.call("POST", "/api/agents", {"id": agent_id, "capabilities": ["work"]})
                assert status in (200, 201)
                ledger.agents.add(agent_id)
            traffic = CrashTraffic(*endpoint(relay.url), ledger=ledger, trial=trial)
            traffic.start()
            time.sleep(rng.uniform(0.3, 0.9))
            relay.proc.kill()
            relay.stop(signal.SIGKILL)
            traffic.stop()
            delivered = receiver.counts()
            pending_at_kill += sum(max(0, n - delivered[key]) for key, n in ledger.callbacks.items())
            conn.close()
            assert relay.proc.returncode == -signal.SIGKILL
            assert integrity_check(db_path, str(tmp_path / "check")) == ["ok"], "trial %d" % trial

        # The last relay is running: everything pending gets delivered.
        assert len(ledger.messages) > 20 * CRASH_TRIALS and len(ledger.tasks) > 2 * CRASH_TRIALS, (
            "too little traffic to mean anything")
        assert any(ledger.statuses_acked.values()) and any(ledger.message_winners.values())
        assert pending_at_kill > 0, "no kill ever caught a callback undelivered"
        assert len(ledger.events) > 50 * CRASH_TRIALS, "the watcher saw too few events"
        receiver.flaky = False

        def undelivered():
            delivered = receiver.counts()
            return {key: n for key, n in ledger.callbacks.items() if delivered[key] < n}
        wait_until(lambda: not undelivered(), timeout=30, interval=0.1)

        # The stored event log: every acknowledged message has its message.new,
        # and every event the watcher saw live is there with the same type,
        # with nothing between them that the resuming watcher missed.
        host, port = endpoint(relay.url)
        log, unlogged, last_logged = {}, set(ledger.messages), 0
        stream = EventReader(stream_client(host, port), "/api/events?since=0")
        try:
            deadline = time.monotonic() + 60
            while last_logged < max(ledger.events) or unlogged:
                assert time.monotonic() < deadline, "the replay stops at event %d; message.new missing for %r" % (
                    last_logged, sorted(unlogged)[:10])
                event = stream.next_event(timeout=10)
                assert event is not None and event["id"] > last_logged
                last_logged = event["id"]
                log[event["id"]] = event["event"]
                if event["event"] == "message.new":
                    unlogged.discard(event["data"]["id"])
        finally:
            stream.close()
        first, last = min(ledger.events), max(ledger.events)
        missed = [i for i in log if first <= i <= last and i not in ledger.events]
        assert not missed, "a resumed stream skipped events %r" % missed[:10]
        changed = [i for i, kind in ledger.events.items() if log.get(i) != kind]
        assert not changed, "events seen live are gone or changed after a crash: %r" % changed[:10]

        conn = Connection(host, port)
        status, answer = conn.call("GET", "/api/tasks?status=done&limit=1000")
        for task in answer["tasks"]:
            _, events = conn.call("GET", "/api/tasks/%d/events" % task["id"])
            assert "callback_failed" not in [e["type"] for e in events["events"]]
        conn.close()
        assert relay.stop() == 0
    finally:
        receiver.close()


@pytest.mark.sqlite_only("SQLite's synchronous pragma")
@pytest.mark.parametrize("durability,synchronous", [("normal", 1), ("full", 2)])
def test_durability_sets_sqlite_synchronous(relay_factory, durability, synchronous):
    """DURABILITY=normal is synchronous=NORMAL in WAL mode (a commit survives
    a crash of the process); full is synchronous=FULL (an fsync per commit,
    so it also survives a power loss)."""
    relay = relay_factory(durability=durability)
    store = relay.relay.store
    with store.lock:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    assert relay.call("POST", "/api/agents", {"id": "a"}).status == 201


@pytest.mark.sqlite_only("SQLite's write-ahead log")
def test_the_write_ahead_log_is_checkpointed_off_the_request_path_and_stays_bounded(relay_factory, tmp_path):
    """Requests never run a checkpoint (wal_autocheckpoint=0, so no COMMIT
    pays for copying the log into the database); the checkpoint worker runs
    them on its own connection, so the -wal file is reused instead of growing
    with every message ever sent."""
    db_path = str(tmp_path / "wal.db")
    relay = relay_factory(db_path=db_path)
    with relay.relay.store.lock:
        assert relay.relay.store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    relay.register("a")
    conn = Connection(relay.host, relay.port)
    sizes = []
    try:
        for _round in range(8):
            for _ in range(300):
                assert conn.call("POST", "/api/messages", {"from": "a", "to": "a", "body": "x" * 2000})[0] == 201
            sizes.append(os.path.getsize(db_path + "-wal"))
            time.sleep(0.3)  # the checkpoint worker runs every 0.1 s
    finally:
        conn.close()
    # without checkpoints each round adds about 14 MB to the log (110 MB in all); with
    # them the file is reused at the latest once the log passes 4,000 frames (16 MB)
    assert max(sizes) < 40 * 1024 * 1024, "the log keeps growing: %r" % sizes


# ---------------------------------------------------------------------------
# 2. Claim and dedupe races
# ---------------------------------------------------------------------------


def race(clients, rounds, attempt):
    """Run `attempt(connection, client index, round)` in every client thread
    at once, round after round; returns results[round][client]."""
    barrier = threading.Barrier(len(clients))
    results = [[None] * len(clients) for _ in range(rounds)]
    errors = []

    def run(index):
        try:
            for number in range(rounds):
                barrier.wait(30)
                results[number][index] = attempt(clients[index], index, number)
        except Exception as error:  # noqa: BLE001 - reported by the test thread below
            errors.append(error)
            barrier.abort()
        finally:
            clients[index].close()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors[:3]
    return results


@pytest.mark.slow
def test_1000_claim_races_of_32_agents_each_have_exactly_one_winner(relay_factory):
    """CLAIM_RACES races, each for one claimable message (three in four) or
    one task (the rest), run by the same 32 agents at the same moment (a
    barrier per race): exactly one 200 per race, every other agent gets 409
    naming that winner, and the stored claim agrees."""
    relay = relay_factory()
    agents = ["racer-%02d" % i for i in range(32)]
    setup = Connection(relay.host, relay.port)
    for agent_id in agents + ["boss"]:
        assert setup.call("POST", "/api/agents", {"id": agent_id, "capabilities": ["work"]})[0] == 201
    prizes = []
    for n in range(CLAIM_RACES):
        if n % 4 == 3:
            _, answer = setup.call("POST", "/api/integrations/events", {"type": "job", "title": "job %d" % n,
                                                                        "target": "cap:work"})
            prizes.append(("tasks", answer["task"]["id"]))
        else:
            _, answer = setup.call("POST", "/api/messages", {"from": "boss", "to": "cap:work", "body": "job %d" % n,
                                                             "claimable": True})
            prizes.append(("messages", answer["id"]))

    def claim(conn, index, number):
        return conn.call("POST", "/api/%s/%d/claim" % prizes[number], {"agentId": agents[index]})
    results = race([Connection(relay.host, relay.port) for _ in agents], CLAIM_RACES, claim)

    setup.close()  # idle longer than REQUEST_TIMEOUT_MS: the relay has hung up on it
    stored_messages = all_messages(setup)
    _, answer = setup.call("GET", "/api/tasks?limit=1000")
    stored_tasks = {t["id"]: t for t in answer["tasks"]}
    assert len(stored_tasks) == CLAIM_RACES // 4
    double = []
    for (kind, prize_id), answers in zip(prizes, results):
        winners = [agents[i] for i, (status, _) in enumerate(answers) if status == 200]
        if len(winners) != 1:
            double.append((kind, prize_id, winners))
            continue
        for status, answer in answers:
            assert status == 200 or (status, answer["code"], answer["claimedBy"]) == (
                409, "already_claimed", winners[0]), answer
        stored = (stored_messages if kind == "messages" else stored_tasks)[prize_id]
        assert stored["claimedBy"] == winners[0]
    assert double == [], "%d of %d races had no or several winners: %r" % (len(double), CLAIM_RACES, double[:5])


@pytest.mark.slow
def test_concurrent_ingress_of_one_dedupe_key_makes_exactly_one_task(relay_factory):
    """50 rounds of 32 concurrent ingress requests carrying the same
    dedupeKey (a new key each round): one task and one message per round,
    one 201 `created` and 31 200 `deduped`, and the count says 32."""
    relay = relay_factory(integrations=integrations(), integration_rate_limit_per_minute=100000)
    rounds, senders = 50, 32

    def ingest(conn, index, number):
        return conn.call("POST", "/api/integrations/events", {
            "type": "alarm", "title": "disk full on db-%d" % number, "dedupeKey": "disk-full-%d" % number},
            token=OPS_TOKEN)
    results = race([Connection(relay.host, relay.port) for _ in range(senders)], rounds, ingest)

    conn = Connection(relay.host, relay.port)
    _, answer = conn.call("GET", "/api/tasks?limit=1000")
    tasks = {t["dedupeKey"]: t for t in answer["tasks"]}
    assert len(answer["tasks"]) == rounds, "a dedupeKey made more than one task"
    for number, answers in enumerate(results):
        actions = collections.Counter((status, body["action"]) for status, body in answers)
        assert actions == {(201, "created"): 1, (200, "deduped"): senders - 1}, (number, actions)
        task = tasks["disk-full-%d" % number]
        assert {body["task"]["id"] for _, body in answers} == {task["id"]}
        assert task["occurrenceCount"] == senders
    assert len(all_messages(conn)) == rounds


class GroupCommitProbe:
    """A Store on its own database, with every SQL statement it runs and every
    event it publishes recorded: group commit seen from SQLite's side."""

    def __init__(self, tmp_path):
        self.published = []
        self.store = agent_relay.Store(str(tmp_path / "group.db"), on_commit=self.published.extend)
        self.statements = []
        self.store.conn.set_trace_callback(self.statements.append)
        self.outcomes = {}

    def member(self, name, fail=False):
        """One request's transaction: an event, then success or an error."""
        try:
            with self.store.transaction():
                self.store.add_event("agent.status", {"id": name}, 1)
                if fail:
                    raise ValueError(name)
            self.outcomes[name] = "committed"
        except ValueError:
            self.outcomes[name] = "failed"
        except sqlite3.Error as error:
            self.outcomes[name] = "error: %s" % error

    def line_up(self, names, failing=()):
        """Start one member per name; they queue on the store lock held by the caller."""
        threads = [threading.Thread(target=self.member, args=(name, name in failing)) for name in names]
        for thread in threads:
            thread.start()
        wait_until(lambda: self.store._waiting == len(names))
        return threads

    def stored(self):
        with self.store.settled():
            return [json.loads(data)["id"] for (data,) in self.store.conn.execute(
                "SELECT data FROM events ORDER BY id")]

    def count(self, sql):
        return self.statements.count(sql)


def test_transactions_waiting_for_the_lock_share_one_commit_and_a_failing_one_undoes_only_itself(tmp_path):
    """Group commit: a transaction that ends while others wait for the lock
    leaves SQLite's transaction open for them; each joins inside a SAVEPOINT
    and the last one commits for all, so four requests cost one BEGIN and one
    COMMIT. One that fails rolls back to its savepoint: its write and its
    event are gone, the others' stay. Nobody returns before the COMMIT."""
    probe = GroupCommitProbe(tmp_path)
    try:
        with probe.store.transaction():  # holds the lock while three more line up behind it
            probe.store.add_event("agent.status", {"id": "first"}, 1)
            threads = probe.line_up(["a", "b", "c"], failing={"b"})
        assert [e.data["id"] for e in probe.published][:1] == ["first"], "the first answered before its COMMIT"
        for thread in threads:
            thread.join(5)
        assert probe.outcomes == {"a": "committed", "b": "failed", "c": "committed"}
        assert probe.count("BEGIN IMMEDIATE") == 1 and probe.count("COMMIT") == 1
        assert probe.count("SAVEPOINT member") == 3 and probe.count("ROLLBACK TO member") == 1
        published = [e.data["id"] for e in probe.published]
        assert published[0] == "first" and sorted(published[1:]) == ["a", "c"]
        assert probe.stored() == published
        assert [e.id for e in probe.published] == sorted(e.id for e in probe.published)
    finally:
        probe.store.close()


def test_a_transaction_alone_commits_at_once_and_one_whose_successor_never_comes_commits_itself(tmp_path):
    """With nobody waiting a transaction commits as it ends (a lone client pays
    no latency). A waiter that never takes the lock cannot strand a finished
    transaction: after GROUP_COMMIT_WAIT_S it commits its group itself."""
    probe = GroupCommitProbe(tmp_path)
    try:
        probe.member("alone")
        assert probe.count("COMMIT") == 1 and probe.stored() == ["alone"]
        probe.store._waiting += 1  # counted as waiting, never arrives
        began = time.monotonic()
        try:
            probe.member("stranded")
        finally:
            probe.store._waiting -= 1
        assert time.monotonic() - began >= agent_relay.GROUP_COMMIT_WAIT_S
        assert probe.outcomes["stranded"] == "committed" and probe.count("COMMIT") == 2
        assert probe.stored() == ["alone", "stranded"]
    finally:
        probe.store.close()


def test_when_sqlite_ends_the_shared_transaction_every_member_in_it_fails(tmp_path):
    """A full disk can make SQLite roll back the whole transaction by itself.
    The members already in it were not committed and must not answer success;
    the next transaction starts a new group and commits."""
    probe, threads = GroupCommitProbe(tmp_path), []
    try:
        with probe.store.transaction():
            probe.store.add_event("agent.status", {"id": "first"}, 1)
            threads = probe.line_up(["a"])
            probe.store.conn.execute("ROLLBACK")  # as SQLite does on SQLITE_FULL
        raise AssertionError("the first member answered although its write was rolled back")
    except sqlite3.OperationalError as error:
        assert "rolled back" in str(error)
    finally:
        for thread in threads:
            thread.join(5)
        stored = probe.stored()
        probe.store.close()
    assert probe.outcomes == {"a": "committed"} and stored == ["a"]
    assert [e.data["id"] for e in probe.published] == ["a"]


def test_a_member_whose_savepoint_cannot_be_released_fails_alone(tmp_path):
    """If SQLite refuses a member's RELEASE, that member must not answer
    success, and its writes must not ride along on the group's COMMIT: it
    rolls back to its savepoint and fails; the one before it still commits."""
    probe, threads, refused = GroupCommitProbe(tmp_path), [], []

    def refuse_the_first_release(action, operation, name, *_):
        if action == sqlite3.SQLITE_SAVEPOINT and operation == "RELEASE" and not refused:
            refused.append(name)
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    try:
        with probe.store.transaction():
            probe.store.add_event("agent.status", {"id": "first"}, 1)
            threads = probe.line_up(["a"])
            probe.store.conn.set_authorizer(refuse_the_first_release)
    finally:
        for thread in threads:
            thread.join(5)
        stored = probe.stored()
        probe.store.close()
    assert refused == ["member"] and probe.outcomes == {"a": "error: not authorized"}
    assert stored == ["first"] and [e.data["id"] for e in probe.published] == ["first"]
    assert probe.count("ROLLBACK TO member") == 1 and probe.count("COMMIT") == 1


def test_a_queue_unsubscribed_during_a_publish_still_gets_that_publish(tmp_path):
    """The SSE writer takes a stream over by unsubscribing the stream's own
    queue and draining it; events it took from its feed before the hand-over
    it sends to nobody, counting on that queue. So a publish already under way
    when the queue is unsubscribed (the publisher preempted between the
    writer's feed and this queue) must still reach it: without that a live
    stream silently skipped the event (seen once in the SIGKILL test above)."""
    in_put, resume = threading.Event(), threading.Event()

    class Preempted(agent_relay.Subscriber):  # the publisher loses the CPU inside this put
        def put(self, batch):
            in_put.set()
            resume.wait(5)
            super().put(batch)

    hub = agent_relay.EventHub()
    queue = hub.attach(Preempted(100))
    event = agent_relay.Event.make(7534, "agent.status", {"id": "a"}, 0, '{"id": "a"}')
    publisher = threading.Thread(target=hub.publish, args=([event],))
    publisher.start()
    assert in_put.wait(5)
    unsubscriber = threading.Thread(target=hub.unsubscribe, args=(queue,))
    unsubscriber.start()
    unsubscriber.join(0.2)  # it waits for the publish (or, before the fix, closed the queue at once)
    resume.set()
    publisher.join(5)
    unsubscriber.join(5)
    assert [e.id for e in queue.take(0)] == [7534] and hub.count() == 0


# ---------------------------------------------------------------------------
# 3. Storage faults
# ---------------------------------------------------------------------------


def stored_state(relay):
    """What a failed write must not have changed: every message, task and
    agent, and the event log (by id and type)."""
    conn = Connection(relay.host, relay.port)
    messages = all_messages(conn)
    _, tasks = conn.call("GET", "/api/tasks?limit=1000")
    _, agents = conn.call("GET", "/api/agents?limit=1000")
    with relay.relay.store.lock:
        events = relay.relay.store.conn.execute("SELECT id, type FROM events ORDER BY id").fetchall()
    return {"messages": messages, "tasks": tasks["tasks"],
            "agents": sorted(a["id"] for a in agents["agents"]), "events": events}


def seed_for_faults(relay):
    conn = Connection(relay.host, relay.port)
    assert conn.call("POST", "/api/agents", {"id": "writer", "capabilities": ["work"]})[0] == 201
    assert conn.call("POST", "/api/agents", {"id": "reader"})[0] == 201
    for n in range(5):
        assert conn.call("POST", "/api/messages", {"from": "writer", "to": "reader", "body": "before %d" % n})[0] == 201
    assert conn.call("POST", "/api/integrations/events", {"type": "job", "title": "before"}, token=OPS_TOKEN)[0] == 201
    return conn


WRITES_DURING_FAULT = (
    ("POST", "/api/messages", {"from": "writer", "to": "reader", "body": "x" * 3000}),
    ("POST", "/api/messages", {"from": "writer", "to": "cap:work", "body": "y" * 3000, "claimable": True}),
    ("POST", "/api/agents", {"id": "newcomer-during-fault", "tags": ["z" * 90] * 30}),
    ("POST", "/api/integrations/events", {"type": "job", "title": "during", "body": "z" * 3000}),
)


def check_degraded_but_serving(relay, conn, before):
    """During a storage fault: writes are 503 storage_unavailable, reads
    (including an agent reading its own inbox) still answer, and nothing
    of the refused writes is stored."""
    for method, path, body in WRITES_DURING_FAULT:
        token = OPS_TOKEN if "integrations" in path else None
        status, answer = conn.call(method, path, body, token=token)
        assert (status, answer["code"]) == (503, "storage_unavailable"), (path, status, answer)
    for path in ("/api/messages", "/api/agents", "/api/agents/writer", "/api/tasks", "/api/stats",
                 "/api/messages/1", "/api/messages/1/thread", "/api/messages/cursor"):
        status, answer = conn.call("GET", path)
        assert status == 200, (path, answer)
    status, answer = conn.call("GET", "/api/messages?for=reader")
    assert status == 200, ("an agent must still read its inbox while the disk is full or read-only", answer)
    assert [m["body"] for m in answer["messages"]] == ["before %d" % n for n in range(5)]
    stream = EventReader(stream_client(relay.host, relay.port), "/api/events?since=0&types=message.new")
    try:
        assert stream.status == 200
        assert len(stream.take(5)) == 5
    finally:
        stream.close()
    assert stored_state(relay) == before


def check_recovered(relay, conn):
    """Storage is back: writes work again without a restart, and the database is sound."""
    status, answer = conn.call("POST", "/api/messages", {"from": "writer", "to": "reader", "body": "after"})
    assert status == 201, answer
    status, answer = conn.call("GET", "/api/health")
    assert (status, answer["db"]) == (200, "ok")
    status, answer = conn.call("GET", "/api/messages?for=reader&limit=1000")
    assert [m["body"] for m in answer["messages"]] == ["before %d" % n for n in range(5)] + ["after"]
    with relay.relay.store.lock:
        assert relay.relay.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.sqlite_only("fills the SQLite file with max_page_count")
def test_a_full_disk_answers_503_keeps_reads_and_recovers_by_itself(relay_factory):
    """Disk full, simulated the way SQLite sees it: max_page_count pinned to
    the current size, so any write that needs a new page fails with
    SQLITE_FULL. Writes that still fit in free space may succeed (as on a
    real full disk); the test fills the file first."""
    relay = relay_factory(integrations=integrations())
    conn = seed_for_faults(relay)
    store = relay.relay.store
    with store.lock:
        store.conn.execute("PRAGMA max_page_count = 1")  # clamps to the current page count
    refused = 0
    for n in range(500):  # fill what free space is left in the last pages
        status, answer = conn.call("POST", "/api/messages", {"from": "writer", "to": "writer", "body": "%d" % n})
        refused = refused + 1 if status == 503 else 0
        if refused == 10:
            break
    assert refused == 10, "the database never filled up"
    before = stored_state(relay)
    try:
        check_degraded_but_serving(relay, conn, before)
    finally:
        with store.lock:
            store.conn.execute("PRAGMA max_page_count = 1073741823")
    check_recovered(relay, conn)


@pytest.mark.sqlite_only("an SQLite authorizer refuses the read")
def test_a_stream_whose_opening_transaction_fails_leaves_no_queue_behind(relay_factory):
    """GET /api/events subscribes its queue inside a transaction; when that
    transaction fails (here SQLite refuses to read the event head: a 500; a
    failed COMMIT of the group it joined would be a 503), no stream opens and
    its queue is gone from the hub, instead of filling with every later event
    for good."""
    relay = relay_factory()
    conn = Connection(relay.host, relay.port)
    assert conn.call("POST", "/api/agents", {"id": "reader"})[0] == 201
    hub, store = relay.relay.hub, relay.relay.store

    def refuse_the_event_head(action, table, *_):
        refused = action == sqlite3.SQLITE_READ and table == "sqlite_sequence"
        return sqlite3.SQLITE_DENY if refused else sqlite3.SQLITE_OK
    queues = hub.count()
    with store.lock:
        store.conn.set_authorizer(refuse_the_event_head)
    try:
        for path in ("/api/events", "/api/events?for=reader&since=0"):
            stream = EventReader(stream_client(relay.host, relay.port), path)
            try:
                assert stream.status == 500, path
            finally:
                stream.close()
    finally:
        with store.lock:
            store.conn.set_authorizer(None)
    assert hub.count() == queues


def chattr(flag, *paths):
    return subprocess.run(["chattr", flag] + list(paths), capture_output=True, text=True)


def test_a_read_only_database_answers_503_keeps_reads_and_recovers_by_itself(relay_factory):
    """The database and its WAL become read-only under the running relay.
    chmod does not stop root (these tests run as root in CI), so the test uses
    the immutable attribute (`chattr +i`), which refuses writes to open
    files for root too, the way an `errors=remount-ro` file system does.
    (A read-only bind mount over the folder does not reach the files the
    relay already has open.)"""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
    relay = relay_factory(integrations=integrations())
    conn = seed_for_faults(relay)
    db_path = relay.relay.settings.db_path
    files = [db_path, db_path + "-wal"]
    done = chattr("+i", *files)
    if done.returncode != 0:
        pytest.skip("this file system or user cannot set the immutable attribute: %s" % done.stderr.strip())
    try:
        before = stored_state(relay)
        status, answer = conn.call("GET", "/api/health")
        assert (status, answer["db"]) == (503, "unavailable")
        check_degraded_but_serving(relay, conn, before)
    finally:
        chattr("-i", *files)
    check_recovered(relay, conn)


# ---------------------------------------------------------------------------
# 4. Bad input at scale
# ---------------------------------------------------------------------------


def seed_fuzz_targets(relay):
    """Agents, messages, a claimable message, tasks and a pair, so that the
    fuzzers reach past `404 unknown_*` into the handlers."""
    conn = Connection(relay.host, relay.port)
    for n in range(4):
        conn.call("POST", "/api/agents", {"id": "agent-%d" % n, "capabilities": ["work"], "tags": ["t"],
                                          "label": "label-%d" % n})
    for n in range(10):
        conn.call("POST", "/api/messages", {"from": "agent-0", "to": "cap:work", "body": "m%d" % n,
                                            "claimable": n % 2 == 0})
    for n in range(3):
        conn.call("POST", "/api/integrations/events", {"type": "job", "title": "t%d" % n, "target": "cap:work"})
    _, pair = conn.call("POST", "/api/pairs", {"from": "agent-1", "to": "agent-2"})
    return {"agent": "agent-3", "message": 2, "task": 1, "pair": pair["id"]}


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_schema(relay_factory, tmp_path, monkeypatch):
    """Every operation in /api/openapi.json, with schema-valid and
    schema-breaking (negative) inputs, FUZZ_EXAMPLES each, plus one third
    aimed at existing ids: no 5xx, every answer fits its documented schema
    and is strict JSON. The event stream is opened and closed (its body never
    ends); backups are written inside the test's folder."""
    schemathesis = pytest.importorskip("schemathesis")
    hypothesis = pytest.importorskip("hypothesis")
    requests = pytest.importorskip("requests")
    from hypothesis import strategies
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    monkeypatch.chdir(tmp_path)
    relay = relay_factory(integrations=integrations())
    real = seed_fuzz_targets(relay)
    schema = schemathesis.openapi.from_url(relay.url + "/api/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every route but the document itself (schemathesis leaves out the operation it loaded the schema from).
    labels = {"%s %s" % (o.method.upper(), o.path) for o in operations}
    assert labels == {"%s %s" % (r[0], r[1].replace(":int", "")) for r in agent_relay.ROUTES} - {
        "GET /api/openapi.json"}
    failures, statuses = [], collections.Counter()
    backups = tmp_path / "backups"
    backups.mkdir()

    def strategy_for(operation):
        modes = [operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                 operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)]
        if "{id}" in operation.path:
            kind = operation.path.split("/")[2].rstrip("s")  # agents -> agent, pairs -> pair, ...
            modes.append(operation.as_strategy(path_parameters={"id": real[kind]}))
        return strategies.one_of(modes)

    def check(operation, case):
        if operation.path == "/api/system/backup" and isinstance(case.body, dict) and isinstance(
                case.body.get("name"), str):
            case.body["name"] = "backup-%d.db" % len(os.listdir(str(backups)))
        if operation.path == "/api/events":  # the body never ends: look at the head and hang up
            kwargs = dict(case.as_transport_kwargs(base_url=relay.url), stream=True, timeout=10)
            with requests.request(**kwargs) as response:
                status = response.status_code
                if status == 200:
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    return status
                raw = response.raw.read(65536)
            assert status < 500, raw
            strict_json(raw)
            return status
        response = case.call(base_url=relay.url, timeout=10)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        if not (operation.path == "/api/metrics" and response.status_code == 200):  # the Prometheus text format
            strict_json(response.content)
        return response.status_code

    def fuzz(operation):
        """A hypothesis test of one operation."""
        label = "%s %s" % (operation.method.upper(), operation.path)

        def run(case):
            try:
                statuses[(label, check(operation, case))] += 1
            except Exception as error:  # noqa: BLE001 - every failure is collected and shown together
                failures.append("%s: %s: %s" % (label, type(error).__name__, str(error)[:400]))
        return hypothesis.settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
            phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
        )(hypothesis.given(case=strategy_for(operation))(run))

    for operation in operations:
        fuzz(operation)()
    assert not failures, "\n".join(failures[:20])
    assert sum(n for (label, status), n in statuses.items() if 200 <= status < 300) > 100, statuses


def hostile_values():
    """JSON values that are well-formed text but that a relay must refuse
    with a 400 (or store faithfully): integers past SQLite's 64 bits,
    numbers past a double (Python reads 1e999 as infinity and would write
    back `Infinity`, which is not JSON), lone UTF-16 surrogates (no UTF-8
    form), NUL, deep nesting, and the wrong types."""
    return [
        ("huge_int", b"100000000000000000000000000000"), ("minus_huge_int", b"-100000000000000000000000000000"),
        ("int64_max_plus_1", b"9223372036854775808"), ("huge_int_in_list", b"[100000000000000000000000000000]"),
        ("float_overflow", b"1e999"), ("minus_float_overflow", b"-1e999"),
        ("float_overflow_in_object", b'{"n": 1e999}'), ("huge_exponent_in_object", b'{"n": 1e1000000}'),
        ("lone_surrogate", b'"\\ud800"'), ("surrogate_in_list", b'["\\udfff"]'),
        ("surrogate_in_object", b'{"k": "\\ud83d"}'), ("surrogate_key", b'{"\\ud800": 1}'),
        ("nul", b'"a\\u0000b"'), ("deep", b"[" * 50 + b"]" * 50), ("empty_string", b'""'), ("negative", b"-1"),
        ("zero", b"0"), ("float", b"1.5"), ("true", b"true"), ("null", b"null"), ("object", b"{}"),
        ("list", b"[]"), ("long_string", b'"' + b"w" * 70000 + b'"'),
    ]


def write_routes(real):
    """(method, path, a valid body) for every route that takes a body."""
    return [
        ("POST", "/api/agents", {"id": "fuzz-agent", "label": "l", "machine": "m", "project": "p", "provider": "x",
                                 "capabilities": ["c"], "tags": ["t"], "channels": [], "approval": "open",
                                 "status": "online", "meta": {}, "version": "1"}),
        ("PATCH", "/api/agents/agent-3", {"label": "l", "status": "busy", "tags": ["t"], "capabilities": ["work"],
                                          "channels": [], "approval": "guarded", "meta": {"k": 1}}),
        ("PATCH", "/api/agents/agent-3/label", {"label": "x"}),
        ("POST", "/api/agents/agent-3/heartbeat", {"status": "online"}),
        ("POST", "/api/messages", {"from": "agent-0", "to": "agent-1", "body": "b", "channel": "c", "subject": "s",
                                   "claimable": False, "replyTo": 1, "meta": {}, "ttlSeconds": 60, "ackBy": 60}),
        ("POST", "/api/messages/read", {"agentId": "agent-1", "ids": [1, 2]}),
        ("POST", "/api/messages/read", {"agentId": "agent-1", "upTo": 3}),
        ("PATCH", "/api/messages/1", {"agentId": "agent-1", "read": True}),
        ("POST", "/api/messages/%d/claim" % real["message"], {"agentId": "agent-1"}),
        ("POST", "/api/pairs", {"from": "agent-0", "to": "agent-3", "objective": "o"}),
        ("POST", "/api/pairs/%s/accept" % real["pair"], {"agentId": "agent-2"}),
        ("POST", "/api/pairs/%s/messages" % real["pair"], {"from": "agent-1", "body": "b", "meta": {}}),
        ("POST", "/api/pairs/%s/reject" % real["pair"], {"agentId": "agent-2", "reason": "r"}),
        ("POST", "/api/pairs/%s/hangup" % real["pair"], {"agentId": "agent-1", "reason": "r"}),
        ("POST", "/api/integrations/events", {"type": "t", "title": "x", "severity": "s", "dedupeKey": "k",
                                              "body": "b", "target": "cap:work", "channel": "c", "source": "s",
                                              "status": "open", "meta": {}}),
        ("POST", "/api/tasks/%d/claim" % real["task"], {"agentId": "agent-1", "leaseSeconds": 60}),
        ("PATCH", "/api/tasks/%d/status" % real["task"], {"agentId": "agent-1", "status": "in_progress",
                                                          "progress": {"p": 1}, "result": {"r": 1}, "note": "n"}),
        ("POST", "/api/system/backup", {"name": "backup.db"}),
    ]


def test_hostile_json_values_in_every_field_never_cause_a_5xx_or_a_non_json_answer(relay_factory, tmp_path,
                                                                                    monkeypatch):
    """Each field of each route's valid body, replaced in turn by each
    hostile value: the answer is never 5xx, is always strict JSON, and the
    stored data stays strict JSON too (GET /api/messages, /api/tasks,
    /api/agents afterwards). Backups land in tmp_path/backups."""
    monkeypatch.chdir(tmp_path)
    relay = relay_factory(integrations=integrations())
    real = seed_fuzz_targets(relay)
    conn = http.client.HTTPConnection(relay.host, relay.port, timeout=10)
    problems = []
    for method, path, body in write_routes(real):
        for field in body:
            for name, value in hostile_values():
                rest = json.dumps({k: v for k, v in body.items() if k != field})[1:-1]
                raw = b"{%s%s\"%s\": %s}" % (rest.encode(), b", " if rest else b"", field.encode(), value)
                conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                text = answer.read()
                if answer.will_close:
                    conn.close()
                try:
                    strict_json(text)
                    ok = answer.status < 500
                except ValueError:
                    ok = False
                if not ok:
                    problems.append("%s %s %s=%s -> %d %s" % (method, path, field, name, answer.status, text[:120]))
    for path in ("/api/messages?limit=1000", "/api/tasks?limit=1000", "/api/agents?limit=1000", "/api/pairs"):
        conn.request("GET", path)
        answer = conn.getresponse()
        text = answer.read()
        try:
            strict_json(text)
        except ValueError as error:
            problems.append("GET %s -> %d answers text that is not JSON (%s)" % (path, answer.status, error))
    conn.close()
    assert not problems, "%d problems:\n%s" % (len(problems), "\n".join(problems[:100]))


VALID_JSON = b'{"from":"fuzzer","to":"broadcast","body":"fuzz"}'


def post(body, *headers):
    lines = [b"POST /api/messages HTTP/1.1", b"Host: localhost"] + list(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(*headers):
    return post(b"", b"Content-Type: application/json", b"Transfer-Encoding: chunked", *headers)


# name -> the raw bytes a client sends, then whether it half-closes (a truncated upload)
MALFORMED = {
    "garbage_line": (b"GARBAGE\r\n\r\n", False),
    "method_only": (b"GET\r\n\r\n", False),
    "too_many_words": (b"GET / HTTP/1.1 extra\r\n\r\n", False),
    "unknown_version": (b"GET /api/agents HTTP/9.9\r\nHost: localhost\r\n\r\n", False),
    "http_0_9": (b"GET /api/agents\r\n\r\n", False),
    "unknown_method": (b"BREW /api/agents HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "lowercase_method": (b"get /api/agents HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "binary_line": (bytes(range(256)) * 4, False),
    "nul_in_path": (b"GET /api/\x00agents HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "very_long_line": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "bare_lf": (b"GET /api/agents HTTP/1.1\nHost: localhost\n\n", False),
    "absolute_form": (b"GET http://localhost/api/agents HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "asterisk_form": (b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "many_headers": (b"GET /api/agents HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
                     False),
    "huge_header": (b"GET /api/agents HTTP/1.1\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n", False),
    "huge_headers_total": (b"GET /api/agents HTTP/1.1\r\n" + b"X-A: " + b"v" * 60000 + b"\r\nX-B: " + b"v" * 60000
                           + b"\r\n\r\n", False),
    "header_without_colon": (b"GET /api/agents HTTP/1.1\r\nHost: localhost\r\nNoColonHere\r\n\r\n", False),
    "header_folding": (b"GET /api/agents HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n", False),
    "content_length_letters": (post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: abc"), False),
    "content_length_negative": (post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: -1"), False),
    "content_length_huge": (post(VALID_JSON, b"Content-Type: application/json",
                                 b"Content-Length: 99999999999999999999999"), False),
    "content_length_float": (post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: 4.5e1"), False),
    "content_length_empty": (post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: "), False),
    "truncated_body": (post(VALID_JSON[:10], b"Content-Type: application/json", b"Content-Length: 100"), True),
    "truncated_silent": (post(VALID_JSON[:10], b"Content-Type: application/json", b"Content-Length: 100"), False),
    "body_too_long": (post(VALID_JSON + b"GET / HTTP/1.1\r\n\r\n", b"Content-Type: application/json",
                           b"Content-Length: %d" % len(VALID_JSON)), False),
    "invalid_utf8_body": (post(b'{"from":"a\xff\xfe","to":"b","body":"c"}', b"Content-Type: application/json",
                               b"Content-Length: 33"), False),
    "overlong_utf8_body": (post(b'{"body":"\xc0\xaf"}', b"Content-Type: application/json",
                                b"Content-Length: 13"), False),
    "utf8_surrogate_bytes": (post(b'{"body":"\xed\xa0\x80"}', b"Content-Type: application/json",
                                  b"Content-Length: 14"), False),
    "invalid_utf8_path": (b"GET /api/agents/\xff\xfe HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "invalid_utf8_escaped_path": (b"GET /api/agents/%ff%fe HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "invalid_utf8_query": (b"GET /api/messages?for=%ff%fe&channel=\xff HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "invalid_utf8_header": (b"GET /api/agents HTTP/1.1\r\nHost: localhost\r\nX-A: \xff\xfe\r\n\r\n", False),
    "invalid_utf8_host": (b"GET /api/agents HTTP/1.1\r\nHost: local\xffhost\r\n\r\n", False),
    "invalid_utf8_last_event_id": (b"GET /api/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: \xff\r\n\r\n",
                                   False),
    "chunk_size_letters": (chunked() + b"zz\r\n" + VALID_JSON + b"\r\n0\r\n\r\n", False),
    "chunk_size_negative": (chunked() + b"-5\r\nabcde\r\n0\r\n\r\n", False),
    "chunk_size_huge": (chunked() + b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", False),
    "chunk_size_empty": (chunked() + b"\r\n\r\n", False),
    "chunk_short_then_close": (chunked() + b"100\r\nabc", True),
    "chunk_missing_crlf": (chunked() + b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"XX0\r\n\r\n", False),
    "chunk_no_last_chunk": (chunked() + b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n", True),
    "chunk_extension_flood": (chunked() + b"%x;" % len(VALID_JSON) + b"e" * 5000 + b"\r\n" + VALID_JSON
                              + b"\r\n0\r\n\r\n", False),
    "chunk_trailer_flood": (chunked() + b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n0\r\n"
                            + b"X-T: v\r\n" * 5000 + b"\r\n", False),
    "chunk_invalid_utf8": (chunked() + b"4\r\n\"\xff\xfe\"\r\n0\r\n\r\n", False),
    "deeply_nested_json": (post(b"[" * 100000 + b"]" * 100000, b"Content-Type: application/json",
                                b"Content-Length: 200000"), False),
    "form_encoded": (post(b"from=a&to=b&body=c", b"Content-Type: application/x-www-form-urlencoded",
                          b"Content-Length: 18"), False),
    "expect_continue": (post(VALID_JSON, b"Content-Type: application/json", b"Expect: 100-continue",
                             b"Content-Length: %d" % len(VALID_JSON)), False),
    "path_traversal": (b"GET /../../../etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "id_overflow": (b"GET /api/messages/999999999999999999 HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    # latin-1 superscript digits: str.isdigit() and the regex \d accept them, int() does not
    "unicode_digit_in_version": (b"GET /api/agents HTTP/\xb2.1\r\nHost: localhost\r\n\r\n", False),
    "unicode_digit_in_path": (b"GET /api/messages/\xb2 HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "unicode_digit_in_query": (b"GET /api/messages?since=\xb9&limit=%C2%B2 HTTP/1.1\r\nHost: localhost\r\n\r\n",
                               False),
    "unicode_digit_last_event_id": (b"GET /api/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: \xb3\r\n\r\n",
                                    False),
    "unicode_digit_chunk_size": (chunked() + b"\xb2\r\nab\r\n0\r\n\r\n", False),
    "query_overflow": (b"GET /api/messages?since=9" + b"9" * 5000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
    "last_event_id_overflow": (b"GET /api/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: 1" + b"0" * 30
                               + b"\r\n\r\n", False),
    "empty_request": (b"\r\n\r\n", False),
    "nothing_then_close": (b"", True),
}


def exchange(host, port, data, half_close=False, timeout=5.0, stop_after=None):
    """Send raw bytes and read until the relay closes, the timeout passes or
    `stop_after` bytes arrived; returns (bytes received, closed by relay)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    received = b""
    closed = False
    try:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the relay may refuse and close before reading it all
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (stop_after is None or len(received) < stop_after):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return received, closed


def answers_in(received, with_type=False):
    """The (status, body) (and Content-Type) of each HTTP answer in a byte stream."""
    found = []
    rest = received
    while rest.startswith(b"HTTP/1.1 "):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        status = int(head[9:12])
        length, content_type = 0, b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"content-type":
                content_type = value.strip()
        body, rest = rest[:length], rest[length:]
        found.append((status, body, content_type) if with_type else (status, body))
    return found


def mutations(seed, count):
    """Valid requests with random damage: bytes flipped, cut, repeated or
    inserted, in the request line, the headers or the body."""
    rng = random.Random(seed)
    valid = [post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: %d" % len(VALID_JSON)),
             b"GET /api/messages?for=canary&limit=5 HTTP/1.1\r\nHost: localhost\r\n\r\n",
             chunked() + b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n0\r\n\r\n",
             b"PATCH /api/agents/canary HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
             b"Content-Length: 17\r\n\r\n{\"status\":\"busy\"}"]
    found = []
    for _ in range(count):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.4:
                data[at] = rng.randrange(256)
            elif action < 0.6:
                del data[at:at + rng.randint(1, 8)]
            elif action < 0.8:
                data[at:at] = bytes(rng.choice(b"\r\n:; \x00\xff0123456789abcdef-") for _ in range(rng.randint(1, 6)))
            else:
                data[at:at] = data[at:at + rng.randint(1, 20)] * rng.randint(2, 50)
        found.append((bytes(data), rng.random() < 0.3))
    return found


class Canary(threading.Thread):
    """A well-behaved client that registers, sends and reads its inbox in a
    loop; every round must succeed within a second."""

    def __init__(self, host, port):
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.stopping = threading.Event()
        self.rounds = 0
        self.failures = []
        self.slowest = 0.0

    def run(self):
        conn = Connection(self.host, self.port, timeout=5)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                results = [conn.call("POST", "/api/agents", {"id": "canary"})[0],
                           conn.call("POST", "/api/messages", {"from": "canary", "to": "canary",
                                                               "body": "round %d" % self.rounds})[0],
                           conn.call("GET", "/api/messages?for=canary&limit=1&order=desc")[0]]
            except (OSError, http.client.HTTPException) as error:
                results = [repr(error)]
            took = time.monotonic() - started
            self.slowest = max(self.slowest, took)
            if results != [200 if self.rounds else 201, 201, 200] or took > 1.0:
                self.failures.append((self.rounds, results, round(took, 3)))
            self.rounds += 1
            self.stopping.wait(0.02)
        conn.close()

    def stop(self):
        self.stopping.set()
        self.join(10)


PROTOCOL_5XX = (501, 505)  # unknown method, unknown HTTP version: the stdlib's (correct) answers


@pytest.mark.slow
def test_raw_socket_fuzzer_gets_no_5xx_and_never_stops_other_clients(relay_factory):
    """Malformed request lines, oversized headers, bad Content-Length,
    truncated bodies, invalid UTF-8, bad chunked encoding and FUZZ_MUTATIONS
    randomly damaged requests, 16 connections at a time, while a canary
    client keeps registering, sending and reading: the canary never fails or
    waits a second, no answer is a 500 (or any 5xx but 501/505), every answer
    body is JSON, no connection outlives REQUEST_TIMEOUT_MS, and the relay's
    threads return to their baseline."""
    relay = relay_factory(request_timeout_ms=1000)
    baseline_threads = threading.active_count()
    canary = Canary(relay.host, relay.port)
    canary.start()
    wait_until(lambda: canary.rounds > 3)
    cases = list(MALFORMED.items()) + [("mutation-%d" % i, case)
                                       for i, case in enumerate(mutations(11, FUZZ_MUTATIONS))]
    problems = []

    def attempt(item):
        name, (data, half_close) = item
        started = time.monotonic()
        received, closed = exchange(relay.host, relay.port, data, half_close, timeout=4.0, stop_after=1 << 20)
        took = time.monotonic() - started
        if not closed and not received.startswith(b"HTTP/1.1 200 OK\r\nServer: AgentRelay/%s\r\nDate: "
                                                  % agent_relay.__version__.encode()):
            problems.append("%s: connection still open after %.1f s" % (name, took))
        if received.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in received[:400]:
            return  # an event stream (a mutated path may open one): it stays open, that is fine
        for status, body, content_type in answers_in(received, with_type=True):
            if status >= 500 and status not in PROTOCOL_5XX:
                problems.append("%s: %d %s" % (name, status, body[:200]))
            if content_type.startswith(b"application/json"):
                try:
                    strict_json(body)
                except ValueError:
                    problems.append("%s: %d with a body that is not JSON: %r" % (name, status, body[:200]))
            elif status not in (100, 204) and not (status == 200 and content_type.startswith(b"text/html")):
                problems.append("%s: %d %s answer: %r" % (name, status, content_type, body[:200]))
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(attempt, cases))
    finally:
        canary.stop()
    assert not problems, "\n".join(problems[:30])
    assert not canary.failures, canary.failures[:10]
    assert canary.rounds > 20
    wait_until(lambda: threading.active_count() <= baseline_threads, timeout=10)
    assert relay.call("GET", "/api/health").status == 200


AMBIGUOUS_FRAMING = {
    "two_different_content_lengths": post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: 5",
                                          b"Content-Length: %d" % len(VALID_JSON)),
    "content_length_with_plus": post(VALID_JSON, b"Content-Type: application/json",
                                     b"Content-Length: +%d" % len(VALID_JSON)),
    "content_length_with_underscore": post(VALID_JSON, b"Content-Type: application/json",
                                           b"Content-Length: 4_8"),
    # '\xb2' is latin-1 for a superscript two: str.isdigit() says yes, int() says no
    "content_length_superscript_digit": post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: \xb2"),
    "content_length_with_spaces_inside": post(VALID_JSON, b"Content-Type: application/json", b"Content-Length: 4 8"),
    "chunk_size_with_0x": chunked() + b"0x%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n0\r\n\r\n",
    "unknown_transfer_coding": post(VALID_JSON, b"Content-Type: application/json", b"Transfer-Encoding: gzip"),
    "chunked_not_last": post(VALID_JSON, b"Content-Type: application/json", b"Transfer-Encoding: chunked, gzip"),
    # RFC 9112 5.1 and 5.2: whitespace before the colon and obsolete line folding are refused
    "space_before_colon": post(VALID_JSON, b"Content-Type: application/json",
                               b"Content-Length : %d" % len(VALID_JSON)),
    "folded_content_length": post(VALID_JSON, b"Content-Type: application/json", b"Content-Length:",
                                  b" %d" % len(VALID_JSON)),
    "bare_cr_in_a_header_value": post(VALID_JSON, b"Content-Type: application/json",
                                      b"X-A: a\rContent-Length: %d" % len(VALID_JSON)),
    "nbsp_after_content_length": post(VALID_JSON, b"Content-Type: application/json",
                                      b"Content-Length: %d\xa0" % len(VALID_JSON)),
    "vertical_tab_before_chunked": post(b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n0\r\n\r\n",
                                        b"Content-Type: application/json", b"Transfer-Encoding: \x0bchunked"),
    "header_line_without_colon": post(VALID_JSON, b"Content-Type: application/json", b"Content-Length %d"
                                      % len(VALID_JSON)),
}
assert len(VALID_JSON) == 48  # content_length_with_underscore spells it 4_8


@pytest.mark.parametrize("name", sorted(AMBIGUOUS_FRAMING))
def test_ambiguous_message_framing_is_400_and_closes_the_connection(relay, name):
    """RFC 9112 6.1 and 6.3: a Content-Length that is not exactly digits (or
    two that disagree), a chunk size that is not hex digits, or a
    Transfer-Encoding whose last coding is not chunked cannot be framed
    reliably: 400 and close, never a guess. Guessing is how request
    smuggling starts (a proxy in front may frame the bytes differently)."""
    data = AMBIGUOUS_FRAMING[name] + b"GET /api/agents HTTP/1.1\r\nHost: localhost\r\n\r\n"
    received, closed = exchange(relay.host, relay.port, data, timeout=3.0)
    answers = answers_in(received)
    assert answers and answers[0][0] == 400, received[:300]
    assert len(answers) == 1 and closed, "the connection must close after a framing error: %r" % received[:600]
    assert relay.call("GET", "/api/messages").json["messages"] == []


@pytest.mark.parametrize("request_line", [b"GET /api/agents HTTP/\xb2.1", b"GET /api/agents HTTP/1",
                                          b"GET /api/agents HTTP/a.b", b"GET /api/agents HTTP/1.1.1",
                                          b"GET /api/agents FTP/1.1"])
def test_a_malformed_request_line_is_answered_400_not_dropped(relay, request_line):
    received, closed = exchange(relay.host, relay.port, request_line + b"\r\nHost: localhost\r\n\r\n", timeout=3.0)
    answers = answers_in(received)
    assert [status for status, _ in answers] == [400] and closed, received[:300]
    assert json.loads(answers[0][1])["code"] == "bad_request"


def test_transfer_encoding_with_content_length_is_answered_then_closed(relay):
    """RFC 9112 6.3: Transfer-Encoding wins over Content-Length, and the
    server must close the connection after answering."""
    data = post(b"%x\r\n" % len(VALID_JSON) + VALID_JSON + b"\r\n0\r\n\r\n", b"Content-Type: application/json",
                b"Content-Length: 4", b"Transfer-Encoding: chunked")
    relay.register("fuzzer")
    received, closed = exchange(relay.host, relay.port, data + b"GET /api/agents HTTP/1.1\r\nHost: localhost\r\n\r\n",
                                timeout=3.0)
    answers = answers_in(received)
    assert [status for status, _ in answers][:1] in ([201], [400]), received[:300]
    assert len(answers) == 1 and closed, "the connection must close: %r" % received[:600]


# ---------------------------------------------------------------------------
# 5. Resource exhaustion
# ---------------------------------------------------------------------------


def open_slowloris(host, port, count):
    """Connections that start a request and never finish it."""
    found = []
    for n in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"POST /api/agents HTTP/1.1\r\nHost: localhost\r\nX-Slow-%d: " % n)
        found.append(sock)
    return found


def open_idle_streams(host, port, count):
    """Event streams whose answer head arrived, then nothing is read."""
    found = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the relay closed an event stream at once"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        found.append(sock)
    return found


class Trickle(threading.Thread):
    """Sends one more header byte on every slowloris connection every 0.2 s
    and notes when the relay closes each one."""

    def __init__(self, socks):
        super().__init__(daemon=True)
        self.socks = socks
        self.closed_at = {}
        self.stopping = threading.Event()
        self.started = time.monotonic()

    def run(self):
        while not self.stopping.wait(0.2) and len(self.closed_at) < len(self.socks):
            for index, sock in enumerate(self.socks):
                if index in self.closed_at:
                    continue
                try:
                    sock.sendall(b"x")
                    sock.setblocking(False)
                    try:
                        if sock.recv(4096) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        pass
                    finally:
                        sock.setblocking(True)
                except OSError:
                    self.closed_at[index] = time.monotonic() - self.started

    def stop(self):
        self.stopping.set()
        self.join(10)


@pytest.mark.slow
def test_slowloris_and_idle_streams_neither_starve_clients_nor_leak(spawn_relay):
    """500 connections trickling their headers and 500 idle event streams at
    once: a normal client still registers and sends within 1 s; the relay
    cuts every trickling connection at REQUEST_TIMEOUT_MS; once the streams
    close, the relay's threads and file descriptors return exactly to their
    baseline, cycle after cycle. Memory: the first two cycles warm up the
    allocator (a thousand threads leave glibc's arenas and Python's free
    lists larger, by a step that shrinks each cycle: 56, 58, 59, 59.7, 60.2
    MiB ...); the two cycles after them must stay within 10% of that."""
    relay = spawn_relay(env={"REQUEST_TIMEOUT_MS": "3000", "SSE_KEEPALIVE_MS": "500"})
    assert relay.url, relay.first_line
    host, port = endpoint(relay.url)
    pid = relay.proc.pid
    conn = Connection(host, port)
    assert conn.call("POST", "/api/agents", {"id": "target"})[0] == 201
    conn.close()

    def settled():
        usage = process_usage(pid)
        # main, http, reaper, deadlines, housekeeping, checkpoints, callbacks (and PostgreSQL's listener)
        return usage if usage[1] <= 7 + bool(TEST_DB_URL) else None
    usage_after = []
    for cycle in range(4):
        baseline = wait_until(settled, timeout=15)
        streams = open_idle_streams(host, port, 500)  # first: streams have no deadline, slowloris ones do
        slow = open_slowloris(host, port, 500)
        trickle = Trickle(slow)
        trickle.start()
        try:
            wait_until(lambda base=baseline[1]: process_usage(pid)[1] >= base + 1000, timeout=5)  # a thread each
            client = Connection(host, port, timeout=5)
            started = time.monotonic()
            registered = client.call("POST", "/api/agents", {"id": "normal-%d" % cycle})
            sent = client.call("POST", "/api/messages", {"from": "normal-%d" % cycle, "to": "target", "body": "hi"})
            took = time.monotonic() - started
            client.close()
            assert (registered[0], sent[0]) == (201, 201), (registered, sent)
            assert took < 1.0, "a normal client waited %.2f s" % took
            wait_until(lambda trickle=trickle, slow=slow: len(trickle.closed_at) == len(slow), timeout=10)
            assert max(trickle.closed_at.values()) < 3.0 + 3.0, "slowloris connections were not cut in time"
        finally:
            trickle.stop()
            for sock in slow + streams:
                sock.close()
        usage_after.append(wait_until(settled, timeout=15))
        assert usage_after[-1][1:] == baseline[1:], "threads or file descriptors leaked: %r -> %r" % (
            baseline, usage_after[-1])
    warm_rss = usage_after[1][0]
    assert usage_after[-1][0] <= warm_rss * 1.10, "memory grew from %d KiB to %d KiB" % (
        warm_rss, usage_after[-1][0])
    assert relay.stop() == 0


# ---------------------------------------------------------------------------
# 6. Browser attacks on an unauthenticated localhost relay
# ---------------------------------------------------------------------------


def raw_call(relay, method, path, body=b"", headers=()):
    """One request with exactly these headers (no helpful defaults)."""
    conn = http.client.HTTPConnection(relay.host, relay.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        names = [name.lower() for name, _ in headers]
        if "host" not in names:
            conn.putheader("Host", "127.0.0.1:%d" % relay.port)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method in ("POST", "PATCH", "PUT"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        answer = conn.getresponse()
        raw = answer.read()
        return answer.status, strict_json(raw) if raw else None
    finally:
        conn.close()


EVIL = "http://evil.example"
MESSAGE = json.dumps({"from": "attacker", "to": "broadcast", "body": "run rm -rf ~"}).encode()
FORM_TEXT = b'{"from":"attacker","to":"broadcast","body":"run rm -rf ~","x":"="}'


def nothing_written(relay):
    assert relay.call("GET", "/api/messages").json["messages"] == []
    assert relay.call("GET", "/api/agents").json["agents"] == []


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8"])
def test_a_cross_site_text_plain_fetch_is_refused(relay, content_type):
    """fetch(relay, {method: "POST", body, headers: {"Content-Type": "text/plain"}})
    from another site is a 'simple' request: the browser sends it without a
    preflight, with the page's Origin. The relay refuses it on the Origin,
    and on the content type even when a privacy setting strips the Origin."""
    status, answer = raw_call(relay, "POST", "/api/messages", MESSAGE,
                              [("Origin", EVIL), ("Content-Type", content_type)])
    assert (status, answer["code"]) == (403, "origin_not_allowed")
    status, answer = raw_call(relay, "POST", "/api/messages", MESSAGE, [("Content-Type", content_type)])
    assert (status, answer["code"]) == (415, "unsupported_media_type")
    status, answer = raw_call(relay, "POST", "/api/agents", b'{"id": "planted"}', [("Content-Type", content_type)])
    assert status == 415
    nothing_written(relay)


FORM_POSTS = {
    "urlencoded": ("application/x-www-form-urlencoded", b"from=attacker&to=broadcast&body=run+rm+-rf"),
    "multipart": ("multipart/form-data; boundary=xyz",
                  b"--xyz\r\nContent-Disposition: form-data; name=\"body\"\r\n\r\nrm\r\n--xyz--"),
    "text_plain": ("text/plain", FORM_TEXT),
}


@pytest.mark.parametrize("encoding", sorted(FORM_POSTS))
@pytest.mark.parametrize("origin", [EVIL, "null", None], ids=["foreign_origin", "null_origin", "no_origin"])
def test_a_cross_origin_form_post_is_refused(relay, encoding, origin):
    """An HTML form on another site (or in a sandboxed frame, Origin: null)
    can POST any of the three form encodings, text/plain included (the
    classic trick that makes the body look like JSON). None gets through."""
    content_type, body = FORM_POSTS[encoding]
    headers = [("Content-Type", content_type)] + ([("Origin", origin)] if origin else [])
    for path in ("/api/messages", "/api/agents", "/api/integrations/events", "/api/system/backup"):
        status, answer = raw_call(relay, "POST", path, body, headers)
        assert status == (403 if origin else 415), (path, status, answer)
    nothing_written(relay)


def test_a_dns_rebinding_host_is_refused_for_reads_and_writes(relay):
    """After DNS rebinding, a page from attacker.example talks to the relay as
    its own origin: same-origin, so the browser sends its Origin only on
    writes and it matches the Host. Only the Host gives it away."""
    relay.register("victim")
    relay.send("victim", "victim", "a secret in the inbox")
    host = "rebind.example:%d" % relay.port
    for method, path, body, headers in [
            ("GET", "/api/messages", b"", []),
            ("GET", "/api/agents", b"", []),
            ("GET", "/api/events", b"", []),
            ("GET", "/", b"", []),
            ("POST", "/api/messages", MESSAGE, [("Content-Type", "application/json"), ("Origin", "http://" + host)]),
            ("POST", "/api/agents", b'{"id": "planted"}', [("Content-Type", "application/json")])]:
        status, answer = raw_call(relay, method, path, body, [("Host", host)] + headers)
        assert (status, answer["code"]) == (403, "host_not_allowed"), (method, path, status, answer)
    assert [a["id"] for a in relay.call("GET", "/api/agents").json["agents"]] == ["victim"]
    assert len(relay.call("GET", "/api/messages").json["messages"]) == 1
    # A page from the relay's own origin still works.
    status, _ = raw_call(relay, "POST", "/api/agents", b'{"id": "legit"}', [
        ("Content-Type", "application/json"), ("Origin", "http://127.0.0.1:%d" % relay.port)])
    assert status == 201


ATTACK_PAGE = """<!doctype html><meta charset="utf-8"><title>cute cats</title>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe><iframe name="sink3"></iframe>
<form id="text" method="POST" action="%(relay)s/api/messages" enctype="text/plain" target="sink1">
<input name='{"from":"attacker","to":"broadcast","body":"form text/plain","x":"' value='"}'></form>
<form id="urlencoded" method="POST" action="%(relay)s/api/agents" target="sink2">
<input name="id" value="planted-by-form"></form>
<form id="multipart" method="POST" action="%(relay)s/api/messages" enctype="multipart/form-data" target="sink3">
<input name="body" value="multipart"></form>
<script>
async function attack() {
  const found = {};
  const message = JSON.stringify({from: "attacker", to: "broadcast", body: "fetch text/plain"});
  try {
    const r = await fetch("%(relay)s/api/messages", {method: "POST", body: message,
                                                     headers: {"Content-Type": "text/plain"}});
    found.cors = r.status;
  } catch (e) { found.cors = String(e); }
  try {
    const r = await fetch("%(relay)s/api/agents", {method: "POST", mode: "no-cors",
                                                   body: JSON.stringify({id: "planted-by-fetch"}),
                                                   headers: {"Content-Type": "text/plain"}});
    found.noCors = r.type;
  } catch (e) { found.noCors = String(e); }
  try {
    const r = await fetch("%(relay)s/api/messages");
    found.read = r.status;
  } catch (e) { found.read = String(e); }
  for (const id of ["text", "urlencoded", "multipart"]) document.getElementById(id).submit();
  return found;
}
</script>"""


class AttackSite:
    """A web page on another local port that attacks the relay."""

    def __init__(self, relay_origin, page=None):
        page = (page or ATTACK_PAGE % {"relay": relay_origin}).encode()

        self.http = StubServer(lambda handler, body: (200, [("Content-Type", "text/html; charset=utf-8")], page))
        self.port = self.http.port

    def close(self):
        self.http.close()


def chromium_browser(profile):
    """Chromium as in test_dashboard, but resolving attacker.test and
    rebind.test to 127.0.0.1 (and nothing else but loopback)."""
    import test_dashboard as dashboard  # the DevTools driver; imported here so its skip marks stay its own

    flags = [f for f in dashboard.CHROMIUM_FLAGS if not f.startswith("--host-resolver-rules=")]
    flags.append("--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP rebind.test 127.0.0.1, "
                 "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    log = open(os.path.join(profile, "chromium.log"), "wb")
    proc = subprocess.Popen([dashboard.CHROMIUM] + flags + ["--user-data-dir=" + os.path.join(profile, "data"),
                                                            "about:blank"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    port_file = Path(profile) / "data" / "DevToolsActivePort"
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            dashboard._stop_group(proc)
            log.close()
            raise RuntimeError("chromium did not start:\n" + Path(profile, "chromium.log").read_text()[-3000:])
        time.sleep(0.05)

    def stop():
        dashboard._stop_group(proc)
        log.close()
    return dashboard.Browser(proc, int(port_file.read_text().split()[0])), stop


def network_log(page, url_part):
    """(url, status or error) of every request the page made to `url_part`."""
    page.js("0")  # collect the events that arrived meanwhile
    urls, found = {}, {}
    for event in page.events:
        params = event.get("params", {})
        request_id = params.get("requestId")
        if event["method"] == "Network.requestWillBeSent" and url_part in params["request"]["url"]:
            urls[request_id] = params["request"]["url"]
        elif event["method"] == "Network.responseReceived" and request_id in urls:
            found[request_id] = (urls[request_id], params["response"]["status"])
        elif event["method"] == "Network.loadingFailed" and request_id in urls and request_id not in found:
            # (a frame that got an answer may still report its load as aborted: the answer counts)
            cors = (params.get("corsErrorStatus") or {}).get("corsError")
            found[request_id] = (urls[request_id], cors or params.get("errorText"))
    return list(found.values())


@pytest.mark.slow
def test_browser_attacks_from_another_local_port_are_refused_in_chromium(relay_factory, tmp_path):
    """A real headless Chromium opens a page on attacker.test (another local
    port) that fires a text/plain fetch, a no-cors fetch, a cross-origin read
    and three form posts at the unauthenticated relay; then a page on
    rebind.test:<relay port> (what DNS rebinding gives an attacker) tries to
    read and write the API as its own origin. The browser sends every
    request (DevTools shows the relay's answers) and the relay refuses each:
    nothing is written, nothing is read. A page from the relay's own origin
    can still write, so the refusals are not the browser's doing."""
    test_dashboard = pytest.importorskip("test_dashboard")
    if not test_dashboard.CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    relay = relay_factory()
    relay_origin = "http://127.0.0.1:%d" % relay.port
    site = AttackSite(relay_origin)
    browser, stop_browser = chromium_browser(str(tmp_path))
    try:
        with browser.page() as page:
            page.call("Network.enable")
            page.goto("http://attacker.test:%d/cats.html" % site.port)
            found = page.js("attack()")
            assert found["noCors"] == "opaque" and "Failed to fetch" in found["cors"] + found["read"], found
            refused = wait_until(lambda: [r for r in network_log(page, relay_origin) if r[1] != 200]
                                 if len(network_log(page, relay_origin)) >= 6 else None, timeout=10)
            # The no-cors fetch and the three form posts show the relay's 403; the two
            # CORS requests fail for want of Access-Control-Allow-Origin (the 403 carries none).
            assert collections.Counter(r for _, r in refused) == {403: 4, "MissingAllowOriginHeader": 2}, refused
            nothing_written(relay)

            page.events.clear()
            page.goto("http://rebind.test:%d/" % relay.port)
            assert "host_not_allowed" in page.js("document.body.innerText")
            read = page.js("fetch('/api/messages').then(async r => [r.status, await r.text()])")
            write = page.js("fetch('/api/messages', {method: 'POST', headers: {'Content-Type': 'application/json'},"
                            " body: JSON.stringify({from: 'attacker', to: 'broadcast', body: 'rebound'})})"
                            ".then(async r => [r.status, await r.text()])")
            for status, text in (read, write):
                assert (status, json.loads(text)["code"]) == (403, "host_not_allowed")
            nothing_written(relay)

            page.goto(relay_origin + "/")
            status = page.js("fetch('/api/agents', {method: 'POST', headers: {'Content-Type': 'application/json'},"
                             " body: JSON.stringify({id: 'dashboard-user'})}).then(r => r.status)")
            assert status == 201
        assert [a["id"] for a in relay.call("GET", "/api/agents").json["agents"]] == ["dashboard-user"]
        assert relay.call("GET", "/api/messages").json["messages"] == []
    finally:
        stop_browser()
        site.close()



# ---------------------------------------------------------------------------
# 7. The soak's verdict (bench/soak.py runs for minutes; its judge is checked here)
# ---------------------------------------------------------------------------


def load_soak():
    import importlib.util
    spec = importlib.util.spec_from_file_location("soak", str(Path(__file__).parent.parent / "bench" / "soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("p99s,flat", [
    # a route that grew slower with history (/api/stats scanning every message, found by a soak)
    ([5.38, 3.60, 3.41, 3.94, 5.56, 4.43, 4.90, 5.77, 5.80, 6.34], False),
    # steady, with two one-minute spikes from a neighbour on the shared machine
    ([4.07, 10.40, 3.99, 3.77, 3.75, 3.81, 8.72, 3.50, 4.06, 4.15], True),
    ([4.0, 4.1, 3.9, 4.2, 4.0, 4.1, 4.3, 4.0, 4.2, 4.1], True),
    # a spike in the middle is not a drift; a drift behind a spike in the first window is one
    ([4.0, 4.0, 4.1, 9.0, 4.0, 4.1, 4.0, 4.2, 4.0, 4.1], True),
    ([4.0, 12.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], False),
])
def test_the_soak_judges_p99_drift_by_thirds_so_a_spike_neither_hides_nor_fakes_one(p99s, flat):
    soak = load_soak()
    rows = [{"window": i, "rss": 50.0, "threads": 28, "fds": 34, "p99": p99} for i, p99 in enumerate(p99s)]
    assert soak.flatness(rows, warmup_windows=1)[0] is flat


def test_the_soak_flags_a_leak_in_any_window():
    soak = load_soak()
    rows = [{"window": i, "rss": 50.0 + (8 if i == 5 else 0), "threads": 28, "fds": 34 + (i > 7) * 5, "p99": 4.0}
            for i in range(10)]
    flat, lines = soak.flatness(rows, warmup_windows=1)
    assert not flat
    assert [line.split()[:2] for line in lines[:3]] == [["rss", "HIGH"], ["threads", "ok"], ["fds", "HIGH"]]


def test_every_retry_waits_twice_as_long_up_to_a_cap_with_optional_jitter():
    waits = [agent_relay.backoff_delay(failures, 0.5, 30.0) for failures in range(9)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert agent_relay.backoff_delay(10 ** 6, 1000, 600000) == 600000  # no overflow after a long outage
    jittered = {agent_relay.backoff_delay(3, 1000, 3600000, jitter=True) for _ in range(50)}
    assert all(4000 <= wait <= 8000 for wait in jittered) and len(jittered) > 1
