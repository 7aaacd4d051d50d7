"""Issue 4: integrations, deduped event ingress, tasks with leases and
fencing, and signed callbacks, over real HTTP against the real server.

Time (leases, presence, the rate-limit window) moves on the FakeClock and
the reaper runs on POST /api/system/reap. Callbacks go to `Receiver`, a
stdlib HTTP server inside the test on a free loopback port that records
every POST and answers from a script; whatever arrives asynchronously is
awaited with `wait_until`, never with sleeps.
"""

import base64
import collections
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

import agent_relay
from conftest import RelayClient, StubServer, free_port, wait_until

ADMIN_TOKEN = "admin-token-0123456789"
OPS_TOKEN = "ops-token-0123456789"
CI_TOKEN = "ci-token-0123456789"
WHSEC = "whsec_" + base64.b64encode(b"the ops-monitor shared secret!!!").decode()
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SPEC_STATUSES = ("open", "claimed", "in_progress", "blocked", "done", "failed", "cancelled")
HELD = ("claimed", "in_progress", "blocked")


# ---------------------------------------------------------------------------
# Helpers


def integration(name="ops-monitor", token=OPS_TOKEN, scopes=("tasks:create", "tasks:read", "tasks:write"),
                **extra):
    """One AGENT_RELAY_INTEGRATIONS entry."""
    return dict({"name": name, "token": token, "scopes": list(scopes)}, **extra)


def configured(*entries):
    return json.dumps(list(entries))


def ingest(relay, token=None, **fields):
    """POST /api/integrations/events (token None: the relay's own token, if any)."""
    return relay.call("POST", "/api/integrations/events", fields, token=token)


def alarm(relay, token=OPS_TOKEN, **fields):
    return ingest(relay, token, **dict({"type": "alarm", "title": "prod-api 5xx rate high"}, **fields))


def job(relay, **fields):
    """A task from the relay's own caller (admin or anonymous)."""
    r = ingest(relay, **dict({"type": "job", "title": "a job"}, **fields))
    assert r.status == 201, r
    return r.json["task"]


def get_task(relay, task_id):
    r = relay.call("GET", "/api/tasks/%d" % task_id)
    assert r.status == 200, r
    return r.json


def task_events(relay, task_id):
    r = relay.call("GET", "/api/tasks/%d/events" % task_id)
    assert r.status == 200, r
    return r.json["events"]


def claim(relay, task_id, agent_id, **fields):
    return relay.call("POST", "/api/tasks/%d/claim" % task_id, dict(fields, agentId=agent_id))


def claim_token(relay, task_id, agent_id, **fields):
    r = claim(relay, task_id, agent_id, **fields)
    assert r.status == 200, r
    return r.json["claimToken"]


def update(relay, task_id, **fields):
    return relay.call("PATCH", "/api/tasks/%d/status" % task_id, fields)


def reap(relay):
    r = relay.call("POST", "/api/system/reap")
    assert r.status == 200, r
    return r.json


def task_ids(relay, query=""):
    r = relay.call("GET", "/api/tasks" + query)
    assert r.status == 200, r
    return [t["id"] for t in r.json["tasks"]]


def ms_iso(clock, plus_seconds=0):
    """The relay's wire time for the FakeClock's now (+ seconds)."""
    return agent_relay.iso(int(clock.now * 1000) + plus_seconds * 1000)


def client_for(spawned, token=None):
    """A conftest RelayClient for a relay started with spawn_relay."""
    host, port = spawned.url[len("http://"):].rsplit(":", 1)
    server = types.SimpleNamespace(url=spawned.url, httpd=types.SimpleNamespace(server_address=(host, int(port))))
    return RelayClient(server, token=token)


def route_path(pattern):
    return re.sub(r"\{[^}]*\}", "x", re.sub(r"\{[^}:]*:int\}", "1", pattern))


def signature_ok(secret, delivery):
    """Standard Webhooks, written out independently of the server's code."""
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode("utf-8")
    signed = ("%s.%s." % (delivery.webhook_id, delivery.headers["webhook-timestamp"])).encode() + delivery.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s) for s in delivery.headers.get("webhook-signature", "").split())


class Delivery(collections.namedtuple("Delivery", "method path headers body status")):
    """One request the receiver got, and the status it answered."""

    @property
    def payload(self):
        return json.loads(self.body)

    @property
    def event(self):
        return self.headers.get("x-agent-relay-event")

    @property
    def webhook_id(self):
        return self.headers.get("webhook-id")

    @property
    def task_id(self):
        return self.payload["task"]["id"]


class Receiver:
    """A fake integration endpoint on a free loopback port.

    Answers each request with the next status of `script`, then `status`
    (a 3xx comes with a Location on this same server). While `release` is
    clear a request hangs inside the handler; `entered` is set as soon as a
    request has arrived. A request is recorded once it is answered.
    """

    def __init__(self):
        self.deliveries = []
        self.script = []
        self.status = 200
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()
        receiver = self

        def respond(handler, body):  # a followed redirect would show up here too (GET, PUT)
            receiver.entered.set()
            receiver.release.wait(10)
            with receiver.lock:
                status = receiver.script.pop(0) if receiver.script else receiver.status
                receiver.deliveries.append(Delivery(handler.command, handler.path, {
                    k.lower(): v for k, v in handler.headers.items()}, body, status))
            return status, [("Location", receiver.base + "/moved")] if 300 <= status < 400 else [], b""

        self.http = StubServer(respond, join_handlers=True)
        self.base = self.http.url
        self.url = self.base + "/hook"

    def ok(self):
        with self.lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]

    def all(self):
        with self.lock:
            return list(self.deliveries)

    def close(self):
        self.release.set()
        self.http.close()


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def ops(relay_factory, clock):
    """A relay on the FakeClock with the ops-monitor integration (target
    cap:ops, channel alerts) and one agent that can take its work."""
    relay = relay_factory(clock=clock, integrations=configured(
        integration(targets=["cap:ops"], channels=["alerts"])))
    relay.register("ops-bot", capabilities=["ops"])
    return relay


# ---------------------------------------------------------------------------
# Configuration, scopes, targets, secrets (SPEC 2, 6.1)


@pytest.mark.parametrize("value,expected", [
    ("[{not json", "not valid JSON"),
    ('{"name": "ops", "token": "ops-token-1", "scopes": ["tasks:create"]}', "must be a JSON array"),
    ('[{"name": "ops", "scopes": ["tasks:create"]}]', "needs a token"),
    ('[{"name": "ops", "token": "ops-token-1", "scopes": ["tasks:destroy"]}]', "scopes"),
    ('[{"name": "ops", "token": "ops-token-1", "scopes": []}]', "scopes"),
    ('[{"name": "ops", "token": "ops-token-1", "scopes": ["tasks:create"], "callbackUrl": "ftp://example.test/x"}]',
     "callbackUrl must be an http"),
    ('[{"name": "ops", "token": "ops-token-1", "scopes": ["tasks:create"], "targets": "cap:ops"}]', "targets"),
    ('[{"name": "a", "token": "ops-token-1", "scopes": ["*"]}, {"name": "b", "token": "ops-token-1", "scopes": ["*"]}]',
     "repeats"),
    # A whsec_ secret is base64 by definition; one that is not cannot sign anything.
    ('[{"name": "ops", "token": "ops-token-1", "scopes": ["tasks:create"], "callbackUrl": "http://127.0.0.1:9/",'
     ' "callbackSecret": "whsec_not base64!"}]', "callbackSecret"),
], ids=["bad-json", "not-an-array", "missing-token", "unknown-scope", "no-scopes", "ftp-callback",
        "targets-not-a-list", "repeated-token", "whsec-not-base64"])
