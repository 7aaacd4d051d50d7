"""Tests for the core relay: agents, messages, claims, auth and transport.

Every test talks to a real relay over real HTTP on a loopback port (see
conftest.py). Live events and the reaper are in tests/test_events.py.
"""

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest

import agent_relay
from conftest import wait_until

# ---------------------------------------------------------------------------
# Starting and stopping
# ---------------------------------------------------------------------------


def test_default_start_prints_where_it_listens_and_stops_on_sigterm(spawn_relay, tmp_path):
    relay = spawn_relay()
    assert relay.first_line.startswith("Agent Relay %s listening on http://127.0.0.1:" % agent_relay.__version__)
    assert "(dashboard: %s/)" % relay.url in relay.first_line
    conn = http.client.HTTPConnection(relay.url[len("http://"):], timeout=5)
    conn.request("GET", "/api/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"
    conn.close()
    assert relay.stop(signal.SIGTERM) == 0
    assert "Traceback" not in relay.stderr


def test_defaults_are_port_4850_and_agent_relay_db_in_the_working_directory(tmp_path):
    settings = agent_relay.Settings.load({}, environ={})
    assert (settings.host, settings.port, settings.db_path) == ("127.0.0.1", 4850, "agent-relay.db")


def test_ctrl_c_stops_cleanly_and_the_database_is_closed(spawn_relay, tmp_path):
    db = tmp_path / "clean.db"
    relay = spawn_relay("--db-path", str(db))
    assert relay.url
    assert relay.stop(signal.SIGINT) == 0
    # Closed cleanly: the lock is released, so a new relay can use the same file.
    again = spawn_relay("--db-path", str(db))
    assert again.url, again.first_line
    assert again.stop() == 0


@pytest.mark.parametrize("args,env,expected", [
    (("--port", "abc"), {}, "--port must be a whole number, got 'abc'"),
    ((), {"PORT": "abc"}, "PORT must be a whole number, got 'abc'"),
    ((), {"PORT": "99999"}, "PORT must be between 0 and 65535"),
    (("--stale-ttl-ms", "-5"), {}, "--stale-ttl-ms must be greater than 0"),
    (("--durability", "sometimes"), {}, "--durability must be one of normal, full"),
    (("--no-such-flag",), {}, "unrecognized arguments: --no-such-flag"),
    pytest.param(("--db-path", "/nonexistent-dir/sub/relay.db"), {}, "cannot use DB_PATH",
                 marks=pytest.mark.sqlite_only("a DB_PATH is not used on PostgreSQL")),
    (("--host", "0.0.0.0"), {}, "refusing to listen on 0.0.0.0 without AGENT_RELAY_TOKEN"),
])
def test_bad_configuration_refuses_to_start_with_one_line_and_exit_2(spawn_relay, args, env, expected):
    relay = spawn_relay(*args, env=env)
    assert relay.stop() == 2
    lines = relay.stderr.strip().splitlines()
    assert len(lines) == 1, relay.stderr
    assert expected in lines[0]


def test_non_loopback_bind_is_allowed_with_allow_unauth(spawn_relay):
    relay = spawn_relay("--host", "0.0.0.0", env={"AGENT_RELAY_ALLOW_UNAUTH": "1"})
    assert relay.url and relay.url.startswith("http://0.0.0.0:")
    assert relay.stop() == 0


def test_non_loopback_bind_is_allowed_with_a_token(spawn_relay):
    relay = spawn_relay("--host", "0.0.0.0", env={"AGENT_RELAY_TOKEN": "s3cret"})
    assert relay.url
    assert relay.stop() == 0


@pytest.mark.sqlite_only("the lock file is SQLite's; relays share a PostgreSQL database")
def test_a_second_relay_on_the_same_database_refuses_naming_the_first_pid(spawn_relay, tmp_path):
    db = str(tmp_path / "shared.db")
    first = spawn_relay("--db-path", db)
    assert first.url
    second = spawn_relay("--db-path", db)
    assert second.stop() == 2
    assert "another relay (pid %d) is already using" % first.proc.pid in second.stderr
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_flags_win_over_the_environment():
    settings = agent_relay.Settings.load({"port": "5000"}, environ={"PORT": "6000", "HOST": "localhost"})
    assert settings.port == 5000 and settings.host == "localhost"


@pytest.mark.sqlite_only("reads SQLite's user_version and journal mode")
def test_schema_is_versioned_and_uses_wal(relay):
    conn = relay.relay.store.conn
    with relay.relay.store.lock:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(agent_relay.MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------


def test_register_creates_then_updates(relay):
    r = relay.call("POST", "/api/agents", {"id": "a1", "label": "backend fixer", "machine": "mac",
                                           "project": "p", "provider": "claude", "capabilities": ["review"],
                                           "tags": ["backend"], "channels": [], "approval": "guarded",
                                           "meta": {"k": 1}, "version": "0.1.0"})
    assert r.status == 201
    agent = r.json
    assert agent["id"] == "a1" and agent["status"] == "online" and agent["approval"] == "guarded"
    assert agent["registeredAt"].endswith("Z") and agent["lastSeenAt"] == agent["registeredAt"]
    r = relay.call("POST", "/api/agents", {"id": "a1", "status": "busy", "tags": ["backend", "api"]})
    assert r.status == 200
    assert r.json["status"] == "busy" and r.json["tags"] == ["backend", "api"]
    assert r.json["label"] == "backend fixer" and r.json["registeredAt"] == agent["registeredAt"]


@pytest.mark.sqlite_only("on PostgreSQL another process may change any agent: audiences are never cached")
def test_heartbeats_keep_the_cached_audiences_and_a_targeting_change_renews_them(relay):
    """Sends find their recipients in a cached list of every agent's Audience.
    A heartbeat (status, presence) leaves it as it is; a change of tags, like
    a new or deleted agent, rebuilds it before the next send."""
    relay.register("worker", tags=["backend"])
    relay.register("boss")
    assert relay.send("boss", "tag:backend")["recipients"] == ["worker"]
    store = relay.relay.store
    version = store.agents_version
    assert relay.call("POST", "/api/agents/worker/heartbeat", {"status": "busy"}).status == 200
    assert store.agents_version == version
    assert relay.send("boss", "worker")["recipients"] == ["worker"]
    assert relay.call("PATCH", "/api/agents/worker", {"tags": ["frontend"]}).status == 200
    assert store.agents_version != version
    assert relay.send("boss", "tag:backend")["recipients"] == []
    assert relay.send("boss", "tag:frontend")["recipients"] == ["worker"]
    assert relay.call("DELETE", "/api/agents/worker").status in (200, 204)
    assert relay.call("POST", "/api/messages", {"from": "boss", "to": "worker", "body": "x"}).status == 404


def test_register_without_id_derives_one_from_machine_and_project(relay):
    r = relay.call("POST", "/api/agents", {"machine": "macmini2", "project": "myproject"})
    assert r.status == 201
    assert r.json["id"].startswith("macmini2-myproject-")
    assert agent_relay.valid_agent_id(r.json["id"])


def test_list_agents_filters_combine_with_and(relay):
    relay.register("a1", tags=["Backend"], capabilities=["review"], machine="m1", label="Fixer", project="p")
    relay.register("a2", tags=["backend"], capabilities=["test"], machine="m2")
    relay.register("a3", tags=["frontend"], capabilities=["review"], machine="m1", status="busy")

    def ids(query):
        r = relay.call("GET", "/api/agents" + query)
        assert r.status == 200, r
        return sorted(a["id"] for a in r.json["agents"])
    assert ids("") == ["a1", "a2", "a3"]
    assert ids("?tag=backend") == ["a1", "a2"]
    assert ids("?tag=backend&capability=review") == ["a1"]
    assert ids("?machine=m1") == ["a1", "a3"]
    assert ids("?status=busy") == ["a3"]
    assert ids("?label=fixer") == ["a1"]
    assert ids("?project=p") == ["a1"]
    assert ids("?limit=1").__len__() == 1


def test_find_by_capability_lists_non_offline_first(relay):
    relay.register("old", capabilities=["review"], status="offline")
    relay.register("new", capabilities=["Review"])
    relay.register("other", capabilities=["test"])
    r = relay.call("GET", "/api/agents/find?capability=review")
    assert [a["id"] for a in r.json["agents"]] == ["new", "old"]
    r = relay.call("GET", "/api/agents/find")
    assert r.status == 400 and r.json["field"] == "capability"


def test_get_agent_and_unknown_agent(relay):
    relay.register("a1")
    assert relay.call("GET", "/api/agents/a1").json["id"] == "a1"
    r = relay.call("GET", "/api/agents/nobody")
    assert r.status == 404 and r.json["code"] == "unknown_agent"


def test_heartbeat_revives_an_offline_agent_and_404s_an_unknown_one(relay):
    relay.register("a1", status="offline")
    r = relay.call("POST", "/api/agents/a1/heartbeat")
    assert r.status == 200 and r.json["status"] == "online"
    r = relay.call("POST", "/api/agents/a1/heartbeat", {"status": "busy"})
    assert r.json["status"] == "busy"
    r = relay.call("POST", "/api/agents/ghost/heartbeat")
    assert r.status == 404 and r.json["code"] == "unknown_agent"


def test_label_patch_sets_and_clears(relay):
    relay.register("a1")
    r = relay.call("PATCH", "/api/agents/a1/label", {"label": "test writer"})
    assert r.status == 200 and r.json["label"] == "test writer"
    r = relay.call("PATCH", "/api/agents/a1/label", {"label": None})
    assert r.json["label"] is None
    r = relay.call("PATCH", "/api/agents/a1/label", {})
    assert r.status == 400 and r.json["field"] == "label"


def test_patch_agent_updates_only_given_fields(relay):
    relay.register("a1", label="x", tags=["t"])
    r = relay.call("PATCH", "/api/agents/a1", {"status": "idle", "channels": ["alerts"], "approval": "read-only",
                                               "capabilities": ["ops"], "meta": {"role": "ops"}})
    assert r.status == 200
    assert (r.json["status"], r.json["channels"], r.json["approval"]) == ("idle", ["alerts"], "read-only")
    assert r.json["label"] == "x" and r.json["tags"] == ["t"] and r.json["meta"] == {"role": "ops"}


def test_delete_agent(relay):
    relay.register("a1")
    r = relay.call("DELETE", "/api/agents/a1")
    assert r.status == 200 and r.json == {"deleted": True}
    assert relay.call("GET", "/api/agents/a1").status == 404
    assert relay.call("DELETE", "/api/agents/a1").status == 404


@pytest.mark.parametrize("body,field", [
    ({"id": "has space"}, "id"),
    ({"id": "tag:backend"}, "id"),
    ({"id": "broadcast"}, "id"),
    ({"id": "x" * 201}, "id"),
    ({"id": 5}, "id"),
    ({"id": "a", "label": "x" * 201}, "label"),
    ({"id": "a", "tags": "backend"}, "tags"),
    ({"id": "a", "tags": ["has space"]}, "tags"),
    ({"id": "a", "capabilities": [1]}, "capabilities"),
    ({"id": "a", "channels": ["a,b"]}, "channels"),
    ({"id": "a", "status": "sleeping"}, "status"),
    ({"id": "a", "approval": "yolo"}, "approval"),
    ({"id": "a", "meta": []}, "meta"),
    ({"id": "a", "machine": ""}, "machine"),
])
def test_bad_agent_fields_are_400_naming_the_field_and_change_nothing(relay, body, field):
    relay.register("existing", tags=["x"])
    before = relay.snapshot()
    r = relay.call("POST", "/api/agents", body)
    assert r.status == 400, r
    assert r.json["field"] == field and r.json["code"] and r.json["error"]
    if field in ("label", "tags", "capabilities", "channels", "status", "approval", "meta"):
        r = relay.call("PATCH", "/api/agents/existing", {field: body[field]})
        assert r.status == 400 and r.json["field"] == field
    assert relay.snapshot() == before


# ---------------------------------------------------------------------------
# Messages: sending and targets
# ---------------------------------------------------------------------------


@pytest.fixture
def team(relay):
    """A sender and agents with tags, capabilities, labels, machines, channels."""
    relay.register("sender")
    relay.register("alice", tags=["backend"], capabilities=["review"], label="Backend Fixer", machine="mac1")
    relay.register("bob", tags=["frontend"], capabilities=["review", "test"], machine="mac2", channels=["alerts"])
    relay.register("carol", tags=["backend"], machine="mac2", channels=["deploys"])
    return relay


def recipients_of(relay, to, **fields):
    message = relay.send("sender", to, **fields)
    seen = sorted(a for a in ("sender", "alice", "bob", "carol")
                  if message["id"] in [m["id"] for m in relay.inbox(a)])
    assert seen == sorted(message["recipients"])
    return seen


@pytest.mark.parametrize("to,expected", [
    ("alice", ["alice"]),
    ("id:alice", ["alice"]),
    ("tag:backend", ["alice", "carol"]),
    ("tag:BACKEND", ["alice", "carol"]),
    ("cap:review", ["alice", "bob"]),
    ("label:backend fixer", ["alice"]),
    ("machine:mac2", ["bob", "carol"]),
    ("channel:alerts", ["alice", "bob"]),
    ("broadcast", ["alice", "bob", "carol"]),
])
def test_every_target_reaches_exactly_its_agents(team, to, expected):
    assert recipients_of(team, to) == expected


def test_channel_filter_applies_to_channelled_messages_only(team):
    assert recipients_of(team, "broadcast", channel="alerts") == ["alice", "bob"]
    assert recipients_of(team, "carol", channel="alerts") == []  # carol only follows deploys
    assert recipients_of(team, "carol") == ["carol"]  # unchannelled direct work still arrives
    assert recipients_of(team, "tag:backend", channel="deploys") == ["alice", "carol"]


def test_channel_target_sets_the_message_channel(team):
    message = team.send("sender", "channel:alerts")
    assert message["channel"] == "alerts"


def test_sender_never_receives_its_own_group_message(team):
    message = team.send("alice", "tag:backend")
    assert message["recipients"] == ["carol"]
    assert message["id"] not in [m["id"] for m in team.inbox("alice")]


def test_late_joiner_sees_new_group_messages_and_open_claimable_work_only(team):
    old = team.send("sender", "tag:backend", body="before you joined")
    work = team.send("sender", "tag:backend", body="claim me", claimable=True)
    taken = team.send("sender", "tag:backend", body="claimed already", claimable=True)
    assert team.call("POST", "/api/messages/%d/claim" % taken["id"], {"agentId": "alice"}).status == 200
    team.register("dave", tags=["backend"])
    new = team.send("sender", "tag:backend", body="after you joined")
    seen = [m["id"] for m in team.inbox("dave")]
    assert seen == [work["id"], new["id"]]
    assert old["id"] not in seen and taken["id"] not in seen


def test_offline_agents_still_receive_direct_messages(team):
    team.call("PATCH", "/api/agents/alice", {"status": "offline"})
    message = team.send("sender", "alice")
    assert [m["id"] for m in team.inbox("alice")] == [message["id"]]


def test_send_to_an_unknown_agent_is_404_and_stores_nothing(team):
    before = team.snapshot()
    r = team.call("POST", "/api/messages", {"from": "sender", "to": "nobody", "body": "x"})
    assert r.status == 404 and r.json["code"] == "unknown_agent" and r.json["field"] == "to"
    assert team.snapshot() == before


@pytest.mark.parametrize("body,field", [
    ({"to": "alice", "body": "x"}, "from"),
    ({"from": "sender", "body": "x"}, "to"),
    ({"from": "sender", "to": "alice"}, "body"),
    ({"from": "sender", "to": "alice", "body": ""}, "body"),
    ({"from": "sender", "to": "alice", "body": "   "}, "body"),
    ({"from": "sender", "to": "alice", "body": "x" * 65537}, "body"),
    ({"from": "sender", "to": "alice", "body": 42}, "body"),
    ({"from": "x" * 201, "to": "alice", "body": "x"}, "from"),
    ({"from": "sender", "to": "alice", "body": "x", "subject": "s" * 201}, "subject"),
    ({"from": "sender", "to": "alice", "body": "x", "claimable": "yes"}, "claimable"),
    ({"from": "sender", "to": "alice", "body": "x", "replyTo": "1"}, "replyTo"),
    ({"from": "sender", "to": "alice", "body": "x", "meta": "m"}, "meta"),
    ({"from": "sender", "to": "tag:", "body": "x"}, "to"),
    ({"from": "sender", "to": "alice", "body": "x", "ttlSeconds": 0}, "ttlSeconds"),
    ({"from": "sender", "to": "alice", "body": "x", "ttlSeconds": True}, "ttlSeconds"),
    ({"from": "sender", "to": "tag:backend", "body": "x", "ackBy": 5}, "ackBy"),
    ({"from": "sender", "to": "alice", "body": "x", "channel": 3}, "channel"),
    # A channel is one word, as agents subscribe to them; a sender is an agent id.
    ({"from": "sender", "to": "alice", "body": "x", "channel": "a b"}, "channel"),
    ({"from": "sender", "to": "alice", "body": "x", "channel": "a,b"}, "channel"),
    ({"from": "sender", "to": "channel:a b", "body": "x"}, "to"),
    ({"from": "a sender", "to": "alice", "body": "x"}, "from"),
    ({"from": "broadcast", "to": "alice", "body": "x"}, "from"),
])
def test_bad_message_fields_are_400_naming_the_field_and_change_nothing(team, body, field):
    before = team.snapshot()
    r = team.call("POST", "/api/messages", body)
    assert r.status == 400, r
    assert r.json["field"] == field
    assert team.snapshot() == before


def test_a_body_of_exactly_the_limit_is_accepted(team):
    assert len(team.send("sender", "alice", body="x" * 65536)["body"]) == 65536


def test_unknown_json_fields_are_ignored(team):
    r = team.call("POST", "/api/messages", {"from": "sender", "to": "alice", "body": "x", "colour": "blue"})
    assert r.status == 201 and "colour" not in r.json


# ---------------------------------------------------------------------------
# Messages: reading
# ---------------------------------------------------------------------------


def test_read_state_is_per_agent(team):
    message = team.send("sender", "tag:backend")
    r = team.call("PATCH", "/api/messages/%d" % message["id"], {"agentId": "alice", "read": True})
    assert r.status == 200 and r.json["read"] is True
    assert team.inbox("alice", unread="true") == []
    assert [m["id"] for m in team.inbox("carol", unread="true")] == [message["id"]]
    assert team.inbox("alice")[0]["read"] is True and team.inbox("carol")[0]["read"] is False
    r = team.call("PATCH", "/api/messages/%d" % message["id"], {"agentId": "alice", "read": False})
    assert r.json["read"] is False
    assert len(team.inbox("alice", unread="true")) == 1


def test_bulk_mark_read_by_ids_and_up_to(team):
    ids = [team.send("sender", "alice", body=str(i))["id"] for i in range(5)]
    r = team.call("POST", "/api/messages/read", {"agentId": "alice", "ids": ids[:2] + [99999]})
    assert r.status == 200 and r.json == {"marked": 2}
    r = team.call("POST", "/api/messages/read", {"agentId": "alice", "ids": ids[:2]})
    assert r.json == {"marked": 0}
    r = team.call("POST", "/api/messages/read", {"agentId": "alice", "upTo": ids[3]})
    assert r.json == {"marked": 2}
    assert [m["id"] for m in team.inbox("alice", unread="true")] == [ids[4]]


@pytest.mark.parametrize("body,field", [
    ({"ids": [1]}, "agentId"),
    ({"agentId": "alice"}, "ids"),
    ({"agentId": "alice", "ids": [1], "upTo": 3}, "ids"),
    ({"agentId": "alice", "ids": "1"}, "ids"),
    ({"agentId": "alice", "ids": [True]}, "ids"),
    ({"agentId": "alice", "upTo": "3"}, "upTo"),
])
def test_bad_bulk_read_is_400(team, body, field):
    team.send("sender", "alice")
    before = team.snapshot()
    r = team.call("POST", "/api/messages/read", body)
    assert r.status == 400 and r.json["field"] == field
    assert team.snapshot() == before


def test_patch_read_needs_a_known_agent_and_a_boolean(team):
    message = team.send("sender", "alice")
    path = "/api/messages/%d" % message["id"]
    assert team.call("PATCH", path, {"agentId": "alice"}).json["field"] == "read"
    assert team.call("PATCH", path, {"agentId": "alice", "read": "yes"}).json["field"] == "read"
    r = team.call("PATCH", path, {"agentId": "ghost", "read": True})
    assert r.status == 404 and r.json["code"] == "unknown_agent"
    assert team.call("PATCH", "/api/messages/999", {"agentId": "alice", "read": True}).status == 404


def test_since_limit_and_order(team):
    ids = [team.send("sender", "alice", body=str(i))["id"] for i in range(6)]
    assert [m["id"] for m in team.inbox("alice", since=ids[2])] == ids[3:]
    assert [m["id"] for m in team.inbox("alice", limit=2)] == ids[:2]
    assert [m["id"] for m in team.inbox("alice", order="desc", limit=2)] == [ids[5], ids[4]]
    everything = team.call("GET", "/api/messages?order=desc&limit=3").json["messages"]
    assert [m["id"] for m in everything] == [ids[5], ids[4], ids[3]]
    assert "read" not in everything[0]


@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=x", "limit"), ("limit=1e3", "limit"), ("order=up", "order"),
    ("since=-1", "since"), ("unread=maybe", "unread"), ("wait=61&for=alice", "wait"), ("wait=5", "wait"),
])
def test_bad_query_parameters_are_400(team, query, field):
    r = team.call("GET", "/api/messages?" + query)
    assert r.status == 400 and r.json["field"] == field


