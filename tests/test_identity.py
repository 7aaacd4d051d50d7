"""Identity (SPEC 2, 10 and 12): every request acts as someone the relay knows.

The server half: unknown tokens, integration reach, agent tokens (issued
once, kept as a hash, rotated), the join token, AGENT_IDENTITY=token and
`sentBy`. The client half: the state file, RelayClient, the CLI's identity
rules run as real subprocesses in real folders, and `watch`, the hooks and
the Codex sidecar in token mode.
"""

import glob
import json
import os

import pytest

import agent_relay

OPS = {"name": "ops", "token": "ops-secret-change-me", "scopes": ["*"], "targets": ["cap:ops"],
       "callbackUrl": "http://127.0.0.1:9/hook", "callbackSecret": "s"}
CI = {"name": "ci", "token": "ci-secret-change-me", "scopes": ["*"], "targets": ["tag:ci"]}


def register(relay, agent_id, token=None, **fields):
    """Register `agent_id`; its agent token (issued the first time) or None."""
    r = relay.call("POST", "/api/agents", dict(fields, id=agent_id), token=token)
    assert r.status in (200, 201), r
    return r.json.get("agentToken")


def as_agent(relay, token, method, path, body=None):
    return relay.call(method, path, body, token=token)


# ---------------------------------------------------------------------------
# Item 1: a token that matches nothing; forged sources
# ---------------------------------------------------------------------------


def test_a_mistyped_token_is_401_even_when_only_integrations_are_configured(relay_factory):
    relay = relay_factory(integrations=json.dumps([OPS]))
    register(relay, "bob")
    r = relay.call("DELETE", "/api/agents/bob", token="ops-secret-change-mee")
    assert r.status == 401 and r.json["code"] == "invalid_token"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert relay.call("GET", "/api/agents/bob").status == 200
    # and the same with an admin token configured
    relay = relay_factory(token="admin-token", integrations=json.dumps([OPS]))
    r = relay.call("GET", "/api/stats", token="admin-tokem")
    assert r.status == 401 and r.json["code"] == "invalid_token"


def test_anonymous_callers_may_not_report_as_a_configured_integration(relay_factory):
    relay = relay_factory(integrations=json.dumps([OPS]))
    r = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "forged", "source": "ops"})
    assert r.status == 403 and r.json["code"] == "source_not_allowed" and r.json["field"] == "source"
    assert relay.call("GET", "/api/tasks").json["tasks"] == []
    assert relay.call("GET", "/api/messages").json["messages"] == []
    # a source that is no integration stays the seed's behaviour
    r = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "ok", "source": "cron"})
    assert r.status == 201 and r.json["task"]["source"] == "cron"
    # the integration's own token still reports as it
    r = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "real"}, token=OPS["token"])
    assert r.status == 201 and r.json["task"]["source"] == "ops"


# ---------------------------------------------------------------------------
# Item 2: integrations are bounded by their reach everywhere
# ---------------------------------------------------------------------------


def test_an_integration_reads_and_changes_only_agents_within_its_reach(relay_factory):
    relay = relay_factory(integrations=json.dumps([OPS, CI]))
    ops = OPS["token"]
    register(relay, "bob")
    register(relay, "oncall", capabilities=["ops"])
    to_bob = relay.send("alice", "bob", "private")
    to_ops = relay.send("alice", "cap:ops", "page")

    def refused(method, path, body=None, field=None):
        r = relay.call(method, path, body, token=ops)
        assert r.status == 403 and r.json["code"] == "outside_reach", (method, path, r)
        if field:
            assert r.json["field"] == field
    before = relay.snapshot()
    refused("GET", "/api/messages?for=bob", field="for")
    refused("GET", "/api/messages/%d" % to_bob["id"])
    refused("GET", "/api/messages/%d/thread" % to_bob["id"])
    refused("GET", "/api/messages/%d/receipts" % to_bob["id"])
    refused("POST", "/api/messages/read", {"agentId": "bob", "upTo": to_bob["id"]}, "agentId")
    refused("PATCH", "/api/messages/%d" % to_bob["id"], {"agentId": "bob", "read": True}, "agentId")
    refused("DELETE", "/api/messages/%d" % to_bob["id"])
    refused("DELETE", "/api/agents/bob", field="id")
    refused("PATCH", "/api/agents/bob", {"label": "mine"}, "id")
    refused("POST", "/api/agents/bob/heartbeat", {})
    refused("POST", "/api/agents", {"id": "bob", "label": "taken"}, "id")
    refused("GET", "/api/events", field="for")
    assert relay.snapshot() == before
    # the firehose an integration reads is what its reach covers
    listed = relay.call("GET", "/api/messages", token=ops).json["messages"]
    assert [m["id"] for m in listed] == [to_ops["id"]]
    # within its reach everything works, and it may register new agents
    assert [m["id"] for m in relay.call("GET", "/api/messages?for=oncall", token=ops).json["messages"]] == [
        to_ops["id"]]
    assert relay.call("POST", "/api/messages/read", {"agentId": "oncall", "upTo": to_ops["id"]},
                      token=ops).json == {"marked": 1}
    assert relay.call("POST", "/api/agents", {"id": "ops-runner", "capabilities": ["ops"]}, token=ops).status == 201


