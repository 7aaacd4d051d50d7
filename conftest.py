"""Shared pytest fixtures: a real relay on a free loopback port with a temp
database, and small helpers to talk to it over real HTTP.

    def test_something(relay):
        r = relay.call("POST", "/api/agents", {"id": "a1"})
        assert r.status == 201

`relay_factory(**settings)` starts more relays (a token, short intervals, a
fake clock); every relay started is stopped after the test. `spawn_relay`
runs `python agent_relay.py` as a real subprocess for CLI, signal and crash
tests.
"""

import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import agent_relay

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "agent_relay.py")
# A PostgreSQL server URL: every relay fixture then runs on its own fresh database there (issue 21).
TEST_DB_URL = os.environ.get("AGENT_RELAY_TEST_DB_URL", "")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("sqlite_only")
    if marker is not None and TEST_DB_URL:
        pytest.skip("SQLite only: " + (marker.args[0] if marker.args else "inspects SQLite internals"))


class Response:
    def __init__(self, status, headers, raw):
        self.status = status
        self.headers = headers
        self.raw = raw
        try:
            self.json = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return "<Response %d %s>" % (self.status, self.raw[:300])


class FakeClock:
    """A clock tests move by hand (seconds since the epoch, like time.time)."""

    def __init__(self, start=None):
        self.now = time.time() if start is None else start
        self.lock = threading.Lock()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        with self.lock:
            self.now += seconds


class RelayClient:
    """A running relay as tests see it: its URL and a `call()` helper."""

    def __init__(self, server, token=None):
        self.server = server
        self.url = server.url
        self.host, self.port = "127.0.0.1", server.httpd.server_address[1]
        self.token = token

    @property
    def relay(self):
        return self.server.relay

    def call(self, method, path, body=None, headers=None, raw=None, token=None):
        headers = dict(headers or {})
        token = token if token is not None else self.token
        if token and "Authorization" not in headers and "X-Agent-Relay-Token" not in headers:
            headers["Authorization"] = "Bearer " + token
        data = raw
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    # shorthands for the most common calls
    def register(self, agent_id, **fields):
        r = self.call("POST", "/api/agents", dict(fields, id=agent_id))
        assert r.status in (200, 201), r
        return r.json

    def send(self, sender, to, body="hi", **fields):
        r = self.call("POST", "/api/messages", dict(fields, **{"from": sender, "to": to, "body": body}))
        assert r.status == 201, r
        return r.json

    def inbox(self, agent_id, **params):
        query = "&".join("%s=%s" % kv for kv in dict(params, **{"for": agent_id}).items())
        r = self.call("GET", "/api/messages?" + query)
        assert r.status == 200, r
        return r.json["messages"]

    def snapshot(self):
        """Everything a bad request must leave unchanged."""
        agents = self.call("GET", "/api/agents?limit=1000").json["agents"]
        messages = self.call("GET", "/api/messages?limit=1000").json["messages"]
        for agent in agents:
            agent.pop("lastSeenAt")
        return {"agents": agents, "messages": messages,
                "receipts": [self.call("GET", "/api/messages/%d/receipts" % m["id"]).json for m in messages]}

    def events(self, path="/api/events", headers=None):
        """An open SSE stream (see EventReader)."""
        return EventReader(self, path, headers)


class EventReader:
    """Reads SSE frames from a real stream: `next_event()`, `take(n)`."""

    def __init__(self, client, path="/api/events", headers=None):
        headers = dict(headers or {})
        if client.token:
            headers.setdefault("Authorization", "Bearer " + client.token)
        self.conn = http.client.HTTPConnection(client.host, client.port, timeout=10)
        self.conn.request("GET", path, headers=headers)
        self.sock = self.conn.sock  # getresponse() forgets it on a `Connection: close` answer
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.comments = []
        self.retry = None

    def next_event(self, timeout=5):
        """The next frame with data as a dict: {"id", "event", "data"}; None at end of stream."""
        self.sock.settimeout(timeout)
        frame = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode("utf-8").rstrip("\n")
            if line == "":
                if "data" in frame:
                    frame["data"] = json.loads(frame["data"])
                    return frame
                frame = {}
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                self.comments.append(value)
            elif field == "retry":
                self.retry = int(value)
            elif field == "id":
                frame["id"] = int(value)
            elif field in ("event", "data"):
                frame[field] = value

    def take(self, count, timeout=5, types=None):
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "only %d of %d events arrived: %r" % (len(found), count, found)
            event = self.next_event(remaining)
            assert event is not None, "stream ended after %r" % found
            if types is None or event["event"] in types:
                found.append(event)
        return found

    def close(self):
        self.response.close()
        self.sock.close()
        self.conn.close()