def test_a_limit_over_1000_is_capped_not_refused(team):
    """SPEC 1: `limit` defaults to 100 and is capped at 1000."""
    for n in range(1002):
        team.call("POST", "/api/messages", {"from": "sender", "to": "alice", "body": "m%d" % n})
    assert len(team.call("GET", "/api/messages").json["messages"]) == 100
    for query in ("limit=1001", "limit=5000", "limit=99999999999"):
        r = team.call("GET", "/api/messages?" + query)
        assert r.status == 200 and len(r.json["messages"]) == 1000, query


def test_inbox_for_an_unknown_agent_is_404(team):
    r = team.call("GET", "/api/messages?for=ghost")
    assert r.status == 404 and r.json["code"] == "unknown_agent"


def test_channel_query_filters_the_inbox(team):
    team.send("sender", "alice", channel="alerts")
    plain = team.send("sender", "alice")
    assert [m["channel"] for m in team.inbox("alice", channel="alerts")] == ["alerts"]
    assert plain["id"] in [m["id"] for m in team.inbox("alice")]


def test_cursor_is_the_latest_message_id(relay):
    assert relay.call("GET", "/api/messages/cursor").json == {"cursor": 0}
    relay.register("a")
    message = relay.send("x", "a")
    assert relay.call("GET", "/api/messages/cursor").json == {"cursor": message["id"]}