def test_an_integration_may_not_claim_work_as_an_agent_outside_its_reach(relay_factory):
    relay = relay_factory(integrations=json.dumps([OPS, CI]))
    register(relay, "victim", capabilities=["ops"])
    task = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk"},
                      token=OPS["token"]).json["task"]
    r = relay.call("POST", "/api/tasks/%d/claim" % task["id"], {"agentId": "victim"}, token=CI["token"])
    assert r.status == 403 and r.json["code"] == "outside_reach" and r.json["field"] == "agentId"
    assert relay.call("GET", "/api/tasks/%d" % task["id"]).json["status"] == "open"
    r = relay.call("POST", "/api/messages/%d/claim" % task["messageId"], {"agentId": "victim"}, token=CI["token"])
    assert r.status == 403 and r.json["code"] == "outside_reach"


# ---------------------------------------------------------------------------
# Item 3 and SPEC 12: agent tokens
# ---------------------------------------------------------------------------


def test_an_agent_token_is_issued_once_and_the_relay_keeps_only_its_hash(relay_factory, tmp_path):
    db = str(tmp_path / "hash.db")
    relay = relay_factory(db_path=db)
    r = relay.call("POST", "/api/agents", {"id": "alice"}, headers={"Idempotency-Key": "k1"})
    token = r.json["agentToken"]
    assert r.status == 201 and len(token) >= 43 and set(token) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    again = relay.call("POST", "/api/agents", {"id": "alice", "label": "x"}, token=token)
    assert again.status == 200 and "agentToken" not in again.json
    assert "agentToken" not in relay.call("GET", "/api/agents/alice").json
    relay.send("alice", "broadcast", "hello")
    relay.server.stop()
    stored = b"".join(open(path, "rb").read() for path in glob.glob(db + "*") if os.path.isfile(path))
    assert token.encode() not in stored
    assert agent_relay.hash_token(token).encode() in stored


def test_an_agent_token_acts_as_its_agent_by_default_and_records_sent_by(relay):
    alice = register(relay, "alice")
    register(relay, "bob")
    r = as_agent(relay, alice, "POST", "/api/messages", {"to": "bob", "body": "hi"})
    assert r.status == 201 and r.json["from"] == "alice" and r.json["sentBy"] == "agent:alice"
    reply = relay.send("bob", "alice", "hello back")
    inbox = as_agent(relay, alice, "GET", "/api/messages").json["messages"]
    assert [m["id"] for m in inbox] == [reply["id"]] and inbox[0]["sentBy"] == "anonymous"
    r = as_agent(relay, alice, "POST", "/api/messages/read", {"upTo": reply["id"]})
    assert r.json == {"marked": 1}
    pair = as_agent(relay, alice, "POST", "/api/pairs", {"to": "bob"}).json
    assert pair["from"] == "alice"
    assert as_agent(relay, alice, "GET", "/api/pairs").json["pairs"][0]["id"] == pair["id"]
    stream = relay.events("/api/events?types=message.new", headers={"Authorization": "Bearer " + alice})
    try:
        relay.send("carol", "bob", "not for alice")
        relay.send("carol", "alice", "for alice")
        assert stream.next_event()["data"]["body"] == "for alice"  # its own stream, not the firehose
    finally:
        stream.close()