class StubServer:
    """The one loopback HTTP server for stand-ins of outside services (webhook
    receivers, the Telegram Bot API, a web page that attacks the relay).

    Every request (GET, POST, PUT) becomes `respond(handler, body)`, which
    returns (status, [(header, value)], body bytes), one request per
    connection. With `join_handlers`, close() waits for every handler thread
    (a browser's idle preconnection would hold it, so not for pages)."""

    def __init__(self, respond, join_handlers=False):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, reply = respond(self, body)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_PUT = do_POST

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = not join_handlers  # if joined, server_close() waits for the handler threads
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def json_post_server(answer):
    """A StubServer for JSON APIs (the Telegram Bot API): each request's JSON
    body goes to `answer(path, payload)`, which returns (status, JSON answer)."""
    def respond(handler, body):
        status, reply = answer(handler.path, json.loads(body or b"{}"))
        return status, [("Content-Type", "application/json")], json.dumps(reply).encode()
    return StubServer(respond)


def wait_until(condition, timeout=5.0, interval=0.01):
    """Poll `condition` until it is truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        time.sleep(interval)


@pytest.fixture(autouse=True)
def private_client_state(tmp_path, monkeypatch):
    """Agent tokens that clients keep go to the test's own folder, never the
    user's; a provider session the test runner itself runs in is not the test's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "client-state"))
    for name in agent_relay.PROVIDER_SESSION_VARS:
        monkeypatch.delenv(name, raising=False)


class PostgresSchemas:
    """With AGENT_RELAY_TEST_DB_URL: one fresh PostgreSQL schema per SQLite path a
    test uses (a relay restarted on the same path finds its data again), dropped
    after the test."""

    def __init__(self):
        self.created = []

    def url_for(self, db_path):
        import psycopg
        name = "t_" + hashlib.sha256(os.path.abspath(db_path).encode()).hexdigest()[:20]
        if name not in self.created:
            with psycopg.connect(TEST_DB_URL, autocommit=True) as conn:
                conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % name)
                conn.execute("CREATE SCHEMA %s" % name)
            self.created.append(name)
        return TEST_DB_URL + ("&" if "?" in TEST_DB_URL else "?") + "options=-csearch_path%3D" + name

    def drop(self):
        if self.created:
            import psycopg
            with psycopg.connect(TEST_DB_URL, autocommit=True) as conn:
                for name in self.created:
                    conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % name)


@pytest.fixture
def postgres_schemas():
    schemas = PostgresSchemas()
    yield schemas
    schemas.drop()


@pytest.fixture
def relay_factory(tmp_path, postgres_schemas):
    servers = []

    def start(clock=None, db_path=None, **settings):
        settings.setdefault("port", 0)
        settings.setdefault("db_path", db_path or str(tmp_path / ("relay%d.db" % len(servers))))
        if TEST_DB_URL:
            settings.setdefault("db_url", postgres_schemas.url_for(settings["db_path"]))
        server = agent_relay.RelayServer(agent_relay.Settings(**settings), clock=clock or time.time).start()
        servers.append(server)
        return RelayClient(server, token=settings.get("token") or None)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def relay(relay_factory):
    return relay_factory()


@pytest.fixture
def clock():
    return FakeClock()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedRelay:
    """`python agent_relay.py` in a subprocess; parses the URL it prints."""

    def __init__(self, args, env, cwd):
        self.proc = subprocess.Popen([sys.executable, SCRIPT] + list(args), env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline()
        self.url = None
        if " listening on " in self.first_line:
            self.url = self.first_line.split(" listening on ")[1].split()[0]

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.stdout.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def spawn_relay(tmp_path, postgres_schemas):
    spawned = []

    def spawn(*args, env=None, cwd=None, db_path=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PORT", "HOST",
                                                                              "DB_PATH"))}
        full_env.update(env or {})
        if "--port" not in args and "PORT" not in full_env:
            args = ("--port", "0") + tuple(args)
        if "--db-path" not in args and "DB_PATH" not in full_env:
            args = ("--db-path", db_path or str(tmp_path / "spawned.db")) + tuple(args)
        if TEST_DB_URL and "--db-url" not in args and "DB_URL" not in full_env:
            path = args[list(args).index("--db-path") + 1] if "--db-path" in args else full_env["DB_PATH"]
            full_env["DB_URL"] = postgres_schemas.url_for(os.path.join(cwd or str(tmp_path), path))
        relay = SpawnedRelay(args, full_env, cwd or str(tmp_path))
        spawned.append(relay)
        return relay

    yield spawn
    for relay in spawned:
        relay.stop(signal.SIGKILL)