def test_get_one_message_with_and_without_for(team):
    message = team.send("sender", "alice")
    r = team.call("GET", "/api/messages/%d" % message["id"])
    assert r.status == 200 and r.json["body"] == "hi" and "read" not in r.json
    r = team.call("GET", "/api/messages/%d?for=alice" % message["id"])
    assert r.json["read"] is False
    assert team.call("GET", "/api/messages/424242").status == 404
    assert team.call("GET", "/api/messages/abc").status == 404


def test_threads_follow_reply_to(team):
    root = team.send("sender", "alice", body="root")
    reply = team.send("alice", "sender", body="reply", replyTo=root["id"])
    nested = team.send("sender", "alice", body="nested", replyTo=reply["id"])
    assert reply["threadId"] == root["id"] == nested["threadId"]
    for message in (root, reply, nested):
        r = team.call("GET", "/api/messages/%d/thread" % message["id"])
        assert [m["body"] for m in r.json["messages"]] == ["root", "reply", "nested"]


def test_delete_message(team):
    message = team.send("sender", "alice")
    assert team.call("DELETE", "/api/messages/%d" % message["id"]).json == {"deleted": True}
    assert team.inbox("alice") == []
    assert team.call("DELETE", "/api/messages/%d" % message["id"]).status == 404


def test_ttl_messages_expire_from_inboxes_and_refuse_claims(relay_factory, clock):
    relay = relay_factory(clock=clock)
    relay.register("a")
    message = relay.send("x", "a", body="soon gone", ttlSeconds=60, claimable=True)
    assert message["expiresAt"] is not None
    assert [m["id"] for m in relay.inbox("a")] == [message["id"]]
    clock.advance(61)
    assert relay.inbox("a") == []
    r = relay.call("POST", "/api/messages/%d/claim" % message["id"], {"agentId": "a"})
    assert r.status == 410 and r.json["code"] == "expired"