def test_a_malformed_integrations_value_refuses_to_start_saying_what_is_wrong(spawn_relay, value, expected):
    relay = spawn_relay(env={"AGENT_RELAY_INTEGRATIONS": value})
    assert relay.url is None, relay.first_line
    assert relay.stop() == 2
    lines = relay.stderr.strip().splitlines()
    assert len(lines) == 1, relay.stderr
    assert "AGENT_RELAY_INTEGRATIONS" in lines[0] and expected in lines[0], lines[0]
    assert "ops-token-1" not in relay.stderr


def test_integration_tokens_are_scoped_on_every_route(relay_factory):
    scopes = [s for s in agent_relay.SCOPES if s != "*"]
    per_scope = {s: integration("only-" + s.replace(":", "-"), "token-for-" + s, [s]) for s in scopes}
    relay = relay_factory(token=ADMIN_TOKEN, integrations=configured(
        integration("creator", "creator-token-1", ["tasks:create"]), *per_scope.values()))
    relay.register("someone")
    wrong = []

    def check(method, path, token, allowed, needed):
        if method == "GET" and path == "/api/events" and allowed:
            stream = RelayClient(relay.server, token=token).events(path)
            status = stream.status
            stream.close()
            if status != 200:
                wrong.append((method, path, token, status))
            return
        r = relay.call(method, path, {} if method in ("POST", "PATCH") else None, token=token)
        if allowed and r.status in (401, 403):
            wrong.append((method, path, token, r.status, r.json))
        if not allowed and (r.status, r.json.get("code"), r.json.get("scope")) != (403, "insufficient_scope", needed):
            wrong.append((method, path, token, r.status, r.json))
        if not allowed and needed not in r.json.get("error", ""):
            wrong.append((method, path, token, "error does not name the scope", r.json))

    for method, pattern, _handler, scope, _tx in agent_relay.ROUTES:
        path = route_path(pattern)
        accepted = () if scope is None else scope if isinstance(scope, tuple) else (scope,)
        open_to_all = not accepted  # a route without a scope: any caller past the token check
        check(method, path, "creator-token-1", open_to_all or "tasks:create" in accepted,
              accepted[0] if accepted else None)
        for granted in accepted:
            check(method, path, "token-for-" + granted, True, None)
        check(method, path, ADMIN_TOKEN, True, None)
    assert wrong == []

    r = relay.call("GET", "/api/agents", token="creator-token-1")
    assert (r.status, r.json["code"], r.json["scope"]) == (403, "insufficient_scope", "agents:read")
    r = relay.call("GET", "/api/agents", token=OPS_TOKEN)  # not a token of this relay
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = relay.call("GET", "/api/agents", headers={"X-Agent-Relay-Token": "token-for-agents:read"})
    assert r.status == 200 and "someone" in [a["id"] for a in r.json["agents"]]


def test_without_an_admin_token_integration_tokens_still_limit_the_caller(relay_factory):
    relay = relay_factory(integrations=configured(integration("creator", "creator-token-1", ["tasks:create"])))
    assert relay.call("GET", "/api/agents").status == 200  # no token: localhost is frictionless
    r = relay.call("GET", "/api/agents", token="creator-token-1")
    assert (r.status, r.json["code"], r.json["scope"]) == (403, "insufficient_scope", "agents:read")
    r = alarm(relay, token="creator-token-1")
    assert r.status == 201 and r.json["task"]["source"] == "creator"


def test_integrations_may_only_address_their_targets_and_channels(relay_factory):
    relay = relay_factory(integrations=configured(
        integration(targets=["cap:ops"], channels=["alerts"]),
        integration("notifier", CI_TOKEN, ["messages:write"], targets=["tag:oncall"], channels=["alerts"])))
    relay.register("ops-bot", capabilities=["ops"], tags=["oncall"])
    before = relay.snapshot()
    for fields in ({"target": "cap:dev"}, {"target": "broadcast"}, {"target": "ops-bot"},
                   {"channel": "random"}, {"target": "cap:dev", "channel": "alerts"}):
        r = alarm(relay, **fields)
        assert (r.status, r.json["code"]) == (403, "target_not_allowed"), (fields, r)
        assert r.json["field"] in ("target", "channel")
    assert task_ids(relay) == [] and relay.snapshot() == before
    r = alarm(relay, target="CAP:Ops", channel="Alerts")  # compared case-insensitively
    assert r.status == 201 and r.json["task"]["target"] == "CAP:Ops"

    def send(to, **fields):
        return relay.call("POST", "/api/messages", dict(fields, **{"from": "notifier", "to": to, "body": "page"}),
                          token=CI_TOKEN)
    before = relay.snapshot()
    for to, fields in (("broadcast", {}), ("cap:ops", {}), ("ops-bot", {}), ("tag:oncall", {"channel": "random"})):
        r = send(to, **fields)
        assert (r.status, r.json["code"]) == (403, "target_not_allowed"), (to, r)
    assert relay.snapshot() == before
    assert send("tag:oncall").status == 201
    assert send("tag:oncall", channel="alerts").status == 201


def test_a_channel_target_is_held_to_the_allowed_channels(relay_factory):
    relay = relay_factory(integrations=configured(
        integration("chatops", CI_TOKEN, ["tasks:create", "messages:write"], channels=["alerts"])))
    relay.register("ops-bot")
    r = alarm(relay, token=CI_TOKEN, target="channel:secret")
    assert (r.status, r.json.get("code")) == (403, "target_not_allowed"), r
    r = relay.call("POST", "/api/messages", {"from": "chatops", "to": "channel:secret", "body": "x"}, token=CI_TOKEN)
    assert (r.status, r.json.get("code")) == (403, "target_not_allowed"), r
    r = alarm(relay, token=CI_TOKEN, target="channel:alerts")
    assert r.status == 201 and r.json["task"]["channel"] == "alerts"