def test_an_agent_token_cannot_act_as_another_agent_on_any_route(relay):
    """Each route family, own agent allowed and another refused with 403
    not_your_agent, changing nothing."""
    alice = register(relay, "alice", capabilities=["review"])
    register(relay, "bob", capabilities=["review"])
    to_bob = relay.send("carol", "bob", "for bob only")
    work = relay.send("carol", "cap:review", "review this", claimable=True)
    task = relay.call("POST", "/api/integrations/events", {"type": "t", "title": "t",
                                                           "target": "cap:review"}).json["task"]
    pair = relay.call("POST", "/api/pairs", {"from": "bob", "to": "carol-ish"})  # no match: no pair
    assert pair.status == 404
    register(relay, "carol")
    pair = relay.call("POST", "/api/pairs", {"from": "bob", "to": "carol"}).json

    def refused(method, path, body=None, code="not_your_agent"):
        r = as_agent(relay, alice, method, path, body)
        assert r.status == 403 and r.json["code"] == code, (method, path, r)
    before = relay.snapshot()
    refused("POST", "/api/agents", {"id": "bob"})
    refused("POST", "/api/agents/bob/heartbeat", {})
    refused("PATCH", "/api/agents/bob/label", {"label": "x"})
    refused("PATCH", "/api/agents/bob", {"tags": ["x"]})
    refused("DELETE", "/api/agents/bob")
    refused("POST", "/api/agents/bob/token", {}, "agent_token_required")
    refused("POST", "/api/messages", {"from": "bob", "to": "carol", "body": "forged"})
    refused("GET", "/api/messages?for=bob")
    refused("GET", "/api/messages/%d" % to_bob["id"])
    refused("GET", "/api/messages/%d?for=bob" % to_bob["id"])
    refused("GET", "/api/messages/%d/thread" % to_bob["id"])
    refused("GET", "/api/messages/%d/receipts" % to_bob["id"])
    refused("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "bob"})
    refused("PATCH", "/api/messages/%d" % to_bob["id"], {"agentId": "bob", "read": True})
    refused("POST", "/api/messages/read", {"agentId": "bob", "upTo": to_bob["id"]})
    refused("DELETE", "/api/messages/%d" % to_bob["id"])
    refused("POST", "/api/pairs", {"from": "bob", "to": "carol"})
    refused("GET", "/api/pairs?agent=bob")
    refused("GET", "/api/pairs/%s" % pair["id"], code="not_a_member")
    refused("POST", "/api/pairs/%s/accept" % pair["id"], {"agentId": "carol"})
    refused("POST", "/api/pairs/%s/hangup" % pair["id"], {"agentId": "bob"})
    refused("POST", "/api/pairs/%s/messages" % pair["id"], {"from": "bob", "body": "x"})
    refused("POST", "/api/tasks/%d/claim" % task["id"], {"agentId": "bob"})
    refused("GET", "/api/events?for=bob")
    assert relay.snapshot() == before
    # the same routes as itself work
    assert as_agent(relay, alice, "POST", "/api/agents/alice/heartbeat", {}).status == 200
    assert as_agent(relay, alice, "PATCH", "/api/agents/alice", {"tags": ["x"]}).json["tags"] == ["x"]
    assert as_agent(relay, alice, "POST", "/api/messages/%d/claim" % work["id"], {}).json["claimedBy"] == "alice"
    assert as_agent(relay, alice, "GET", "/api/messages/%d/thread" % work["id"]).status == 200
    claimed = as_agent(relay, alice, "POST", "/api/tasks/%d/claim" % task["id"], {}).json
    assert claimed["claimedBy"] == "alice"
    # only the claim's holder acts on it: bob's token may not, even naming alice's claim
    bob = relay.call("POST", "/api/agents/bob/token", {}).json  # anonymous may not rotate
    assert bob["code"] == "agent_token_required"
    r = as_agent(relay, alice, "PATCH", "/api/tasks/%d/status" % task["id"], {"status": "done"})
    assert r.status == 200 and r.json["status"] == "done"
    mine = as_agent(relay, alice, "POST", "/api/messages", {"to": "bob", "body": "mine"}).json
    assert as_agent(relay, alice, "DELETE", "/api/messages/%d" % mine["id"]).json == {"deleted": True}


def test_only_the_claim_holder_updates_a_task_claimed_with_an_agent_token(relay):
    alice = register(relay, "alice", capabilities=["ops"])
    bob = register(relay, "bob", capabilities=["ops"])
    task = relay.call("POST", "/api/integrations/events", {"type": "t", "title": "t", "target": "cap:ops"}).json["task"]
    as_agent(relay, alice, "POST", "/api/tasks/%d/claim" % task["id"], {})
    r = as_agent(relay, bob, "PATCH", "/api/tasks/%d/status" % task["id"], {"agentId": "alice", "status": "done"})
    assert r.status == 403 and r.json["code"] == "not_your_agent"
    r = as_agent(relay, bob, "PATCH", "/api/tasks/%d/status" % task["id"], {"status": "done"})
    assert r.status == 409 and r.json["code"] == "stale_claim"
    assert relay.call("GET", "/api/tasks/%d" % task["id"]).json["status"] == "claimed"


def test_rotating_an_agent_token_retires_the_old_one_at_once(relay_factory):
    relay = relay_factory(token="admin-token")
    old = register(relay, "alice")
    bob = register(relay, "bob")
    r = relay.call("POST", "/api/agents/alice/token", {}, token=bob)
    assert r.status == 403 and r.json["code"] == "agent_token_required"
    new = relay.call("POST", "/api/agents/alice/token", {}, token=old).json["agentToken"]
    assert new != old
    r = relay.call("GET", "/api/messages", token=old)
    assert r.status == 401 and r.json["code"] == "invalid_token"
    assert relay.call("GET", "/api/messages", token=new).status == 200
    third = relay.call("POST", "/api/agents/alice/token", {}).json["agentToken"]  # the admin
    assert relay.call("GET", "/api/messages", token=new).status == 401
    assert relay.call("GET", "/api/messages", token=third).status == 200
    assert relay.call("POST", "/api/agents/ghost/token", {}).status == 404


def test_registering_an_id_that_holds_a_token_needs_that_token_or_admin(relay_factory):
    relay = relay_factory(token="admin-token", join_token="join-token-123",
                          integrations=json.dumps([dict(OPS, targets=[])]))
    token = register(relay, "alice", token="join-token-123", label="mine")
    assert token
    for other in ("join-token-123", OPS["token"], register(relay, "bob", token="join-token-123")):
        r = relay.call("POST", "/api/agents", {"id": "alice", "label": "taken"}, token=other)
        assert r.status in (403, 409) and r.json["code"] in ("agent_exists", "not_your_agent"), r
    assert relay.call("GET", "/api/agents/alice").json["label"] == "mine"
    assert relay.call("POST", "/api/agents", {"id": "alice", "label": "by admin"}).status == 200
    assert relay.call("POST", "/api/agents", {"id": "alice", "label": "own"}, token=token).status == 200


def test_the_join_token_registers_new_agents_and_reads_the_directory_only(relay_factory):
    relay = relay_factory(token="admin-token", join_token="join-token-123")
    join = "join-token-123"
    r = relay.call("POST", "/api/agents", {"id": "newbie"}, token=join)
    assert r.status == 201 and r.json["agentToken"]
    for path in ("/api/agents", "/api/agents/newbie", "/api/stats", "/api/health", "/api/channels"):
        assert relay.call("GET", path, token=join).status == 200, path
    for method, path, body in (("GET", "/api/messages?for=newbie", None), ("GET", "/api/tasks", None),
                               ("GET", "/api/events", None), ("POST", "/api/system/reap", {})):
        r = relay.call(method, path, body, token=join)
        assert r.status == 403 and r.json["code"] == "insufficient_scope", path
    for method, path, body in (("POST", "/api/agents/newbie/heartbeat", {}), ("DELETE", "/api/agents/newbie", None),
                               ("PATCH", "/api/agents/newbie", {"label": "x"})):
        r = relay.call(method, path, body, token=join)
        assert r.status == 403 and r.json["code"] == "agent_token_required", path
    with pytest.raises(agent_relay.ConfigError):
        agent_relay.Relay(agent_relay.Settings(token="same-token", join_token="same-token", db_path=":memory:"))


def test_token_mode_needs_the_agents_own_token_to_act_as_it(relay_factory):
    relay = relay_factory(agent_identity="token", join_token="join-token-123", integrations=json.dumps([OPS]))
    alice = register(relay, "alice")  # registering a new id stays open
    register(relay, "oncall", capabilities=["ops"])
    for token in ("", "join-token-123"):
        for method, path, body in (("POST", "/api/messages", {"from": "alice", "to": "oncall", "body": "x"}),
                                   ("GET", "/api/messages?for=alice", None),
                                   ("POST", "/api/agents/alice/heartbeat", {})):
            r = relay.call(method, path, body, token=token)
            # the join token lacks the scope of most of these in any mode
            codes = ("agent_token_required",) + (("insufficient_scope",) if token else ())
            assert r.status == 403 and r.json["code"] in codes, (token, path, r)
    r = relay.call("POST", "/api/agents", {"id": "alice", "label": "takeover"})
    assert r.status == 409 and r.json["code"] == "agent_exists"
    assert as_agent(relay, alice, "POST", "/api/messages", {"to": "oncall", "body": "ok"}).status == 201
    assert relay.call("GET", "/api/messages?for=oncall", token=OPS["token"]).status == 200  # within reach
    r = relay.call("GET", "/api/messages?for=alice", token=OPS["token"])
    assert r.status == 403 and r.json["code"] == "outside_reach"
    # reading the directory and the message list needs no agent
    assert relay.call("GET", "/api/agents").status == 200


def test_sent_by_records_who_sent_each_message(relay_factory):
    relay = relay_factory(token="admin-token", integrations=json.dumps([dict(OPS, targets=[])]))
    alice = register(relay, "alice")
    relay.send("alice", "broadcast", "as admin")
    as_agent(relay, alice, "POST", "/api/messages", {"to": "broadcast", "body": "as alice"})
    relay.call("POST", "/api/messages", {"from": "ops", "to": "broadcast", "body": "as ops"}, token=OPS["token"])
    relay.call("POST", "/api/integrations/events", {"type": "t", "title": "task"}, token=OPS["token"])
    anonymous = relay_factory()
    anonymous.send("x", "broadcast", "anon")
    sent = {m["body"]: m["sentBy"] for m in relay.call("GET", "/api/messages").json["messages"]}
    assert sent == {"as admin": "admin", "as alice": "agent:alice", "as ops": "integration:ops",
                    "task": "integration:ops"}
    assert anonymous.call("GET", "/api/messages").json["messages"][0]["sentBy"] == "anonymous"


def test_agents_registered_before_tokens_existed_get_one_when_they_next_register(relay_factory, tmp_path):
    db = str(tmp_path / "old.db")
    old = relay_factory(db_path=db)
    old.register("veteran")
    old.send("veteran", "broadcast", "from before")
    old.server.stop()
    import sqlite3
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE agent_tokens; ALTER TABLE messages DROP COLUMN sent_by; PRAGMA user_version=3;")
    conn.close()
    new = relay_factory(db_path=db)
    assert new.call("GET", "/api/messages").json["messages"][0]["sentBy"] is None
    assert new.call("GET", "/api/agents/veteran").status == 200
    token = register(new, "veteran")
    assert token and register(new, "veteran", token=token) is None


def test_an_mcp_session_acts_as_the_agent_its_register_tool_bound(relay_factory):
    relay = relay_factory(agent_identity="token")
    bob = register(relay, "bob")

    def rpc(method, params=None, session=None, token=""):
        headers = {"Mcp-Session-Id": session} if session else {}
        r = relay.call("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}},
                       headers=headers, token=token)
        return r
    init = rpc("initialize", {"protocolVersion": "2025-06-18"})
    session = init.headers["Mcp-Session-Id"]
    result = rpc("tools/call", {"name": "register", "arguments": {"id": "mcp-agent"}}, session).json["result"]
    assert json.loads(result["content"][0]["text"])["agentToken"]
    result = rpc("tools/call", {"name": "send", "arguments": {"to": "bob", "body": "hi"}}, session).json["result"]
    assert not result["isError"] and json.loads(result["content"][0]["text"])["sentBy"] == "agent:mcp-agent"
    # a session bound by bob's token acts as bob, whatever the header says
    other = rpc("initialize", {}, token=bob).headers["Mcp-Session-Id"]
    r = relay.call("POST", "/mcp", {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "send", "arguments": {"to": "mcp-agent", "body": "from bob"}}},
        headers={"Mcp-Session-Id": other, "X-Agent-Relay-Agent": "mcp-agent"}, token=bob)
    assert json.loads(r.json["result"]["content"][0]["text"])["from"] == "bob"