# ---------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------


def test_claim_then_conflict_then_same_agent_again(team):
    message = team.send("sender", "cap:review", claimable=True)
    path = "/api/messages/%d/claim" % message["id"]
    r = team.call("POST", path, {"agentId": "alice"})
    assert r.status == 200 and r.json["claimedBy"] == "alice" and r.json["claimedAt"]
    r = team.call("POST", path, {"agentId": "bob"})
    assert r.status == 409 and r.json["code"] == "already_claimed" and r.json["claimedBy"] == "alice"
    assert team.call("POST", path, {"agentId": "alice"}).status == 200


def test_only_agents_the_work_reaches_or_its_sender_may_claim_it(team):
    """A claimable message to cap:review is for alice and bob: carol (no such
    capability) gets 403 not_a_recipient and nothing changes; a direct one to
    alice is hers alone; the sender may take its own request back."""
    group = team.send("sender", "cap:review", claimable=True)
    direct = team.send("sender", "alice", claimable=True)
    on_channel = team.send("sender", "tag:backend", claimable=True, channel="alerts")
    for message, bystander in ((group, "carol"), (direct, "bob"), (on_channel, "carol")):
        r = team.call("POST", "/api/messages/%d/claim" % message["id"], {"agentId": bystander})
        assert (r.status, r.json["code"], r.json["field"]) == (403, "not_a_recipient", "agentId"), (message, r)
        assert team.call("GET", "/api/messages/%d" % message["id"]).json["claimedBy"] is None
    r = team.call("POST", "/api/messages/%d/claim" % on_channel["id"], {"agentId": "ghost"})
    assert (r.status, r.json["code"]) == (404, "unknown_agent")
    assert team.call("POST", "/api/messages/%d/claim" % direct["id"], {"agentId": "alice"}).status == 200
    assert team.call("POST", "/api/messages/%d/claim" % group["id"], {"agentId": "sender"}).status == 200