def test_tokens_and_secrets_never_appear_in_answers_or_the_log(spawn_relay, receiver):
    env = {"AGENT_RELAY_TOKEN": ADMIN_TOKEN, "AGENT_RELAY_INTEGRATIONS": configured(
        integration(callbackUrl=receiver.url, callbackSecret=WHSEC),
        integration("reader", CI_TOKEN, ["tasks:read"]))}
    spawned = spawn_relay(env=env)
    assert spawned.url, spawned.first_line
    relay = client_for(spawned, ADMIN_TOKEN)
    relay.register("ops-bot")
    answers = [alarm(relay, dedupeKey="k"), alarm(relay, dedupeKey="k")]
    task_id = answers[0].json["task"]["id"]
    answers.append(claim(relay, task_id, "ops-bot"))
    wrong_tokens = [ADMIN_TOKEN + "x", OPS_TOKEN[:-1], "Bearer " + CI_TOKEN, "not-a-token-at-all"]
    for token in wrong_tokens:
        answers.append(relay.call("GET", "/api/integrations", token=token))
        answers.append(alarm(relay, token=token))
    answers += [relay.call("GET", "/api/agents", token=CI_TOKEN),
                relay.call("POST", "/api/system/reap", token=OPS_TOKEN),
                relay.call("POST", "/api/integrations/events", {"type": 5}, token=OPS_TOKEN),
                relay.call("POST", "/api/integrations/events", raw=b"{broken", headers={
                    "Content-Type": "application/json"}, token=OPS_TOKEN)]
    for path in ("/api/integrations", "/api/tasks", "/api/tasks/%d" % task_id, "/api/tasks/%d/events" % task_id,
                 "/api/stats", "/api/channels", "/api/messages", "/api/agents"):
        answers.append(relay.call("GET", path))
    answers.append(relay.call("GET", "/api/integrations", token=CI_TOKEN))
    assert relay.call("GET", "/api/integrations", token=CI_TOKEN).status == 200
    wait_until(lambda: len(receiver.ok()) >= 2)  # created and claimed went out
    assert spawned.stop() == 0
    texts = [r.raw.decode("utf-8") + str(dict(r.headers)) for r in answers]
    texts += [d.body.decode("utf-8") for d in receiver.all()]
    texts += [spawned.first_line, spawned.stderr]
    for secret in [ADMIN_TOKEN, OPS_TOKEN, CI_TOKEN, WHSEC, WHSEC[len("whsec_"):]] + wrong_tokens:
        leaks = [t for t in texts if secret in t]
        assert leaks == [], "%r leaked into %r" % (secret, leaks[0][:300])


# ---------------------------------------------------------------------------
# Ingress: created, deduped, resolved, noop (SPEC 6.3)


def test_ingress_creates_dedupes_resolves_and_noops(ops, clock):
    r = alarm(ops, severity="critical", dedupeKey="prod-api:5xx-rate", body="5xx at 12% for 5 min",
              meta={"runbook": "rb-7"})
    assert r.status == 201 and r.json["action"] == "created"
    task = r.json["task"]
    assert (task["source"], task["target"], task["channel"]) == ("ops-monitor", "cap:ops", "alerts")
    assert (task["type"], task["severity"], task["dedupeKey"]) == ("alarm", "critical", "prod-api:5xx-rate")
    assert (task["status"], task["claimedBy"], task["occurrenceCount"]) == ("open", None, 1)
    assert task["firstSeenAt"] == task["lastSeenAt"] == task["createdAt"] == ms_iso(clock)
    assert task["meta"] == {"runbook": "rb-7"} and task["resolvedAt"] is None
    assert get_task(ops, task["id"]) == task
    inbox = ops.inbox("ops-bot")
    assert [m["id"] for m in inbox] == [task["messageId"]]
    message = inbox[0]
    assert (message["kind"], message["claimable"], message["claimedBy"]) == ("task", True, None)
    assert (message["taskId"], message["from"], message["to"], message["channel"]) == (
        task["id"], "ops-monitor", "cap:ops", "alerts")
    assert "prod-api 5xx rate high" in message["body"] and "5xx at 12% for 5 min" in message["body"]

    clock.advance(5)
    r = alarm(ops, severity="critical", dedupeKey="prod-api:5xx-rate")
    assert r.status == 200 and r.json["action"] == "deduped"
    again = r.json["task"]
    assert again["id"] == task["id"] and again["occurrenceCount"] == 2
    assert again["firstSeenAt"] == task["firstSeenAt"] and again["lastSeenAt"] == ms_iso(clock)
    assert again["messageId"] == task["messageId"] and again["status"] == "open"
    assert [m["id"] for m in ops.inbox("ops-bot")] == [task["messageId"]]  # no new message
    assert [m["id"] for m in ops.call("GET", "/api/messages").json["messages"]] == [task["messageId"]]
    history = task_events(ops, task["id"])
    assert [e["type"] for e in history] == ["created", "occurrence"]
    assert history[1]["data"]["occurrenceCount"] == 2 and history[1]["actor"] == "ops-monitor"

    clock.advance(5)
    r = alarm(ops, dedupeKey="prod-api:5xx-rate", status="resolved")
    assert r.status == 200 and r.json["action"] == "resolved"
    done = r.json["task"]
    assert (done["id"], done["status"], done["resolvedAt"]) == (task["id"], "done", ms_iso(clock))
    assert [e["type"] for e in task_events(ops, task["id"])] == ["created", "occurrence", "resolved"]

    for fields in ({"dedupeKey": "prod-api:5xx-rate"}, {"dedupeKey": "never-seen"}, {}):
        r = alarm(ops, status="resolved", **fields)
        assert (r.status, r.json) == (200, {"action": "noop", "task": None}), fields
    assert task_ids(ops) == [task["id"]]

    r = alarm(ops, dedupeKey="prod-api:5xx-rate")  # fires again after it was resolved: a new task
    assert r.status == 201 and r.json["action"] == "created" and r.json["task"]["id"] != task["id"]


def test_resolving_a_claimed_task_closes_it_and_fences_the_holder(ops):
    task = alarm(ops, dedupeKey="disk").json["task"]
    token = claim_token(ops, task["id"], "ops-bot")
    assert update(ops, task["id"], claimToken=token, status="in_progress").status == 200
    r = alarm(ops, dedupeKey="disk", status="resolved")
    assert r.status == 200 and r.json["action"] == "resolved" and r.json["task"]["status"] == "done"
    assert task_events(ops, task["id"])[-1]["data"]["from"] == "in_progress"
    r = update(ops, task["id"], claimToken=token, result={"late": True})
    assert (r.status, r.json["code"]) == (409, "stale_claim")


def test_ingress_source_and_target_defaults(relay_factory):
    relay = relay_factory(token=ADMIN_TOKEN, integrations=configured(
        integration(targets=["cap:ops", "tag:sre"]), integration("ci", CI_TOKEN, ["tasks:create"])))
    r = alarm(relay, dedupeKey="k", source="someone-else")  # an integration cannot name another source
    assert r.status == 201
    assert (r.json["task"]["source"], r.json["task"]["target"]) == ("ops-monitor", "cap:ops")
    r = alarm(relay, token=CI_TOKEN, dedupeKey="k")  # same key, other source: its own task
    assert r.status == 201
    assert (r.json["task"]["source"], r.json["task"]["target"]) == ("ci", "broadcast")
    r = ingest(relay, type="alarm", title="disk full", source="nagios", dedupeKey="k")  # the admin token
    assert r.status == 201 and r.json["task"]["source"] == "nagios"
    assert ingest(relay, type="alarm", title="disk full", source="nagios", dedupeKey="k").json["action"] == "deduped"
    r = ingest(relay, type="alarm", title="disk full", dedupeKey="k")
    assert r.status == 201 and r.json["task"]["source"] == "admin"
    assert len(task_ids(relay)) == 4

    anonymous = relay_factory()
    r = ingest(anonymous, type="note", title="hello")
    assert r.status == 201 and r.json["task"]["source"] == "admin" and r.json["task"]["target"] == "broadcast"
    r = ingest(anonymous, type="note", title="hello", target="nobody-here")
    assert (r.status, r.json["code"], r.json["field"]) == (404, "unknown_agent", "target")


