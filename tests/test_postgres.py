"""Issue 21: many relays on one PostgreSQL (SPEC 13).

The cross-process tests run three real `agent_relay.py` processes on one
database and need a PostgreSQL server: AGENT_RELAY_TEST_DB_URL (as `.ci/run`
sets it; each test gets a fresh schema). Without it they skip; the rest of the
suite then runs on SQLite as usual.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

import agent_relay
from conftest import ROOT, SCRIPT, TEST_DB_URL, EventReader, Response, StubServer, free_port, wait_until

needs_postgres = pytest.mark.skipif(not TEST_DB_URL, reason="needs AGENT_RELAY_TEST_DB_URL (a PostgreSQL server)")
OPS_TOKEN = "ops-token-0123456789"


def call(url, method, path, body=None, headers=None, timeout=30):
    host, port = url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def stream(url, path):
    host, port = url.split("//")[1].rsplit(":", 1)
    return EventReader(types.SimpleNamespace(host=host, port=int(port), token=None), path)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


@pytest.fixture
def cluster(spawn_relay, postgres_schemas, tmp_path):
    """start(n, **env) -> n relay processes on one fresh PostgreSQL schema."""
    def start(count=3, **env):
        url = postgres_schemas.url_for(str(tmp_path / "shared.db"))
        env = dict({"DB_URL": url}, **env)
        relays = [spawn_relay(env=env, db_path=str(tmp_path / ("unused%d.db" % n))) for n in range(count)]
        for relay in relays:
            assert relay.url, relay.first_line + (relay.proc.stderr.read() if relay.proc.poll() is not None else "")
        return relays
    return start


# ---------------------------------------------------------------------------
# Without PostgreSQL


def test_without_the_driver_db_url_exits_2_naming_the_pip_command(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "psycopg.py").write_text("raise ImportError('no psycopg here')\n")
    env = dict(os.environ, PYTHONPATH=str(hide))
    done = subprocess.run([sys.executable, SCRIPT, "--port", "0", "--db-url", "postgresql://nobody@127.0.0.1:1/x"],
                          env=env, capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "agent-relay: DB_URL needs the PostgreSQL driver: pip install 'agent-relay[postgres]'"]


def test_a_db_url_that_is_not_postgresql_exits_2(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--port", "0", "--db-url", "mysql://x/y"],
                          capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert (done.returncode, done.stderr.strip()) == (2, "agent-relay: DB_URL must be a postgresql:// URL")


def test_an_unreachable_postgresql_exits_2_with_one_line_without_the_password(tmp_path):
    pytest.importorskip("psycopg")
    done = subprocess.run([sys.executable, SCRIPT, "--port", "0", "--db-url",
                           "postgresql://relay:s3cret-pw@127.0.0.1:%d/relay" % free_port()],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent-relay: cannot open database postgresql://127.0.0.1:"), lines
    assert "s3cret-pw" not in done.stderr


def test_every_migration_has_its_postgresql_form():
    """A new SQLite migration needs its PostgreSQL twin in POSTGRES_MIGRATIONS, same number."""
    assert len(agent_relay.POSTGRES_MIGRATIONS) == len(agent_relay.MIGRATIONS)


def test_sqlite_statements_translate_to_postgresql():
    translate = agent_relay.postgres_statement
    assert translate("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)") == (
        "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        False)
    assert translate("INSERT OR IGNORE INTO receipts (message_id, agent_id) VALUES (?, ?)")[0].endswith(
        "ON CONFLICT DO NOTHING")
    assert translate("INSERT INTO tasks (source, title) VALUES (?, ?)") == (
        "INSERT INTO tasks (source, title) VALUES (%s, %s) RETURNING id", True)
    assert translate("INSERT INTO events (type, data, created_at) VALUES (?, ?, ?)") == (
        "WITH n AS (UPDATE event_ids SET last = last + 1 RETURNING last) INSERT INTO events (id, type, data, "
        "created_at) SELECT n.last, %s, %s, %s FROM n RETURNING id", True)
    assert translate("SELECT x FROM pairs WHERE 1 AND status = ? AND body LIKE '5%'")[0] == (
        "SELECT x FROM pairs WHERE TRUE AND status = %s AND body LIKE '5%%'")


# ---------------------------------------------------------------------------
# Three processes, one database


@needs_postgres
def test_processes_starting_together_migrate_once(spawn_relay, postgres_schemas, tmp_path):
    url = postgres_schemas.url_for(str(tmp_path / "together.db"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "DB_"))}
    env["DB_URL"] = url
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--port", "0"], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        lines = [p.stdout.readline() for p in procs]
        assert all(" listening on " in line for line in lines), [(p.poll(), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
            p.stdout.close()
            p.stderr.close()
    import psycopg
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (len(agent_relay.POSTGRES_MIGRATIONS),)]


@needs_postgres
def test_a_message_reaches_streams_and_long_polls_on_other_processes_within_100_ms(cluster):
    a, b, c = cluster(3)
    for agent in ("sender", "reader"):
        assert call(a.url, "POST", "/api/agents", {"id": agent}).status == 201
    on_b = stream(b.url, "/api/events?for=reader&types=message.new")
    on_c = stream(c.url, "/api/events?for=reader&types=message.new")
    stream_delays, poll_delays = [], []
    try:
        for n in range(60):
            r = call(a.url, "POST", "/api/messages", {"from": "sender", "to": "reader", "body": str(n)})
            acked = time.monotonic()
            assert r.status == 201, r
            for reader in (on_b, on_c):
                assert reader.next_event(5)["data"]["body"] == str(n)
                stream_delays.append(time.monotonic() - acked)
        cursor = call(c.url, "GET", "/api/messages/cursor").json["cursor"]
        for n in range(30):
            answers = []
            path = "/api/messages?for=reader&wait=10&since=%d" % cursor

            def poll_c(answers=answers, path=path):
                answers.append((call(c.url, "GET", path), time.monotonic()))
            poll = threading.Thread(target=poll_c)
            poll.start()
            wait_until(lambda: b"\nagent_relay_long_poll_waiters 1\n" in call(c.url, "GET", "/api/metrics").raw)
            message = call(a.url, "POST", "/api/messages", {"from": "sender", "to": "reader", "body": "p%d" % n})
            acked = time.monotonic()
            poll.join(10)
            answer, answered = answers[0]
            assert [m["body"] for m in answer.json["messages"]] == ["p%d" % n]
            poll_delays.append(answered - acked)
            cursor = message.json["id"]
    finally:
        on_b.close()
        on_c.close()
    assert percentile(stream_delays, 0.99) < 0.1, sorted(stream_delays)[-5:]
    assert percentile(poll_delays, 0.99) < 0.1, sorted(poll_delays)[-5:]
    metrics = call(b.url, "GET", "/api/metrics").raw.decode()
    assert "agent_relay_notification_lag_seconds_count 0\n" not in metrics


@needs_postgres
def test_500_concurrent_sends_over_three_processes_resume_on_another_without_gap_or_duplicate(cluster):
    relays = cluster(3)
    urls = [r.url for r in relays]
    for agent in ("s0", "s1", "s2", "reader"):
        assert call(urls[0], "POST", "/api/agents", {"id": agent}).status == 201
    first = stream(urls[0], "/api/events?types=message.new")
    try:
        def send(n):
            r = call(urls[n % 3], "POST", "/api/messages", {"from": "s%d" % (n % 3), "to": "reader", "body": str(n)})
            assert r.status == 201, r
            return r.json["id"]
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            sent = list(pool.map(send, range(500)))
        seen = first.take(250, timeout=30)
    finally:
        first.close()
    on_other = stream(urls[2], "/api/events?types=message.new&since=%d" % seen[-1]["id"])
    try:
        seen += on_other.take(250, timeout=30)
    finally:
        on_other.close()
    event_ids = [e["id"] for e in seen]
    assert event_ids == sorted(set(event_ids)), "event ids must only increase, without duplicates"
    assert sorted(e["data"]["id"] for e in seen) == sorted(sent)


@needs_postgres
def test_claims_idempotency_and_pairs_hold_across_processes(cluster):
    relays = cluster(3)
    urls = [r.url for r in relays]
    for n in range(6):
        assert call(urls[0], "POST", "/api/agents", {"id": "w%d" % n, "capabilities": ["work"]}).status == 201
    assert call(urls[0], "POST", "/api/agents", {"id": "boss"}).status == 201
    ids = [call(urls[0], "POST", "/api/messages", {"from": "boss", "to": "cap:work", "body": "job %d" % n,
                                                   "claimable": True}).json["id"] for n in range(15)]
    attempts = [(m, w) for m in ids for w in range(6)]

    def claim(attempt):
        m, w = attempt
        return m, call(urls[w % 3], "POST", "/api/messages/%d/claim" % m, {"agentId": "w%d" % w}).status
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        results = list(pool.map(claim, attempts))
    for m in ids:
        statuses = sorted(s for i, s in results if i == m)
        assert statuses == [200] + [409] * 5, (m, statuses)

    def same_key(n):
        return call(urls[n % 3], "POST", "/api/messages", {"from": "boss", "to": "w0", "body": "once"},
                    headers={"Idempotency-Key": "k-1"})
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(same_key, range(9)))
    assert {a.status for a in answers} == {201}
    assert len({a.json["id"] for a in answers}) == 1
    bodies = [m["body"] for m in call(urls[1], "GET", "/api/messages?for=w0&limit=1000").json["messages"]]
    assert bodies.count("once") == 1

    def invite(n):
        return call(urls[n % 3], "POST", "/api/pairs", {"from": "w1", "to": "w%d" % (2 + n % 4)}).status
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(invite, range(8)))
    assert statuses.count(201) == 1 and set(statuses) == {201, 409}, statuses


@needs_postgres
def test_task_claims_are_fenced_across_processes(cluster):
    relays = cluster(3)
    urls = [r.url for r in relays]
    for n in range(6):
        assert call(urls[0], "POST", "/api/agents", {"id": "w%d" % n}).status == 201
    task = call(urls[0], "POST", "/api/integrations/events", {"type": "job", "title": "one"}).json["task"]

    def claim(n):
        return n, call(urls[n % 3], "POST", "/api/tasks/%d/claim" % task["id"], {"agentId": "w%d" % n})
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(claim, range(6)))
    winners = [(n, r) for n, r in results if r.status == 200]
    assert len(winners) == 1 and all(r.status == 409 for n, r in results if r.status != 200), results
    n, won = winners[0]
    path = "/api/tasks/%d/status" % task["id"]
    for other in range(3):  # a loser, by name or with a made-up token, on every process
        r = call(urls[other], "PATCH", path, {"agentId": "w%d" % ((n + 1) % 6), "status": "done"})
        assert (r.status, r.json["code"]) == (409, "stale_claim"), r
        r = call(urls[other], "PATCH", path, {"claimToken": "not-the-token", "status": "done"})
        assert (r.status, r.json["code"]) == (409, "stale_claim"), r
    r = call(urls[2], "PATCH", path, {"claimToken": won.json["claimToken"], "status": "done"})
    assert (r.status, r.json["status"]) == (200, "done"), r


@needs_postgres
def test_the_rate_limit_is_shared_by_the_processes(cluster):
    integrations = json.dumps([{"name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create"]}])
    relays = cluster(3, AGENT_RELAY_INTEGRATIONS=integrations, AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE="6")
    def ingest(n):
        return call(relays[n % 3].url, "POST", "/api/integrations/events", {"type": "a", "title": "t%d" % n},
                    headers={"Authorization": "Bearer " + OPS_TOKEN}).status
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        statuses = sorted(pool.map(ingest, range(9)))
    assert statuses == [201] * 6 + [429] * 3


def leader_of(relays):
    leaders = [r for r in relays if r.proc.poll() is None
               and b"\nagent_relay_leader 1\n" in call(r.url, "GET", "/api/metrics").raw]
    return leaders[0] if len(leaders) == 1 else None


@needs_postgres
def test_the_leader_moves_within_two_reap_intervals_and_each_callback_goes_once(cluster):
    received, lock = [], threading.Lock()

    def hook(handler, body):
        with lock:
            received.append(handler.headers["webhook-id"])
        return 200, [], b""
    receiver = StubServer(hook)
    try:
        integrations = json.dumps([{"name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create"],
                                    "callbackUrl": receiver.url + "/hook"}])
        relays = cluster(3, AGENT_RELAY_INTEGRATIONS=integrations, REAP_INTERVAL_MS="1000")

        def alarms(count, start):
            for n in range(start, start + count):
                r = call(relays[n % 3].url if relays[n % 3].proc.poll() is None else relays[(n + 1) % 3].url,
                         "POST", "/api/integrations/events", {"type": "alarm", "title": "a%d" % n},
                         headers={"Authorization": "Bearer " + OPS_TOKEN})
                assert r.status == 201, r
        alarms(12, 0)
        wait_until(lambda: len(received) == 12, timeout=15)
        leader = wait_until(lambda: leader_of(relays))
        leader.proc.kill()
        leader.proc.wait()
        killed = time.monotonic()
        alive = [r for r in relays if r is not leader]
        new_leader = wait_until(lambda: leader_of(alive), timeout=5)
        assert time.monotonic() - killed < 2.0  # two reap intervals
        alarms(12, 12)
        wait_until(lambda: len(received) == 24, timeout=15)
        time.sleep(0.5)  # a second delivery would come now
        assert len(received) == len(set(received)) == 24
        assert new_leader is not leader
    finally:
        receiver.close()


@needs_postgres
def test_sigkill_of_one_process_under_load_loses_no_acknowledged_message(cluster):
    relays = cluster(3)
    urls = [r.url for r in relays]
    assert call(urls[0], "POST", "/api/agents", {"id": "s"}).status == 201
    assert call(urls[0], "POST", "/api/agents", {"id": "r"}).status == 201
    acked, stop = [], threading.Event()

    def sender(n):
        k = 0
        while not stop.is_set():
            k += 1
            body = "%d-%d" % (n, k)
            try:
                r = call(urls[n % 3], "POST", "/api/messages", {"from": "s", "to": "r", "body": body}, timeout=5)
            except OSError:
                continue
            if r.status == 201:
                acked.append((r.json["id"], body))
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) > 100, timeout=20)
        relays[1].proc.kill()
        wait_until(lambda: len(acked) > 200, timeout=20)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    stored = {m["id"]: m["body"] for m in call(urls[0], "GET", "/api/messages?limit=1000").json["messages"]}
    since = max(stored)
    while True:
        page = call(urls[2], "GET", "/api/messages?limit=1000&since=%d" % since).json["messages"]
        if not page:
            break
        stored.update((m["id"], m["body"]) for m in page)
        since = page[-1]["id"]
    assert all(stored.get(i) == body for i, body in acked), [a for a in acked if stored.get(a[0]) != a[1]][:5]



@needs_postgres
def test_a_read_takes_the_write_lock_only_when_it_writes_and_a_write_before_its_first_statement(relay):
    """The database-wide write lock is what makes claims and checks atomic across
    processes; reads that write nothing (most GETs) leave it to the writers."""
    relay.register("a")
    store = relay.relay.store
    with store.transaction(write=False):
        store.agents()
        assert not store.conn.write_locked
        store.touch_agent("a", relay.relay.now())  # presence: a write
        assert store.conn.write_locked
    with store.transaction():
        assert store.conn.write_locked  # before reading what it will check


@needs_postgres
@pytest.mark.slow
def test_the_postgres_extra_installs_the_driver_and_the_command_runs_on_postgresql(tmp_path, postgres_schemas):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", ROOT + "[postgres]"],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip("no package index to fetch psycopg from")
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PYTHON", "DB_"))}
    proc = subprocess.Popen([str(venv / "bin" / "agent-relay"), "--port", "0", "--db-url",
                             postgres_schemas.url_for(str(tmp_path / "venv.db"))], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " listening on " in line, (line, proc.poll())
        url = line.split(" listening on ")[1].split()[0]
        assert call(url, "POST", "/api/agents", {"id": "from-venv"}).status == 201
        assert call(url, "GET", "/api/health").json == {"status": "ok", "version": agent_relay.__version__,
                                                       "db": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


@needs_postgres
def test_one_process_bridges_telegram_and_another_takes_over_when_it_dies(cluster):
    from test_telegram import ALLOWED, TOKEN, FakeTelegram
    telegram = FakeTelegram()
    try:
        relays = cluster(3, AGENT_RELAY_TELEGRAM_TOKEN=TOKEN, AGENT_RELAY_TELEGRAM_CHAT_IDS=str(ALLOWED),
                         AGENT_RELAY_TELEGRAM_API=telegram.url, AGENT_RELAY_TELEGRAM_POLL_SECONDS="1",
                         AGENT_RELAY_TELEGRAM_TARGET="tag:humans")
        assert call(relays[0].url, "POST", "/api/agents", {"id": "helper", "tags": ["humans"]}).status == 201

        def bodies(url):
            messages = call(url, "GET", "/api/messages?for=helper&limit=1000").json["messages"]
            return [m["body"] for m in messages if m["from"] == "telegram:alice"]
        for n in range(5):
            telegram.say("question %d" % n)
        wait_until(lambda: len(bodies(relays[0].url)) >= 5, timeout=15)
        for n in range(3):
            reply = {"from": "helper", "to": "channel:telegram", "body": "a%d" % n}
            assert call(relays[n].url, "POST", "/api/messages", reply).status == 201
        wait_until(lambda: len(telegram.texts()) >= 3, timeout=15)
        leader = wait_until(lambda: leader_of(relays))
        leader.proc.kill()
        leader.proc.wait()
        alive = [r for r in relays if r is not leader]
        for n in range(5, 8):
            telegram.say("question %d" % n)
        call(alive[0].url, "POST", "/api/messages", {"from": "helper", "to": "channel:telegram", "body": "a3"})
        wait_until(lambda: len(bodies(alive[0].url)) >= 8 and len(telegram.texts()) >= 4, timeout=15)
        time.sleep(1.5)  # a second poller or sender would show now
        assert sorted(bodies(alive[1].url)) == ["question %d" % n for n in range(8)]
        assert sorted(telegram.texts()) == ["helper: a%d" % n for n in range(4)]
    finally:
        telegram.close()


@needs_postgres
def test_a_backup_on_postgresql_is_refused_and_leaves_no_file(relay, tmp_path):
    r = relay.call("POST", "/api/system/backup", {"name": "backup.db"})
    assert (r.status, r.json["code"], r.json["field"]) == (409, "not_supported", "name"), r
    assert not (tmp_path / "backups" / "backup.db").exists()