def test_claiming_a_plain_message_is_400_not_claimable(team):
    message = team.send("sender", "alice")
    r = team.call("POST", "/api/messages/%d/claim" % message["id"], {"agentId": "alice"})
    assert r.status == 400 and r.json["code"] == "not_claimable" and r.json["field"]
    r = team.call("POST", "/api/messages/%d/claim" % message["id"], {})
    assert r.status == 400 and r.json["field"] == "agentId"
    assert team.call("POST", "/api/messages/999/claim", {"agentId": "alice"}).status == 404


def test_claimed_work_leaves_other_late_joiners_inboxes(team):
    work = team.send("sender", "cap:review", claimable=True)
    team.call("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "bob"})
    team.register("eve", capabilities=["review"])
    assert team.inbox("eve") == []


def test_32_racing_claimers_exactly_one_wins_repeatedly(relay):
    agents = ["racer%d" % i for i in range(32)]
    for agent in agents:
        relay.register(agent, capabilities=["work"])
    for _ in range(15):
        message = relay.send("boss", "cap:work", claimable=True)
        barrier = threading.Barrier(len(agents))
        results = {}

        def claim(agent, path="/api/messages/%d/claim" % message["id"], barrier=barrier, results=results):
            barrier.wait()
            results[agent] = relay.call("POST", path, {"agentId": agent})
        threads = [threading.Thread(target=claim, args=(a,)) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [a for a, r in results.items() if r.status == 200]
        assert len(winners) == 1, results
        losers = [r for r in results.values() if r.status != 200]
        assert all(r.status == 409 and r.json["claimedBy"] == winners[0] for r in losers)


# ---------------------------------------------------------------------------
# What agent messaging users ask for first
# ---------------------------------------------------------------------------


def test_idempotency_key_replays_the_first_response(team):
    body = {"from": "sender", "to": "alice", "body": "once"}
    first = team.call("POST", "/api/messages", body, headers={"Idempotency-Key": "k1"})
    again = team.call("POST", "/api/messages", body, headers={"Idempotency-Key": "k1"})
    assert first.status == again.status == 201
    assert first.json == again.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(team.inbox("alice")) == 1
    r = team.call("POST", "/api/messages", dict(body, body="different"), headers={"Idempotency-Key": "k1"})
    assert r.status == 409 and r.json["code"] == "idempotency_conflict"
    other = team.call("POST", "/api/messages", body, headers={"Idempotency-Key": "k2"})
    assert other.status == 201 and other.json["id"] != first.json["id"]


def test_idempotency_keys_are_per_caller(relay_factory):
    relay = relay_factory(token="admin-token")
    relay.register("a")
    body = {"from": "x", "to": "a", "body": "hi"}
    first = relay.call("POST", "/api/messages", body, headers={"Idempotency-Key": "same"})
    assert first.status == 201
    again = relay.call("POST", "/api/messages", body, headers={"Idempotency-Key": "same"})
    assert again.json["id"] == first.json["id"]


def test_a_failed_request_does_not_burn_its_idempotency_key(team):
    bad = team.call("POST", "/api/messages", {"from": "sender", "to": "ghost", "body": "x"},
                    headers={"Idempotency-Key": "retry-me"})
    assert bad.status == 404
    team.register("ghost")
    good = team.call("POST", "/api/messages", {"from": "sender", "to": "ghost", "body": "x"},
                     headers={"Idempotency-Key": "retry-me"})
    assert good.status == 201


def test_long_poll_answers_as_soon_as_a_message_arrives(team):
    sender = threading.Timer(0.3, lambda: team.send("sender", "alice", body="wake up"))
    started = time.monotonic()
    sender.start()
    try:
        messages = team.inbox("alice", wait=10)
    finally:
        sender.join()
    assert [m["body"] for m in messages] == ["wake up"]
    assert time.monotonic() - started < 5


def test_long_poll_ignores_messages_for_others_and_times_out_empty(team):
    sender = threading.Timer(0.1, lambda: team.send("sender", "bob", body="not for alice"))
    sender.start()
    started = time.monotonic()
    try:
        assert team.inbox("alice", wait=1) == []
    finally:
        sender.join()
    assert time.monotonic() - started >= 0.9


def test_long_poll_returns_at_once_when_something_is_waiting(team):
    team.send("sender", "alice")
    started = time.monotonic()
    assert len(team.inbox("alice", wait=30)) == 1
    assert time.monotonic() - started < 5


@pytest.mark.sqlite_only("on PostgreSQL other processes write too: inbox answers are never remembered")
def test_a_repeated_poll_is_answered_from_memory_until_anything_changes(relay_factory, clock):
    """The answer cache: the same inbox question within a second is answered
    from memory, but never once a row changed, a message in it expired, or
    (for a long-poll) when the answer is empty."""
    relay = relay_factory(clock=clock)
    for agent_id in ("a", "b", "c"):
        relay.register(agent_id)
    relay.send("b", "a", "first")
    relay.send("b", "a", "short-lived", ttlSeconds=2)
    query = "/api/messages?for=a&unread=true"

    def bodies():
        r = relay.call("GET", query)
        assert r.status == 200
        return [m["body"] for m in r.json["messages"]]

    assert bodies() == ["first", "short-lived"]
    before = relay.relay.store.changes()
    assert bodies() == ["first", "short-lived"]
    assert relay.relay.store.changes() == before, "a repeated poll wrote something"
    assert any(key[0] == "a" for key in relay.relay.inbox_answers), "the answer was not kept"

    relay.send("c", "a", "new")  # a write anywhere
    assert bodies() == ["first", "short-lived", "new"]
    read = relay.call("POST", "/api/messages/read", {"agentId": "a", "ids": [relay.inbox("a")[0]["id"]]})
    assert read.status == 200
    assert bodies() == ["short-lived", "new"]
    clock.advance(1.5)  # presence is written again, and the answer kept with it
    assert bodies() == ["short-lived", "new"]
    kept = relay.relay.store.changes()
    clock.advance(0.6)  # the message expired, but no row changed and presence needs no write yet
    assert bodies() == ["new"]
    assert relay.relay.store.changes() == kept

    relay.call("POST", "/api/messages/read", {"agentId": "a", "upTo": 10 ** 6})
    assert bodies() == []
    later = threading.Timer(0.3, lambda: relay.send("b", "a", "woken"))
    later.start()
    try:  # the empty answer is remembered, yet the long-poll waits for the message
        assert [m["body"] for m in relay.inbox("a", unread="true", wait=10)] == ["woken"]
    finally:
        later.join()


def test_presence_follows_any_call_naming_the_agent(relay_factory, clock):
    relay = relay_factory(clock=clock)
    relay.register("a")
    relay.register("b")
    seen = relay.call("GET", "/api/agents/a").json["lastSeenAt"]
    for call in (lambda: relay.send("a", "b"),
                 lambda: relay.inbox("a"),
                 lambda: relay.call("POST", "/api/messages/read", {"agentId": "a", "upTo": 0})):
        clock.advance(5)
        call()
        now = relay.call("GET", "/api/agents/a").json["lastSeenAt"]
        assert now > seen
        seen = now


def test_presence_is_written_at_most_once_a_second_but_offline_agents_return_at_once(relay_factory, clock):
    """lastSeenAt is kept to the second: a burst of calls writes it once. An
    agent marked offline inside that second still comes back online at once."""
    relay = relay_factory(clock=clock)
    relay.register("a")
    relay.register("b")

    def last_seen():
        return relay.call("GET", "/api/agents/a").json["lastSeenAt"]

    clock.advance(5)
    relay.send("a", "b")
    written = last_seen()
    clock.advance(0.5)
    relay.send("a", "b")
    assert last_seen() == written
    clock.advance(0.6)
    relay.send("a", "b")
    assert last_seen() > written
    relay.call("PATCH", "/api/agents/a", {"status": "offline"})
    relay.send("a", "b")
    assert relay.call("GET", "/api/agents/a").json["status"] == "online"


def test_activity_brings_an_offline_agent_back_online(team):
    team.call("PATCH", "/api/agents/alice", {"status": "offline"})
    team.send("alice", "bob")
    assert team.call("GET", "/api/agents/alice").json["status"] == "online"


# ---------------------------------------------------------------------------
# Stats and health
# ---------------------------------------------------------------------------


def test_stats_counts(team):
    work = team.send("sender", "cap:review", claimable=True)
    team.send("sender", "cap:review", claimable=True)
    team.call("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "bob"})
    team.call("PATCH", "/api/agents/carol", {"status": "busy"})
    stats = team.call("GET", "/api/stats").json
    assert stats["version"] == agent_relay.__version__
    assert stats["agents"] == {"total": 4, "online": 3, "busy": 1, "idle": 0, "offline": 0}
    assert stats["messages"] == {"total": 2, "claimable": 1, "claimed": 1, "last24h": 2}
    assert set(stats["tasks"]) == {"open", "claimed", "in_progress", "blocked", "done", "failed", "cancelled"}
    assert stats["pairs"] == {"pending": 0, "active": 0}
    assert stats["uptimeSeconds"] >= 0 and stats["dbBytes"] > 0 and stats["sseClients"] == 0


@pytest.mark.sqlite_only("reads SQLite's query plans")
def test_stats_reads_indexes_not_every_message(team):
    """/api/stats is polled by dashboards and monitors: a scan of the whole
    messages table would grow with history, holding the store lock."""
    team.send("sender", "cap:review", claimable=True)
    store = team.relay.store
    statements = []
    store.conn.set_trace_callback(statements.append)
    try:
        assert team.call("GET", "/api/stats").status == 200
    finally:
        store.conn.set_trace_callback(None)
    with store.lock:
        plans = {sql: [row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " + sql, (0,) * sql.count("?"))]
                 for sql in statements if "FROM messages" in sql}
    assert len(plans) == 4, plans
    for sql, plan in plans.items():
        assert not any(step.startswith("SCAN messages") and "COVERING INDEX" not in step
                       and "messages_open_claims" not in step for step in plan), (sql, plan)


def test_health(relay):
    assert relay.call("GET", "/api/health").json == {"status": "ok", "version": agent_relay.__version__, "db": "ok"}


# ---------------------------------------------------------------------------
# Routing and bad requests
# ---------------------------------------------------------------------------


def test_a_reply_to_a_message_that_does_not_exist_is_404_naming_the_field(relay):
    relay.register("a")
    r = relay.call("POST", "/api/messages", {"from": "a", "to": "a", "body": "x", "replyTo": 999})
    assert r.status == 404 and r.json["code"] == "unknown_message" and r.json["field"] == "replyTo"
    assert relay.call("GET", "/api/messages").json["messages"] == []


def test_unknown_route_is_404_json(relay):
    r = relay.call("GET", "/api/nothing/here")
    assert r.status == 404 and r.json["code"] == "unknown_route"
    assert relay.call("GET", "/nothing").status == 404


def test_wrong_method_is_405_with_allow(relay):
    r = relay.call("PUT", "/api/agents", {})
    assert r.status == 405 and r.json["code"] == "method_not_allowed"
    assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}
    r = relay.call("POST", "/api/messages/1", {})
    assert r.status == 405 and "PATCH" in r.headers["Allow"]


@pytest.mark.parametrize("path", ["/api/agents", "/api/messages/1", "/api/health", "/api/pairs/p1/accept", "/",
                                  "/mcp"])
def test_options_and_405_name_the_same_allowed_methods(relay, path):
    allow = relay.call("OPTIONS", path).headers["Allow"]
    wrong = relay.call("PUT", path, {})
    assert wrong.status == 405 and wrong.headers["Allow"] == allow


def test_any_other_method_is_405_with_allow_and_a_fixed_path_is_only_itself(relay):
    for method in ("TRACE", "QUERY", "PROPFIND"):
        r = relay.call(method, "/api/agents")
        assert r.status == 405 and r.json["code"] == "method_not_allowed", method
        assert r.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    relay.register("find")
    r = relay.call("DELETE", "/api/agents/find")
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert relay.call("OPTIONS", "/api/agents/find").headers["Allow"] == "GET, HEAD, OPTIONS"


def test_a_whole_number_written_as_a_float_is_a_whole_number(relay):
    relay.register("a")
    r = relay.call("POST", "/api/messages", {"from": "a", "to": "a", "body": "x", "ttlSeconds": 60.0})
    assert r.status == 201 and r.json["expiresAt"]
    assert relay.call("POST", "/api/messages/read", {"agentId": "a", "ids": [float(r.json["id"])]}).json == {
        "marked": 1}
    r = relay.call("POST", "/api/messages", {"from": "a", "to": "a", "body": "x", "ttlSeconds": 60.5})
    assert r.status == 400 and r.json["field"] == "ttlSeconds"


def test_an_event_id_beyond_the_range_is_400(relay):
    r = relay.call("GET", "/api/events?since=%d" % (2 ** 63))
    assert r.status == 400 and r.json["field"] == "since"


def test_head_answers_like_get_without_a_body(relay):
    r = relay.call("HEAD", "/api/health")
    assert r.status == 200 and r.raw == b"" and r.headers["Content-Type"].startswith("application/json")
    assert int(r.headers["Content-Length"]) == len(relay.call("GET", "/api/health").raw)
    r = relay.call("HEAD", "/api/events")
    assert r.status == 200 and r.raw == b"" and r.headers["Content-Type"].startswith("text/event-stream")
    assert relay.call("GET", "/api/stats").json["sseClients"] == 0


def test_api_answers_an_index_and_the_favicon_is_served(relay):
    r = relay.call("GET", "/api")
    assert r.status == 200 and r.json["openapi"] == "/api/openapi.json" and r.json["version"]
    assert relay.call("GET", r.json["openapi"]).status == 200
    r = relay.call("GET", "/favicon.ico")
    assert r.status == 200 and r.headers["Content-Type"] == "image/svg+xml" and r.raw.startswith(b"<svg")


def test_registering_with_no_body_is_refused_and_creates_nothing(relay):
    r = relay.call("POST", "/api/agents")
    assert r.status == 400 and r.json["code"] == "missing_field" and r.json["field"] == "body"
    assert relay.call("GET", "/api/agents").json["agents"] == []


@pytest.mark.parametrize("raw,code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'"string"', "invalid_json"),
    (b'{"id": NaN}', "invalid_json"),
    (b'{"id": "\xff\xfe"}', "invalid_utf8"),
    (b"[" * 100000, "invalid_json"),
])
def test_malformed_bodies_are_400_naming_body(relay, raw, code):
    before = relay.snapshot()
    r = relay.call("POST", "/api/agents", raw=raw, headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json["code"] == code and r.json["field"] == "body"
    assert relay.snapshot() == before


def test_writes_must_be_json(relay):
    r = relay.call("POST", "/api/agents", raw=b'{"id": "a"}', headers={"Content-Type": "text/plain"})
    assert r.status == 415 and r.json["code"] == "unsupported_media_type"
    r = relay.call("POST", "/api/agents", raw=b'id=a', headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    r = relay.call("POST", "/api/agents", raw=b'{"id": "a"}',
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status == 201
    relay.register("a")
    assert relay.call("POST", "/api/agents/a/heartbeat").status == 200  # no body, no content type needed


def test_oversized_body_is_413_and_not_read(relay_factory):
    relay = relay_factory(max_body_bytes=1000)
    sock = socket.create_connection((relay.host, relay.port))
    try:
        sock.sendall(b"POST /api/agents HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\n\r\n")
        reply = sock.recv(65536)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"body_too_large"' in reply and b"Connection: close" in reply


def test_chunked_request_bodies_are_read_and_limited(relay_factory):
    relay = relay_factory(max_body_bytes=100)
    conn = http.client.HTTPConnection(relay.host, relay.port)
    conn.request("POST", "/api/agents", body=iter([b'{"id": ', b'"chunky"}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 201
    conn.close()
    conn = http.client.HTTPConnection(relay.host, relay.port)
    conn.request("POST", "/api/agents", body=iter([b" " * 80, b" " * 80]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


# ---------------------------------------------------------------------------
# Auth, origin and transport
# ---------------------------------------------------------------------------


def test_token_is_required_when_set_and_accepted_in_both_headers(relay_factory):
    relay = relay_factory(token="s3cret")
    r = relay.call("GET", "/api/stats", token="")
    assert r.status == 401 and r.json["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = relay.call("GET", "/api/stats", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and r.json["code"] == "invalid_token"
    assert relay.call("GET", "/api/stats", headers={"Authorization": "Bearer s3cret"}).status == 200
    assert relay.call("GET", "/api/stats", headers={"X-Agent-Relay-Token": "s3cret"}).status == 200
    # The dashboard page itself holds no data and needs no token.
    assert relay.call("GET", "/", token="").status == 200


def test_without_a_token_localhost_is_frictionless(relay):
    assert relay.call("GET", "/api/stats").status == 200
    # A token that matches nothing is refused even here: a typo must never widen access (SPEC 2).
    r = relay.call("GET", "/api/stats", headers={"Authorization": "Bearer stale"})
    assert r.status == 401 and r.json["code"] == "invalid_token"


def test_cross_site_origins_are_refused(relay):
    r = relay.call("POST", "/api/agents", {"id": "a"}, headers={"Origin": "https://evil.example"})
    assert r.status == 403 and r.json["code"] == "origin_not_allowed"
    assert relay.call("GET", "/api/agents", headers={"Origin": "https://evil.example"}).status == 403
    own = "http://127.0.0.1:%d" % relay.port
    r = relay.call("POST", "/api/agents", {"id": "a"}, headers={"Origin": own})
    assert r.status == 201


def test_cors_allow_list_and_preflight(relay_factory):
    relay = relay_factory(cors_origins="https://dash.example, https://other.example")
    r = relay.call("OPTIONS", "/api/messages", headers={"Origin": "https://dash.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    allowed_headers = r.headers["Access-Control-Allow-Headers"]
    for header in ("Authorization", "X-Agent-Relay-Token", "Content-Type", "Last-Event-ID"):
        assert header in allowed_headers
    r = relay.call("GET", "/api/stats", headers={"Origin": "https://dash.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    r = relay.call("OPTIONS", "/api/messages", headers={"Origin": "https://evil.example"})
    assert r.status == 403


def test_wildcard_cors(relay_factory):
    relay = relay_factory(cors_origins="*", token="t0ken-for-wildcard")
    r = relay.call("GET", "/api/stats", headers={"Origin": "https://anything.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://anything.example"


def test_dns_rebinding_host_is_refused_on_a_tokenless_loopback_relay(relay):
    r = relay.call("GET", "/api/stats", headers={"Host": "attacker.example:4850"})
    assert r.status == 403 and r.json["code"] == "host_not_allowed"
    for host in ("localhost:4850", "127.0.0.1", "[::1]:4850", "app.localhost"):
        assert relay.call("GET", "/api/stats", headers={"Host": host}).status == 200, host


def test_host_check_is_off_when_a_token_guards_the_relay(relay_factory):
    relay = relay_factory(token="t")
    assert relay.call("GET", "/api/stats", headers={"Host": "relay.lan"}).status == 200


def test_keep_alive_serves_many_requests_on_one_connection(relay):
    conn = http.client.HTTPConnection(relay.host, relay.port)
    try:
        for _ in range(20):
            conn.request("GET", "/api/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200 and response.getheader("Connection") != "close"
        first_sock = conn.sock
        conn.request("GET", "/api/health")
        conn.getresponse().read()
        assert conn.sock is first_sock
    finally:
        conn.close()


def test_responses_disable_nagle_on_the_server_socket(relay):
    # Observable effect of TCP_NODELAY: a response arrives as one segment
    # (status line, headers and body together) in a single recv.
    sock = socket.create_connection((relay.host, relay.port))
    try:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = sock.recv(65536)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"


def test_a_burst_of_connections_is_not_dropped(relay):
    socks = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((relay.host, relay.port))
            socks.append(s)
        for s in socks:
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answered = sum(1 for s in socks if s.recv(100).startswith(b"HTTP/1.1 200"))
    finally:
        for s in socks:
            s.close()
    assert answered == 300


def test_slow_clients_are_cut_off(relay_factory):
    relay = relay_factory(request_timeout_ms=300)
    slow = socket.create_connection((relay.host, relay.port))
    slow.settimeout(5)
    try:
        slow.sendall(b"POST /api/agents HTTP/1.1\r\nHost: local")
        started = time.monotonic()
        for _ in range(10):  # trickle a byte at a time; the deadline still holds
            try:
                slow.sendall(b"h")
            except OSError:
                break
            time.sleep(0.05)
        assert slow.recv(100) == b""  # the relay closed the connection
        assert time.monotonic() - started < 3
    finally:
        slow.close()
    assert relay.call("GET", "/api/health").status == 200


def test_open_connections_are_bounded(relay_factory):
    relay = relay_factory(max_connections=4)
    idle = [socket.create_connection((relay.host, relay.port)) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the server accept all four
        extra = socket.create_connection((relay.host, relay.port))
        extra.settimeout(5)
        reply = extra.recv(1000)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: relay.call("GET", "/api/health").status == 200)


def test_malformed_request_lines_get_a_json_error_and_the_relay_keeps_serving(relay):
    for junk in (b"GARBAGE\r\n\r\n", b"GET /api/health HTTP/9.9\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                 b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nContent-Length: nope\r\n\r\n"):
        s = socket.create_connection((relay.host, relay.port))
        s.settimeout(5)
        s.sendall(junk)
        reply = s.recv(4096)
        s.close()
        assert reply.startswith(b"HTTP/1.") and b" 500 " not in reply.split(b"\r\n")[0], reply
    assert relay.call("GET", "/api/health").status == 200


def test_unexpected_errors_answer_500_json_without_a_traceback(relay):
    relay.register("a")
    # A row that breaks the agent decoder (invalid JSON in a column) stands in
    # for any bug: the client sees a generic error, the log has the details.
    with relay.relay.store.transaction():
        relay.relay.store.conn.execute("UPDATE agents SET tags = 'not json' WHERE id = 'a'")
    r = relay.call("GET", "/api/agents/a")
    assert r.status == 500 and r.json == {"error": "internal error", "code": "internal"}


def test_dashboard_is_served_at_the_root(relay):
    r = relay.call("GET", "/")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<html" in r.raw.lower() or b"<!doctype" in r.raw.lower()
    assert relay.call("HEAD", "/").status == 200


@pytest.mark.sqlite_only("SQLite's backup API; PostgreSQL answers 409 not_supported (pg_dump)")
def test_backup_writes_a_consistent_copy(relay, tmp_path):
    relay.register("a")
    r = relay.call("POST", "/api/system/backup", {"name": "backup.db"})
    target = str(tmp_path / "backups" / "backup.db")  # BACKUP_DIR defaults to backups/ beside the database
    assert r.status == 200 and r.json["bytes"] > 0 and r.json["path"] == target
    assert os.stat(target).st_mode & 0o777 == 0o600
    import sqlite3
    conn = sqlite3.connect(target)
    assert conn.execute("SELECT id FROM agents").fetchall() == [("a",)]
    conn.close()
    assert relay.call("POST", "/api/system/backup", {"name": "backup.db"}).status == 409
    assert relay.call("POST", "/api/system/backup", {}).json["field"] == "name"


def test_the_readme_holds_exactly_the_configuration_table_settings_render():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("| Variable | Flag | Default | Purpose |")
    end = readme.index("\n\n", start) + 1
    assert readme[start:end] == agent_relay.settings_table(), (
        "regenerate it: python3 -c 'import agent_relay; print(agent_relay.settings_table())'")
    assert len(agent_relay.settings_table().splitlines()) == len(agent_relay.SETTINGS) + 2


def test_unread_stays_right_however_messages_are_read(team):
    """The read mark (which keeps unread reads fast as history grows) never hides an unread message."""
    ids = [team.send("sender", "alice", body=str(i))["id"] for i in range(6)]

    def unread():
        return [m["id"] for m in team.inbox("alice", unread="true")]
    team.call("POST", "/api/messages/read", {"agentId": "alice", "ids": [ids[1], ids[3]]})
    assert unread() == [ids[0], ids[2], ids[4], ids[5]]
    team.call("POST", "/api/messages/read", {"agentId": "alice", "ids": [ids[0], ids[2]]})
    assert unread() == [ids[4], ids[5]]
    team.call("PATCH", "/api/messages/%d" % ids[1], {"agentId": "alice", "read": False})
    assert unread() == [ids[1], ids[4], ids[5]]
    team.call("POST", "/api/messages/read", {"agentId": "alice", "upTo": ids[5]})
    assert unread() == []
    group = team.send("sender", "tag:ops", body="for ops, sent after alice registered")
    assert unread() == []
    team.call("PATCH", "/api/agents/alice", {"tags": ["backend", "ops"]})  # now she sees it
    assert unread() == [group["id"]]


def test_content_length_takes_ascii_digits_only(relay):
    sock = socket.create_connection((relay.host, relay.port))
    try:
        sock.sendall("POST /api/agents HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     "Content-Length: \u00b2\r\n\r\n{}".encode("latin-1"))
        reply = sock.recv(4096)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 400") and b"Content-Length" in reply


@pytest.mark.sqlite_only("builds a schema-1 SQLite file")
def test_a_database_from_schema_1_migrates_and_keeps_working(relay_factory, tmp_path):
    db = str(tmp_path / "old.db")
    old = relay_factory(db_path=db)
    old.register("a")
    old.send("x", "a", body="kept")
    old.server.stop()
    import sqlite3
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE read_marks; DROP INDEX messages_by_kind; ALTER TABLE events DROP COLUMN message_id; "
                       "DROP TABLE agent_tokens; ALTER TABLE messages DROP COLUMN sent_by; PRAGMA user_version=1;")
    conn.close()
    new = relay_factory(db_path=db)
    assert [m["body"] for m in new.inbox("a", unread="true")] == ["kept"]
    new.call("POST", "/api/messages/read", {"agentId": "a", "upTo": 1})
    assert new.inbox("a", unread="true") == []
    with new.relay.store.lock:
        assert new.relay.store.conn.execute("PRAGMA user_version").fetchone()[0] == len(agent_relay.MIGRATIONS)


def test_execute_answers_a_small_value_object(relay):
    def run(method, path, body=b"", headers=None):
        route, params = agent_relay.ROUTER.resolve(method, path)
        request = agent_relay.Request(method, path, "", headers or {}, body, agent_relay.ADMIN, params)
        return agent_relay.execute(relay.relay, route, request)
    answer = run("GET", "/api/health")
    assert (answer.status, answer.payload["status"], answer.replayed) == (200, "ok", False)
    relay.register("a")
    key = {"Idempotency-Key": "k1"}
    first = run("POST", "/api/messages", b'{"from": "a", "to": "a", "body": "hi"}', key)
    again = run("POST", "/api/messages", b'{"from": "a", "to": "a", "body": "hi"}', key)
    assert (first.status, first.replayed, again.status, again.replayed) == (201, False, 201, True)
    assert again.payload == first.payload