@pytest.mark.parametrize("fields,field", [
    ({"title": "no type"}, "type"),
    ({"type": "alarm"}, "title"),
    ({"type": "alarm", "title": "x", "status": "exploded"}, "status"),
    ({"type": "alarm", "title": "x", "meta": []}, "meta"),
    ({"type": "alarm", "title": "x", "target": "tag:"}, "target"),
    ({"type": "alarm", "title": "x", "channel": "alerts and more"}, "channel"),
    ({"type": "alarm", "title": "x", "target": "channel:a,b"}, "target"),
])
def test_bad_ingress_is_400_naming_the_field_and_changes_nothing(ops, fields, field):
    before = ops.snapshot()
    r = ingest(ops, OPS_TOKEN, **fields)
    assert r.status == 400 and r.json["field"] == field, r
    assert ops.snapshot() == before and task_ids(ops) == []


def test_ingress_is_rate_limited_per_integration(relay_factory, clock):
    relay = relay_factory(clock=clock, integration_rate_limit_per_minute=3, integrations=configured(
        integration(), integration("ci", CI_TOKEN, ["tasks:create"])))
    for _ in range(3):
        assert alarm(relay, dedupeKey="flap").status in (200, 201)
    r = alarm(relay, dedupeKey="flap")
    assert (r.status, r.json["code"]) == (429, "rate_limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    task_id = task_ids(relay)[0]
    assert get_task(relay, task_id)["occurrenceCount"] == 3  # the refused event changed nothing
    assert alarm(relay, token=CI_TOKEN).status == 201  # another integration has its own budget
    clock.advance(30)
    assert alarm(relay, dedupeKey="flap").status == 429
    clock.advance(31)
    r = alarm(relay, dedupeKey="flap")
    assert r.status == 200 and r.json["task"]["occurrenceCount"] == 4


def test_concurrent_ingress_of_one_dedupe_key_makes_one_task(ops):
    barrier = threading.Barrier(16)
    results = []

    def fire():
        barrier.wait(5)
        r = alarm(ops, dedupeKey="disk-full")
        results.append((r.status, r.json["action"], r.json["task"]["id"]))
    threads = [threading.Thread(target=fire) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted((s, a) for s, a, _ in results) == [(200, "deduped")] * 15 + [(201, "created")]
    assert len({task_id for _, _, task_id in results}) == 1
    task_id = results[0][2]
    assert task_ids(ops) == [task_id]
    assert get_task(ops, task_id)["occurrenceCount"] == 16
    assert len(ops.call("GET", "/api/messages").json["messages"]) == 1
    types_seen = collections.Counter(e["type"] for e in task_events(ops, task_id))
    assert types_seen == {"created": 1, "occurrence": 15}


# ---------------------------------------------------------------------------
# Task routes (SPEC 6.2, 6.3)


def test_list_tasks_with_filters_newest_first(relay_factory):
    relay = relay_factory(integrations=configured(
        integration(), integration("ci", CI_TOKEN, ["tasks:create"], targets=["tag:builders"])))
    relay.register("ops-bot", capabilities=["ops"])
    relay.register("builder", tags=["builders"])
    t1 = alarm(relay, target="cap:ops", dedupeKey="a").json["task"]["id"]
    t2 = alarm(relay, token=CI_TOKEN, title="build red").json["task"]["id"]
    t3 = alarm(relay, dedupeKey="b").json["task"]["id"]
    t4 = alarm(relay, target="cap:ops", dedupeKey="c").json["task"]["id"]
    assert claim(relay, t2, "builder").status == 200
    assert alarm(relay, dedupeKey="c", status="resolved").json["action"] == "resolved"

    assert task_ids(relay) == [t4, t3, t2, t1]
    assert task_ids(relay, "?status=open") == [t3, t1]
    assert task_ids(relay, "?status=active") == [t3, t2, t1]
    assert task_ids(relay, "?status=claimed") == [t2]
    assert task_ids(relay, "?status=done") == [t4]
    assert task_ids(relay, "?source=ci") == [t2]
    assert task_ids(relay, "?source=ops-monitor") == [t4, t3, t1]
    assert task_ids(relay, "?target=cap%3Aops") == [t4, t1]
    assert task_ids(relay, "?target=tag:builders") == [t2]
    assert task_ids(relay, "?claimedBy=builder") == [t2]
    assert task_ids(relay, "?limit=2") == [t4, t3]
    assert task_ids(relay, "?status=active&source=ops-monitor&target=cap:ops") == [t1]
    assert task_ids(relay, "?source=nobody") == []
    for query, field in (("?status=bogus", "status"), ("?limit=0", "limit"), ("?limit=many", "limit")):
        r = relay.call("GET", "/api/tasks" + query)
        assert r.status == 400 and r.json["field"] == field, (query, r)


def test_unknown_tasks_are_404_and_bad_updates_400(ops):
    task = alarm(ops).json["task"]
    for method, path, body in (("GET", "/api/tasks/999", None), ("GET", "/api/tasks/999/events", None),
                               ("POST", "/api/tasks/999/claim", {"agentId": "ops-bot"}),
                               ("PATCH", "/api/tasks/999/status", {"status": "done"})):
        r = ops.call(method, path, body)
        assert (r.status, r.json["code"]) == (404, "unknown_task"), (method, path, r)
    assert ops.call("GET", "/api/tasks/nope").status == 404
    r = claim(ops, task["id"], "nobody-registered")
    assert (r.status, r.json["code"], r.json["field"]) == (404, "unknown_agent", "agentId")
    r = ops.call("POST", "/api/tasks/%d/claim" % task["id"], {})
    assert r.status == 400 and r.json["field"] == "agentId"
    r = claim(ops, task["id"], "ops-bot", leaseSeconds=0)
    assert r.status == 400 and r.json["field"] == "leaseSeconds"
    r = update(ops, task["id"])
    assert r.status == 400 and r.json["field"] == "status"
    r = update(ops, task["id"], status="finished")
    assert r.status == 400 and r.json["field"] == "status"
    assert get_task(ops, task["id"]) == task  # nothing changed


def test_task_history_is_recorded_oldest_first_and_streamed(ops):
    stream = ops.events("/api/events?types=task.created,task.updated")
    try:
        task = alarm(ops, dedupeKey="k").json["task"]
        alarm(ops, dedupeKey="k")
        token = claim_token(ops, task["id"], "ops-bot", leaseSeconds=60)
        r = update(ops, task["id"], claimToken=token, status="in_progress", progress={"step": 1, "of": 3},
                   note="rolling back")
        assert r.status == 200 and r.json["status"] == "in_progress" and r.json["progress"] == {"step": 1, "of": 3}
        assert r.json["claimToken"] == token
        r = update(ops, task["id"], agentId="ops-bot", progress={"step": 2, "of": 3})
        assert r.status == 200 and r.json["progress"] == {"step": 2, "of": 3} and r.json["status"] == "in_progress"
        r = update(ops, task["id"], claimToken=token, status="done", result={"fixed": True, "pr": 42})
        assert r.status == 200 and r.json["status"] == "done" and r.json["result"] == {"fixed": True, "pr": 42}
        assert r.json["resolvedAt"] is not None and "claimToken" not in r.json

        history = task_events(ops, task["id"])
        assert [e["type"] for e in history] == ["created", "occurrence", "claimed", "status", "progress", "status"]
        assert [e["id"] for e in history] == sorted(e["id"] for e in history)
        assert all(e["taskId"] == task["id"] and e["createdAt"] for e in history)
        assert [e["actor"] for e in history] == ["ops-monitor", "ops-monitor"] + ["ops-bot"] * 4
        assert history[3]["data"]["from"] == "claimed" and history[3]["data"]["to"] == "in_progress"
        assert history[3]["data"]["note"] == "rolling back"
        assert history[4]["data"]["progress"] == {"step": 2, "of": 3}
        assert history[5]["data"]["to"] == "done" and history[5]["data"]["result"] == {"fixed": True, "pr": 42}

        frames = stream.take(6)
        assert [f["event"] for f in frames] == ["task.created"] + ["task.updated"] * 5
        assert [f["data"]["status"] for f in frames] == ["open", "open", "claimed", "in_progress", "in_progress",
                                                         "done"]
        assert all(f["data"]["id"] == task["id"] for f in frames)
        assert [f["data"]["occurrenceCount"] for f in frames][:2] == [1, 2]
        # the fencing token goes only to its holder
        assert all(token not in json.dumps(f["data"]) for f in frames)
        assert token not in ops.call("GET", "/api/tasks/%d" % task["id"]).raw.decode()
        assert token not in ops.call("GET", "/api/tasks/%d/events" % task["id"]).raw.decode()
    finally:
        stream.close()


def test_history_keeps_a_progress_given_with_a_status_and_no_progress_for_a_note(ops):
    task = alarm(ops).json["task"]
    token = claim_token(ops, task["id"], "ops-bot", leaseSeconds=60)
    assert update(ops, task["id"], claimToken=token, status="in_progress", progress={"step": 1}).status == 200
    assert update(ops, task["id"], claimToken=token, note="still looking").status == 200
    status_change, note_only = task_events(ops, task["id"])[-2:]
    assert status_change["type"] == "status" and status_change["data"]["progress"] == {"step": 1}
    assert note_only["type"] == "progress" and note_only["data"] == {"note": "still looking"}


def test_of_32_racing_claims_exactly_one_wins(ops):
    workers = ["worker-%02d" % i for i in range(32)]
    for worker in workers:
        ops.register(worker, capabilities=["ops"])
    task = alarm(ops).json["task"]
    barrier = threading.Barrier(len(workers))
    results = {}

    def race(worker):
        barrier.wait(5)
        results[worker] = claim(ops, task["id"], worker)
    threads = [threading.Thread(target=race, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [w for w, r in results.items() if r.status == 200]
    assert len(winners) == 1, {w: r.status for w, r in results.items()}
    winner = winners[0]
    for worker, r in results.items():
        if worker != winner:
            assert (r.status, r.json["code"], r.json["claimedBy"]) == (409, "already_claimed", winner), r
    assert results[winner].json["claimedBy"] == winner and results[winner].json["claimToken"]
    current = get_task(ops, task["id"])
    assert (current["status"], current["claimedBy"]) == ("claimed", winner)
    message = ops.call("GET", "/api/messages/%d" % task["messageId"]).json
    assert message["claimedBy"] == winner
    assert [e["type"] for e in task_events(ops, task["id"])].count("claimed") == 1


def test_claiming_the_task_message_claims_the_task(ops):
    ops.register("ops-bot-2", capabilities=["ops"])
    task = alarm(ops).json["task"]
    r = ops.call("POST", "/api/messages/%d/claim" % task["messageId"], {"agentId": "ops-bot"})
    assert r.status == 200 and r.json["claimedBy"] == "ops-bot"
    current = get_task(ops, task["id"])
    assert (current["status"], current["claimedBy"]) == ("claimed", "ops-bot") and current["leaseExpiresAt"]
    assert [e["type"] for e in task_events(ops, task["id"])] == ["created", "claimed"]
    for path in ("/api/tasks/%d/claim" % task["id"], "/api/messages/%d/claim" % task["messageId"]):
        r = ops.call("POST", path, {"agentId": "ops-bot-2"})
        assert (r.status, r.json["code"], r.json["claimedBy"]) == (409, "already_claimed", "ops-bot"), (path, r)
    r = update(ops, task["id"], agentId="ops-bot", status="in_progress")
    assert r.status == 200 and r.json["status"] == "in_progress"
    assert update(ops, task["id"], agentId="ops-bot-2", status="done").json["code"] == "stale_claim"


# SPEC 6.2: open -> claimed (by claim only); claimed, in_progress or blocked ->
# in_progress, blocked, done, failed, open; open -> cancelled, done.
_WORKING = {"in_progress", "blocked", "done", "failed", "open"}
ALLOWED = {"open": {"cancelled", "done"}, "claimed": _WORKING, "in_progress": _WORKING, "blocked": _WORKING,
           "done": set(), "failed": set(), "cancelled": set()}


def task_in(relay, status):
    """A fresh task in `status`, and the claimToken that updates it (None when nobody holds it)."""
    task_id = job(relay)["id"]
    if status == "open":
        return task_id, None
    if status == "cancelled":
        assert update(relay, task_id, status="cancelled").status == 200
        return task_id, None
    token = claim_token(relay, task_id, "worker")
    if status != "claimed":
        r = update(relay, task_id, claimToken=token, status=status)
        assert r.status == 200, (status, r)
    assert get_task(relay, task_id)["status"] == status
    return task_id, token if status in HELD else None


def test_every_status_transition_follows_the_spec_table(relay):
    relay.register("worker")
    wrong = []
    for source in SPEC_STATUSES:
        for target in SPEC_STATUSES:
            task_id, token = task_in(relay, source)
            before = task_events(relay, task_id)
            fields = {"status": target, "note": "%s to %s" % (source, target)}
            if token:
                fields["claimToken"] = token
            r = update(relay, task_id, **fields)
            if target in ALLOWED[source]:
                after = task_events(relay, task_id)
                expected_event = "released" if target == "open" else "status"
                if (r.status != 200 or r.json["status"] != target or len(after) != len(before) + 1
                        or after[-1]["type"] != expected_event or after[-1]["data"]["from"] != source):
                    wrong.append((source, target, r.status, r.json))
                elif target == "open" and r.json["claimedBy"] is not None:
                    wrong.append((source, target, "still claimed", r.json))
            else:
                expected = (409, "invalid_transition", source, target)
                got = (r.status, r.json.get("code"), r.json.get("from"), r.json.get("to"))
                if got != expected:
                    wrong.append((source, target, got))
                elif task_events(relay, task_id) != before or get_task(relay, task_id)["status"] != source:
                    wrong.append((source, target, "a refused transition changed the task"))
    assert wrong == []


def test_releasing_a_task_reopens_its_message_for_others(ops):
    ops.register("ops-bot-2", capabilities=["ops"])
    task = alarm(ops).json["task"]
    token = claim_token(ops, task["id"], "ops-bot")
    r = update(ops, task["id"], claimToken=token, status="open", note="not mine")
    assert r.status == 200 and (r.json["status"], r.json["claimedBy"]) == ("open", None)
    assert "claimToken" not in r.json
    message = ops.call("GET", "/api/messages/%d" % task["messageId"]).json
    assert message["claimedBy"] is None
    assert task["messageId"] in [m["id"] for m in ops.inbox("ops-bot-2")]
    assert claim(ops, task["id"], "ops-bot-2").status == 200


# ---------------------------------------------------------------------------
# Leases and fencing (SPEC 6.3)


def test_a_claim_is_a_lease_renewed_by_updates_and_expiring_back_to_open(ops, clock):
    ops.register("ops-bot-2", capabilities=["ops"])
    task = alarm(ops).json["task"]
    stream = ops.events("/api/events?types=task.updated")
    try:
        r = claim(ops, task["id"], "ops-bot", leaseSeconds=30)
        assert r.status == 200
        assert r.json["claimToken"] and r.json["leaseExpiresAt"] == ms_iso(clock, 30)
        token = r.json["claimToken"]
        clock.advance(20)
        r = update(ops, task["id"], claimToken=token, progress={"pct": 50})
        assert r.status == 200 and r.json["leaseExpiresAt"] == ms_iso(clock, 30)
        clock.advance(20)  # 40 s after the claim, 20 s after the renewal
        reap(ops)
        assert get_task(ops, task["id"])["status"] == "claimed"
        clock.advance(11)
        reap(ops)
        current = get_task(ops, task["id"])
        assert (current["status"], current["claimedBy"], current["leaseExpiresAt"]) == ("open", None, None)
        assert current["expiredClaims"] == 1
        released = task_events(ops, task["id"])[-1]
        assert (released["type"], released["actor"]) == ("released", "relay")
        assert released["data"]["reason"] == "lease_expired" and released["data"]["previousHolder"] == "ops-bot"
        frames = stream.take(3)
        assert [f["data"]["status"] for f in frames] == ["claimed", "claimed", "open"]
    finally:
        stream.close()
    assert ops.call("GET", "/api/messages/%d" % task["messageId"]).json["claimedBy"] is None
    assert task["messageId"] in [m["id"] for m in ops.inbox("ops-bot-2")]

    r = claim(ops, job(ops)["id"], "ops-bot")  # no leaseSeconds: TASK_LEASE_SECONDS (600)
    assert r.json["leaseExpiresAt"] == ms_iso(clock, 600)


def test_task_lease_seconds_sets_the_default_lease(relay_factory, clock):
    relay = relay_factory(clock=clock, task_lease_seconds=45)
    relay.register("worker")
    r = claim(relay, job(relay)["id"], "worker")
    assert r.status == 200 and r.json["leaseExpiresAt"] == ms_iso(clock, 45)


def test_a_stalled_worker_cannot_overwrite_the_new_holder(ops, clock):
    ops.register("worker-2", capabilities=["ops"])
    task = alarm(ops).json["task"]
    first = claim_token(ops, task["id"], "ops-bot", leaseSeconds=30)
    clock.advance(31)
    reap(ops)
    assert get_task(ops, task["id"])["status"] == "open"
    second = claim_token(ops, task["id"], "worker-2", leaseSeconds=30)
    assert second != first
    for stale in ({"claimToken": first, "status": "done", "result": {"by": "first"}},
                  {"agentId": "ops-bot", "status": "done", "result": {"by": "first"}},
                  {"claimToken": first, "progress": {"pct": 99}},
                  {"claimToken": "ct_made-up", "status": "failed"}):
        r = update(ops, task["id"], **stale)
        assert (r.status, r.json["code"], r.json["claimedBy"]) == (409, "stale_claim", "worker-2"), (stale, r)
    r = update(ops, task["id"], claimToken=second, status="done", result={"by": "second"})
    assert r.status == 200
    r = update(ops, task["id"], claimToken=first, result={"by": "first"})
    assert (r.status, r.json["code"]) == (409, "stale_claim")
    final = get_task(ops, task["id"])
    assert (final["status"], final["claimedBy"], final["result"]) == ("done", "worker-2", {"by": "second"})
    assert not [e for e in task_events(ops, task["id"]) if (e["data"] or {}).get("result") == {"by": "first"}]


def test_an_update_that_cannot_apply_says_why(ops):
    """Refusals name the real reason: nobody holds an open task, another
    agent holds a claimed one, a finished task takes no more updates, and a
    status a task cannot reach is `invalid_transition` whoever asks."""
    ops.register("bystander", capabilities=["ops"])
    task = alarm(ops).json["task"]
    r = update(ops, task["id"], agentId="bystander", progress={"pct": 1})
    assert (r.status, r.json["code"]) == (409, "stale_claim") and "nobody holds it" in r.json["error"]
    claim_token(ops, task["id"], "ops-bot")
    r = update(ops, task["id"], agentId="bystander", status="done")
    assert (r.status, r.json["code"], r.json["claimedBy"]) == (409, "stale_claim", "ops-bot")
    assert "ops-bot holds it, not bystander" in r.json["error"]
    assert update(ops, task["id"], agentId="ops-bot", status="done").status == 200
    r = update(ops, task["id"], agentId="ops-bot", status="in_progress")
    assert (r.status, r.json["code"]) == (409, "invalid_transition")
    assert (r.json["from"], r.json["to"]) == ("done", "in_progress")
    r = update(ops, task["id"], agentId="ops-bot", note="one more thing")
    assert (r.status, r.json["code"]) == (409, "stale_claim") and "finished" in r.json["error"]
    assert "claim it" not in r.json["error"]


def test_a_task_is_claimed_only_by_an_agent_its_target_reaches(ops):
    ops.register("painter", capabilities=["paint"])
    task = alarm(ops).json["task"]  # target cap:ops
    r = claim(ops, task["id"], "painter")
    assert (r.status, r.json["code"], r.json["field"]) == (403, "not_a_recipient", "agentId")
    assert get_task(ops, task["id"])["status"] == "open"
    r = ops.call("POST", "/api/messages/%d/claim" % task["messageId"], {"agentId": "painter"})
    assert (r.status, r.json["code"]) == (403, "not_a_recipient")
    assert claim(ops, task["id"], "ops-bot").status == 200


    task = alarm(ops).json["task"]
    first = claim_token(ops, task["id"], "ops-bot")
    assert update(ops, task["id"], claimToken=first, status="open").status == 200
    second = claim_token(ops, task["id"], "ops-bot")
    assert second != first
    r = update(ops, task["id"], claimToken=first, progress={"pct": 1})
    assert (r.status, r.json["code"]) == (409, "stale_claim")
    assert update(ops, task["id"], claimToken=second, progress={"pct": 2}).status == 200


def test_after_max_attempts_expired_claims_the_task_fails(relay_factory, clock):
    relay = relay_factory(clock=clock, task_max_attempts=2)
    relay.register("worker")
    task = job(relay, title="flaky migration")
    claim_token(relay, task["id"], "worker", leaseSeconds=10)
    clock.advance(11)
    reap(relay)
    current = get_task(relay, task["id"])
    assert (current["status"], current["expiredClaims"]) == ("open", 1)
    claim_token(relay, task["id"], "worker", leaseSeconds=10)
    clock.advance(11)
    reap(relay)
    current = get_task(relay, task["id"])
    assert (current["status"], current["failReason"], current["expiredClaims"]) == ("failed", "max_attempts", 2)
    assert task_ids(relay, "?status=failed") == [task["id"]]
    assert task_ids(relay, "?status=active") == []
    assert relay.call("GET", "/api/stats").json["tasks"]["failed"] == 1
    last = task_events(relay, task["id"])[-1]
    assert last["type"] == "status" and last["data"]["to"] == "failed" and last["data"]["reason"] == "max_attempts"
    r = claim(relay, task["id"], "worker")
    assert (r.status, r.json["code"], r.json["from"], r.json["to"]) == (409, "invalid_transition", "failed", "claimed")


def test_tasks_held_by_an_agent_that_went_offline_return_to_open(ops, clock):
    task = alarm(ops).json["task"]
    claim_token(ops, task["id"], "ops-bot")  # the default lease (600 s) outlives what follows
    clock.advance(121)  # past STALE_TTL_MS
    ops.register("ops-bot-2", capabilities=["ops"])
    reap(ops)
    assert ops.call("GET", "/api/agents/ops-bot").json["status"] == "offline"
    current = get_task(ops, task["id"])
    assert (current["status"], current["claimedBy"]) == ("open", None)
    released = task_events(ops, task["id"])[-1]
    assert released["type"] == "released" and released["data"]["reason"] == "agent_offline"
    assert released["data"]["previousHolder"] == "ops-bot"
    assert ops.call("GET", "/api/messages/%d" % task["messageId"]).json["claimedBy"] is None
    assert claim(ops, task["id"], "ops-bot-2").status == 200


# ---------------------------------------------------------------------------
# Callbacks (SPEC 6.4)


def callback_relay(relay_factory, receiver, secret=WHSEC, **settings):
    relay = relay_factory(integrations=configured(integration(
        targets=["cap:ops"], callbackUrl=receiver.url, **({"callbackSecret": secret} if secret else {}))), **settings)
    relay.register("ops-bot", capabilities=["ops"])
    return relay


@pytest.mark.parametrize("secret", [WHSEC, "a plain shared secret", None], ids=["whsec", "plain", "unsigned"])
def test_callbacks_are_signed_and_arrive_in_order(relay_factory, receiver, secret):
    relay = callback_relay(relay_factory, receiver, secret)
    task = alarm(relay, dedupeKey="k").json["task"]
    token = claim_token(relay, task["id"], "ops-bot")
    assert update(relay, task["id"], claimToken=token, status="in_progress").status == 200
    assert alarm(relay, dedupeKey="k", status="resolved").json["action"] == "resolved"
    deliveries = wait_until(lambda: receiver.ok() if len(receiver.ok()) >= 4 else None)
    assert [d.event for d in deliveries] == ["task.created", "task.claimed", "task.status", "task.resolved"]
    assert [d.payload["task"]["status"] for d in deliveries] == ["open", "claimed", "in_progress", "done"]
    assert len({d.webhook_id for d in deliveries}) == 4
    for d in deliveries:
        assert (d.method, d.path) == ("POST", "/hook")
        assert d.headers["content-type"].startswith("application/json")
        assert d.payload["event"] == d.event and d.payload["task"]["id"] == task["id"]
        assert d.payload["occurredAt"].endswith("Z")
        assert d.webhook_id and abs(int(d.headers["webhook-timestamp"]) - time.time()) < 60
        if secret is None:
            assert "webhook-signature" not in d.headers
        else:
            assert signature_ok(secret, d), d.headers
            assert secret not in d.body.decode()
        assert token not in d.body.decode()
    assert "callback_failed" not in [e["type"] for e in task_events(relay, task["id"])]


def test_a_failed_callback_is_retried_with_the_same_webhook_id_and_order_kept(relay_factory, receiver):
    receiver.script = [500, 500]
    relay = callback_relay(relay_factory, receiver, callback_retry_base_ms=20)
    task = alarm(relay).json["task"]
    claim_token(relay, task["id"], "ops-bot")
    wait_until(lambda: len(receiver.ok()) >= 2)
    attempts = receiver.all()
    assert [(d.event, d.status) for d in attempts] == [("task.created", 500), ("task.created", 500),
                                                       ("task.created", 200), ("task.claimed", 200)]
    assert len({d.webhook_id for d in attempts[:3]}) == 1 and attempts[3].webhook_id != attempts[0].webhook_id
    assert all(signature_ok(WHSEC, d) for d in attempts)
    assert "callback_failed" not in [e["type"] for e in task_events(relay, task["id"])]


def test_callback_failed_is_recorded_after_the_last_attempt(relay_factory, receiver):
    receiver.status = 500
    relay = callback_relay(relay_factory, receiver, callback_retry_base_ms=20, callback_max_attempts=3)
    task = alarm(relay).json["task"]
    failed = wait_until(lambda: [e for e in task_events(relay, task["id"]) if e["type"] == "callback_failed"])
    assert len(failed) == 1
    assert failed[0]["data"]["event"] == "task.created" and failed[0]["data"]["attempts"] == 3
    assert "500" in failed[0]["data"]["error"]
    assert [(d.event, d.status) for d in receiver.all()] == [("task.created", 500)] * 3
    assert failed[0]["data"]["webhookId"] == receiver.all()[0].webhook_id
    receiver.status = 200  # the next callbacks of the task flow again
    claim_token(relay, task["id"], "ops-bot")
    wait_until(lambda: receiver.ok())
    assert [d.event for d in receiver.ok()] == ["task.claimed"]


def test_a_redirect_is_not_followed(relay_factory, receiver):
    receiver.status = 302
    relay = callback_relay(relay_factory, receiver, callback_retry_base_ms=20, callback_max_attempts=2)
    task = alarm(relay).json["task"]
    failed = wait_until(lambda: [e for e in task_events(relay, task["id"]) if e["type"] == "callback_failed"])
    assert "302" in failed[0]["data"]["error"]
    assert [(d.path, d.status) for d in receiver.all()] == [("/hook", 302)] * 2  # never /moved


def test_requests_never_wait_for_a_callback(relay_factory, receiver):
    receiver.release.clear()  # the receiver hangs until the test lets it answer
    relay = callback_relay(relay_factory, receiver)
    try:
        first = alarm(relay, dedupeKey="a")
        assert first.status == 201
        assert receiver.entered.wait(5)  # the relay is now stuck delivering the first callback
        second = alarm(relay, dedupeKey="b")
        claimed = claim(relay, first.json["task"]["id"], "ops-bot")
        assert (second.status, claimed.status) == (201, 200)
        assert receiver.all() == []  # both answers arrived while the receiver was still blocked
    finally:
        receiver.release.set()
    wait_until(lambda: len(receiver.ok()) >= 3)
    assert sorted(d.event for d in receiver.ok()) == ["task.claimed", "task.created", "task.created"]


def test_pending_callbacks_are_delivered_after_a_crash_and_restart(spawn_relay, receiver, tmp_path):
    receiver.status = 503
    db_path = str(tmp_path / "outbox.db")
    env = {"AGENT_RELAY_INTEGRATIONS": configured(integration(callbackUrl=receiver.url, callbackSecret=WHSEC)),
           "CALLBACK_RETRY_BASE_MS": "20", "CALLBACK_MAX_ATTEMPTS": "100"}
    first = spawn_relay(env=env, db_path=db_path)
    assert first.url, first.first_line
    client = client_for(first)
    created = [alarm(client, dedupeKey="k%d" % i).json["task"]["id"] for i in range(3)]
    wait_until(lambda: {d.task_id for d in receiver.all()} == set(created))  # each tried and refused
    first.stop(signal.SIGKILL)
    refused = {d.task_id: d.webhook_id for d in receiver.all()}
    receiver.status = 200

    second = spawn_relay(env=env, db_path=db_path)
    assert second.url, second.first_line
    delivered = wait_until(lambda: receiver.ok() if {d.task_id for d in receiver.ok()} == set(created) else None)
    for d in delivered:
        assert d.event == "task.created" and signature_ok(WHSEC, d)
        assert d.webhook_id == refused[d.task_id]  # the same delivery, retried across the restart
    assert second.stop() == 0


# ---------------------------------------------------------------------------
# Integrations and channels (SPEC 6.1)


def test_list_integrations_shows_configured_and_observed_sources(relay_factory, clock):
    relay = relay_factory(clock=clock, token=ADMIN_TOKEN, integrations=configured(
        integration(targets=["cap:ops"], channels=["alerts"], callbackUrl="http://127.0.0.1:9/hook",
                    callbackSecret=WHSEC),
        integration("ci", CI_TOKEN, ["tasks:create"])))
    relay.register("ops-bot", capabilities=["ops"])
    alarm(relay, dedupeKey="x")
    clock.advance(1)
    alarm(relay, dedupeKey="x")
    alarm(relay, dedupeKey="y")
    clock.advance(1)
    assert alarm(relay, dedupeKey="y", status="resolved").json["action"] == "resolved"
    last_ops_event = ms_iso(clock)
    clock.advance(1)
    ingest(relay, type="alarm", title="disk full", source="nagios")

    for token in (ADMIN_TOKEN, OPS_TOKEN):
        r = relay.call("GET", "/api/integrations", token=token)
        assert r.status == 200
        found = {i["name"]: i for i in r.json["integrations"]}
        assert set(found) == {"ops-monitor", "ci", "nagios"}
        assert found["ops-monitor"] == {
            "name": "ops-monitor", "configured": True, "scopes": ["tasks:create", "tasks:read", "tasks:write"],
            "targets": ["cap:ops"], "channels": ["alerts"], "callbackUrl": "http://127.0.0.1:9/hook",
            "eventCount": 4, "lastEventAt": last_ops_event, "openTasks": 1}
        assert found["ci"] == {"name": "ci", "configured": True, "scopes": ["tasks:create"], "targets": [],
                               "channels": [], "callbackUrl": None, "eventCount": 0, "lastEventAt": None,
                               "openTasks": 0}
        assert found["nagios"]["configured"] is False and found["nagios"]["eventCount"] == 1
        assert found["nagios"]["openTasks"] == 1 and found["nagios"]["lastEventAt"] == ms_iso(clock)
        for secret in (ADMIN_TOKEN, OPS_TOKEN, CI_TOKEN, WHSEC, WHSEC[len("whsec_"):]):
            assert secret not in r.raw.decode()


def test_list_channels_gathers_topics_from_agents_messages_and_integrations(relay_factory):
    relay = relay_factory(integrations=configured(integration(channels=["incidents"])))
    relay.register("a", channels=["builds", "Alerts"])
    relay.register("b", channels=["builds"])
    relay.register("c")
    relay.send("c", "broadcast", channel="deploys")
    relay.send("c", "channel:releases")
    r = relay.call("GET", "/api/channels")
    assert r.status == 200
    channels = r.json["channels"]
    names = [c["name"].lower() for c in channels]
    assert sorted(names) == ["alerts", "builds", "deploys", "incidents", "releases"]
    by_name = {c["name"].lower(): c for c in channels}
    assert all(c["kind"] == "topic" for c in channels)
    assert by_name["builds"]["subscribers"] == 2 and by_name["alerts"]["subscribers"] == 1
    assert by_name["deploys"]["subscribers"] == 0


# ---------------------------------------------------------------------------
# The worked example (examples/ops-alert.sh and examples/callback_receiver.py)


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("curl")), reason="the example needs bash and curl")
def test_the_ops_alert_example_runs_end_to_end_with_the_example_receiver(spawn_relay, tmp_path):
    port = free_port()
    hook = "http://127.0.0.1:%d/" % port
    log_path = tmp_path / "receiver.log"
    with open(str(log_path), "w") as log_file:
        receiver = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "callback_receiver.py"), "--port",
                                     str(port), "--secret", WHSEC], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "listening" in log_path.read_text())
        relay = spawn_relay(env={"AGENT_RELAY_INTEGRATIONS": configured(integration(
            scopes=["tasks:create", "tasks:read"], targets=["cap:ops"], channels=["alerts"], callbackUrl=hook,
            callbackSecret=WHSEC))})
        assert relay.url, relay.first_line
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
        env.update(AGENT_RELAY_URL=relay.url, OPS_TOKEN=OPS_TOKEN, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        script = subprocess.run(["bash", os.path.join(EXAMPLES, "ops-alert.sh")], env=env, timeout=60,
                                capture_output=True, text=True)
        assert script.returncode == 0, script.stderr
        for line in ("created: task 1 for cap:ops", "deduped: occurrenceCount 2",
                     "[msg:1] task 1 from ops-monitor: prod-api 5xx rate high", "claimed by ops-bot until",
                     "in_progress: rolling back deploy 4512", "resolved: task 1 is done"):
            assert line in script.stdout, script.stdout
        history = [line.split()[1] for line in script.stdout.split("== the task's history")[1].splitlines()[1:]]
        assert history == ["created", "occurrence", "claimed", "status", "resolved"]

        def events_printed():
            lines = [line for line in log_path.read_text().splitlines() if line.startswith("[task.")]
            return lines if len(lines) >= 4 else None
        printed = wait_until(events_printed)
        assert [line.split("]")[0][1:] for line in printed] == ["task.created", "task.claimed", "task.status",
                                                                "task.resolved"]
        assert "REJECTED" not in log_path.read_text()

        forged = urllib.request.Request(hook, data=b"{}", method="POST", headers={
            "Content-Type": "application/json", "webhook-id": "msg_forged",
            "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,bm90IGEgc2lnbmF0dXJl"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(forged, timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        wait_until(lambda: "REJECTED msg_forged: signature does not match" in log_path.read_text())
        assert relay.stop() == 0
    finally:
        receiver.terminate()
        receiver.wait(10)
