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
import stat
import subprocess
import sys

import pytest

import agent_relay
from conftest import SCRIPT, wait_until

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
    # but only agents its reach covers: not one that would pose as the relay itself
    r = relay.call("POST", "/api/agents", {"id": "relay"}, token=ops)
    assert r.status == 403 and r.json["code"] == "outside_reach"
    assert relay.call("GET", "/api/agents/relay").status == 404


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
    # nor read another integration's work outside its reach
    assert relay.call("GET", "/api/tasks", token=CI["token"]).json["tasks"] == []
    for path in ("/api/tasks/%d" % task["id"], "/api/tasks/%d/events" % task["id"]):
        r = relay.call("GET", path, token=CI["token"])
        assert r.status == 403 and r.json["code"] == "outside_reach", path
    assert [t["id"] for t in relay.call("GET", "/api/tasks", token=OPS["token"]).json["tasks"]] == [task["id"]]


# ---------------------------------------------------------------------------
# Item 3 and SPEC 12: agent tokens
# ---------------------------------------------------------------------------


@pytest.mark.sqlite_only("searches the SQLite file's bytes")
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
                               ("GET", "/api/events", None), ("POST", "/api/system/reap", {}),
                               ("POST", "/api/agents/newbie/heartbeat", {}), ("DELETE", "/api/agents/newbie", None),
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
            assert r.status == 403 and r.json["code"] == "agent_token_required", (token, path, r)
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


@pytest.mark.sqlite_only("rewinds a SQLite file's schema")
def test_agents_registered_before_tokens_existed_get_one_when_they_next_register(relay_factory, tmp_path):
    db = str(tmp_path / "old.db")
    old = relay_factory(db_path=db)
    old.register("veteran")
    old.send("veteran", "broadcast", "from before")
    old.server.stop()
    import sqlite3
    conn = sqlite3.connect(db)
    # the database as it was before the agent-token migration (the last one)
    conn.executescript("DROP TABLE agent_tokens; ALTER TABLE messages DROP COLUMN sent_by; PRAGMA user_version=%d;"
                       % (len(agent_relay.MIGRATIONS) - 1))
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


# ---------------------------------------------------------------------------
# Clients: the state file and RelayClient
# ---------------------------------------------------------------------------


def state_file():
    return os.path.join(os.environ["XDG_STATE_HOME"], "agent-relay", "agents.json")


def test_the_client_keeps_agent_tokens_in_a_private_file_by_relay_and_agent(relay_factory):
    first, second = relay_factory(agent_identity="token"), relay_factory(agent_identity="token")
    one = agent_relay.RelayClient(first.url, agent="alice")
    one.register(id="alice")
    two = agent_relay.RelayClient(second.url, agent="alice")
    two.register(id="alice")
    assert stat.S_IMODE(os.stat(state_file()).st_mode) == 0o600
    with open(state_file(), encoding="utf-8") as f:
        kept = json.load(f)
    assert set(kept) == {first.url, second.url}
    assert kept[first.url]["alice"]["token"] != kept[second.url]["alice"]["token"]
    # a new client acting as alice on the first relay sends her token, and only there
    again = agent_relay.RelayClient(first.url, agent="alice")
    assert again.send(None, "alice", "note to self")["sentBy"] == "agent:alice"
    assert again.messages(limit=10)[0]["body"] == "note to self"
    # rotation keeps the new token; the old one is gone from the file
    old = kept[first.url]["alice"]["token"]
    new = again.rotate_token("alice")
    assert agent_relay.AgentTokens().get(first.url, "alice") == new != old
    # an agent the relay forgot (pruned, database replaced): its stale token is dropped and it registers again
    first.call("DELETE", "/api/agents/alice", token=new)
    stale = agent_relay.RelayClient(first.url, agent="alice")
    assert stale.register(id="alice")["id"] == "alice"
    assert agent_relay.AgentTokens().get(first.url, "alice") not in (None, new)


def test_the_seed_flow_one_shared_token_and_no_per_agent_setup_still_works(relay_factory):
    relay = relay_factory(token="shared-token")
    client = agent_relay.RelayClient(relay.url, token="shared-token")
    client.register(id="a")
    client.register(id="b")
    sent = client.send("b", "a", "as b with the shared token")
    assert sent["from"] == "b" and sent["sentBy"] == "admin"
    assert client.register(id="a", label="again")["label"] == "again"  # re-registering needs nothing more
    assert [m["id"] for m in client.messages("a")] == [sent["id"]]


# ---------------------------------------------------------------------------
# The CLI (item 4): real subprocesses, real folders, real environment
# ---------------------------------------------------------------------------


@pytest.fixture
def shell(tmp_path):
    """A user's shell: `shell(cwd, *args, env=...)` runs the CLI in folder `cwd`."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("AGENT_RELAY_") and k not in agent_relay.PROVIDER_SESSION_VARS}
    base.update({"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
                 "XDG_STATE_HOME": str(tmp_path / "state")})

    def run(cwd, *args, env=None, check=True):
        os.makedirs(str(cwd), exist_ok=True)
        done = subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                              env=dict(base, **(env or {})), cwd=str(cwd), timeout=60)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done
    run.base = base
    return run


def registered_id(done):
    return done.stdout.split()[1]


def test_the_same_command_in_two_project_folders_acts_as_two_agents(relay, shell, tmp_path):
    env = {"AGENT_RELAY_URL": relay.url}
    x = registered_id(shell(tmp_path / "projX", "register", "--label", "xxx", env=env))
    y = registered_id(shell(tmp_path / "projY", "register", "--label", "yyy", env=env))
    assert "-projX-" in x and "-projY-" in y and x != y
    assert relay.call("GET", "/api/agents/" + x).json["label"] == "xxx"
    assert relay.call("GET", "/api/agents/" + y).json["project"] == "projY"
    assert x == agent_relay.deterministic_agent_id(str(tmp_path / "projX"), None)


def test_an_explicit_agent_never_becomes_who_later_commands_act_as(relay, shell, tmp_path):
    env = {"AGENT_RELAY_URL": relay.url}
    here = tmp_path / "proj"
    me = registered_id(shell(here, "register", env=env))
    shell(here, "register", "--id", "codex-web", env=env)
    shell(here, "send", "codex-web", "as ci", "--agent", "ci-bot", env=env)
    shell(here, "send", "codex-web", "plain", env=env)
    senders = {m["body"]: m["from"] for m in relay.inbox("codex-web")}
    assert senders == {"as ci": "ci-bot", "plain": me}


def test_a_second_relay_url_never_changes_who_you_are_on_the_first(relay_factory, shell, tmp_path):
    first, second = relay_factory(), relay_factory()
    here = tmp_path / "proj"
    me = registered_id(shell(here, "register", env={"AGENT_RELAY_URL": first.url}))
    assert registered_id(shell(here, "--url", second.url, "register", env={"AGENT_RELAY_URL": first.url})) == me
    first.send("boss", me, "still you")
    out = shell(here, "inbox", env={"AGENT_RELAY_URL": first.url}).stdout
    assert "from boss: still you" in out


def test_whoami_prints_the_agent_the_relay_and_the_rule(relay, shell, tmp_path):
    here = tmp_path / "proj"
    env = {"AGENT_RELAY_URL": relay.url}

    def whoami(*args, **extra):
        return json.loads(shell(here, "whoami", "--json", *args, env=dict(env, **extra)).stdout)
    folder = whoami()
    assert folder["agentId"] == agent_relay.deterministic_agent_id(str(here), None)
    assert folder["url"] == relay.url and folder["rule"].startswith("project folder")
    claude = whoami(CLAUDE_CODE_SESSION_ID="s-1")
    assert claude["agentId"] == agent_relay.deterministic_agent_id(str(here), "s-1")
    assert claude["rule"] == "provider session (CLAUDE_CODE_SESSION_ID)"
    assert whoami(AGENT_RELAY_ID="pinned", CLAUDE_CODE_SESSION_ID="s-1")["rule"] == "AGENT_RELAY_ID"
    assert whoami("--agent", "named", AGENT_RELAY_ID="pinned") == {
        "agentId": "named", "url": relay.url, "rule": "--agent", "agentToken": False}
    lines = shell(here, "whoami", env=env).stdout.splitlines()
    assert lines[:3] == ["agent: %s" % folder["agentId"], "relay: %s" % relay.url,
                         "chosen by: project folder (%s)" % here]
    shell(here, "register", env=env)
    assert whoami()["agentToken"] is True


def test_global_options_work_before_the_command(relay, shell, tmp_path):
    here = tmp_path / "proj"
    shell(here, "--url", relay.url, "register", "--id", "opt-agent")
    relay.send("boss", "opt-agent", "hello")
    before = shell(here, "--url", relay.url, "--agent", "opt-agent", "--json", "inbox")
    after = shell(here, "inbox", "--url", relay.url, "--agent", "opt-agent", "--json")
    assert json.loads(before.stdout) == json.loads(after.stdout) and json.loads(before.stdout)[0]["body"] == "hello"
    assert "registered" not in shell(here, "--url=%s" % relay.url, "/status", "--agent", "opt-agent").stdout


def test_a_bare_name_resolves_like_a_pair_target(relay, shell, tmp_path):
    here = tmp_path / "proj"
    env = {"AGENT_RELAY_URL": relay.url, "AGENT_RELAY_ID": "me"}
    relay.register("me")
    relay.register("vm-web-1a2b3c", provider="codex", label="web")
    shell(here, "send", "codex", "by provider", env=env)
    shell(here, "/message", "web", "by label", env=env)
    assert [m["body"] for m in relay.inbox("vm-web-1a2b3c")] == ["by provider", "by label"]
    relay.register("vm-api-4d5e6f", provider="codex", label="api")
    before = relay.snapshot()
    done = shell(here, "send", "codex", "which one?", env=env, check=False)
    assert done.returncode == 1 and "vm-web-1a2b3c" in done.stderr and "vm-api-4d5e6f" in done.stderr
    assert relay.snapshot() == before


def test_the_cli_works_end_to_end_in_token_mode(relay_factory, shell, tmp_path):
    relay = relay_factory(token="admin-token", join_token="join-token-123", agent_identity="token")
    env = {"AGENT_RELAY_URL": relay.url, "AGENT_RELAY_TOKEN": "join-token-123"}
    me = registered_id(shell(tmp_path / "proj", "register", env=env))
    relay.register("boss")
    shell(tmp_path / "proj", "send", "boss", "done", env=env)
    assert [(m["from"], m["sentBy"]) for m in relay.inbox("boss")] == [(me, "agent:" + me)]
    relay.send("boss", me, "thanks")
    assert "from boss: thanks" in shell(tmp_path / "proj", "inbox", "--mark-read", env=env).stdout
    # someone else's shell, with only the join token, cannot act as that agent
    other = dict(env, XDG_STATE_HOME=str(tmp_path / "elsewhere"))
    done = shell(tmp_path / "proj", "send", "boss", "forged", env=other, check=False)
    assert done.returncode == 1 and "agent token" in done.stderr
    with open(os.path.join(str(tmp_path / "state"), "agent-relay", "agents.json"), encoding="utf-8") as f:
        assert set(json.load(f)[relay.url]) == {me}


# ---------------------------------------------------------------------------
# watch, the hooks and the Codex sidecar in token mode
# ---------------------------------------------------------------------------


@pytest.fixture
def token_relay(relay_factory):
    return relay_factory(token="admin-token", join_token="join-token-123", agent_identity="token")


def test_watch_works_in_token_mode(token_relay, shell, tmp_path):
    relay = token_relay
    env = dict(shell.base, AGENT_RELAY_URL=relay.url, AGENT_RELAY_TOKEN="join-token-123")
    proc = subprocess.Popen([sys.executable, SCRIPT, "watch", "--agent", "watcher", "--heartbeat", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        assert "watching as watcher" in proc.stderr.readline()
        relay.register("boss")
        message = relay.send("boss", "watcher", "live")
        assert proc.stdout.readline() == "[msg:%d] from boss: live\n" % message["id"]
        wait_until(lambda: relay.inbox("watcher", unread="true") == [])  # marked read with its own token
    finally:
        proc.send_signal(2)
        assert proc.wait(15) == 0
        proc.stdout.close()
        proc.stderr.close()
    assert relay.call("GET", "/api/agents/watcher").json["status"] == "offline"


def test_the_hooks_work_in_token_mode(token_relay, shell, tmp_path):
    relay = token_relay
    project = tmp_path / "proj"
    project.mkdir()
    env = dict(shell.base, AGENT_RELAY_URL=relay.url, AGENT_RELAY_TOKEN="join-token-123",
               CLAUDE_ENV_FILE=str(tmp_path / "claude.env"))

    def hook(event, name, **extra):
        payload = dict({"session_id": "sess-9", "cwd": str(project), "hook_event_name": name}, **extra)
        done = subprocess.run([sys.executable, SCRIPT, "hook", event], input=json.dumps(payload),
                              capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.strip() else None
    start = hook("session-start", "SessionStart", source="startup")
    agent_id = agent_relay.deterministic_agent_id(str(project), "sess-9")
    assert "Your agent ID: %s" % agent_id in start["hookSpecificOutput"]["additionalContext"]
    relay.register("peer")
    message = relay.send("peer", agent_id, "check the migration")
    prompt = hook("user-prompt-submit", "UserPromptSubmit", prompt="hi")
    assert "[msg:%d] from peer: check the migration" % message["id"] in prompt["hookSpecificOutput"][
        "additionalContext"]
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "busy"
    assert relay.inbox(agent_id, unread="true") == []
    hook("session-end", "SessionEnd", reason="logout")
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "offline"


def test_the_codex_sidecar_works_in_token_mode(token_relay, shell, tmp_path):
    relay = token_relay
    fake = os.path.join(os.path.dirname(SCRIPT), "tests", "fake_codex.py")
    log = str(tmp_path / "codex.log")
    env = dict(shell.base, AGENT_RELAY_URL=relay.url, AGENT_RELAY_TOKEN="join-token-123", FAKE_CODEX_LOG=log)
    port = agent_relay.free_loopback_port()
    proc = subprocess.Popen([sys.executable, SCRIPT, "codex", "--headless", "--port", str(port), "--codex-bin", fake,
                             "--agent", "codex-agent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(tmp_path), start_new_session=True)

    def turns():
        try:
            with open(log, encoding="utf-8") as f:
                return [json.loads(line) for line in f if '"turn/start"' in line]
        except OSError:
            return []
    try:
        assert "waiting for relay messages as codex-agent" in proc.stdout.readline()
        wait_until(lambda: relay.call("GET", "/api/agents/codex-agent").status == 200)
        relay.register("boss")
        message = relay.send("boss", "codex-agent", "run the tests")
        wait_until(lambda: turns() != [])
        assert turns()[0]["params"]["input"][0]["text"] == "[msg:%d] from boss: run the tests" % message["id"]
        wait_until(lambda: relay.inbox("codex-agent", unread="true") == [])
    finally:
        proc.send_signal(2)
        try:
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.stdout.close()
            proc.stderr.close()
    assert relay.call("GET", "/api/agents/codex-agent").json["status"] == "offline"


def test_every_token_the_readme_and_examples_use_is_one_they_configure():
    """Item 1: the example script used a token the README's configuration did
    not have, so it ran as admin. Both configure the same integration token,
    and each literal token sent is a configured one."""
    import re
    root = os.path.dirname(SCRIPT)
    configured = {}
    for name in ("README.md", os.path.join("examples", "README.md")):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        configured[name] = set(re.findall(r'"token": "([^"$]+)"', text))
        sent = set(re.findall(r"Bearer ([A-Za-z0-9_.-]+)", text))
        sent |= set(re.findall(r"OPS_TOKEN=([A-Za-z0-9_.-]+)", text))
        assert configured[name] and sent <= configured[name], (name, sent - configured[name])
    assert len(set(map(frozenset, configured.values()))) == 1, configured


def test_watch_registers_afresh_when_the_relay_forgot_its_agent(relay, shell, tmp_path):
    """The agent is removed (pruned) while `watch` runs: its token stops
    working, and watch registers again, keeps the new token and delivers."""
    env = dict(shell.base, AGENT_RELAY_URL=relay.url)
    proc = subprocess.Popen([sys.executable, SCRIPT, "watch", "--agent", "watcher", "--heartbeat", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    tokens = agent_relay.AgentTokens(os.path.join(env["XDG_STATE_HOME"], "agent-relay", "agents.json"))
    try:
        assert "watching as watcher" in proc.stderr.readline()
        first = tokens.get(relay.url, "watcher")
        assert first and relay.call("DELETE", "/api/agents/watcher").json == {"deleted": True}
        wait_until(lambda: relay.call("GET", "/api/agents/watcher").status == 200)
        wait_until(lambda: tokens.get(relay.url, "watcher") not in (None, first))
        message = relay.send("boss", "watcher", "after the reset")
        assert proc.stdout.readline() == "[msg:%d] from boss: after the reset\n" % message["id"]
    finally:
        proc.send_signal(2)
        assert proc.wait(15) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_tokens_kept_by_processes_at_the_same_time_are_all_kept(tmp_path):
    """Several hooks may register at once: none may lose another's token."""
    path = str(tmp_path / "agents.json")
    code = ("import sys, agent_relay\n"
            "tokens = agent_relay.AgentTokens(sys.argv[1])\n"
            "for i in range(20):\n"
            "    tokens.put('http://relay', '%s-%d' % (sys.argv[2], i), 'tok-%s-%d' % (sys.argv[2], i))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, path, "p%d" % n], cwd=os.path.dirname(SCRIPT))
             for n in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    kept = agent_relay.AgentTokens(path)
    assert all(kept.get("http://relay", "p%d-%d" % (n, i)) == "tok-p%d-%d" % (n, i)
               for n in range(4) for i in range(20))


# ---------------------------------------------------------------------------
# Found by an attacker's review of the merged identity work
# ---------------------------------------------------------------------------


def test_a_reply_never_opens_a_thread_the_caller_could_not_read(relay_factory):
    relay = relay_factory(token="admin-token")
    tokens = {name: register(relay, name) for name in ("alice", "bob", "carol")}
    private = relay.send("alice", "carol", "alice-carol private")
    r = as_agent(relay, tokens["bob"], "POST", "/api/messages", {"to": "bob", "body": "x", "replyTo": private["id"]})
    assert r.status == 403 and r.json["code"] == "not_your_agent" and r.json["field"] == "replyTo"
    # a thread shows an agent only the messages of it that concern it
    reply = as_agent(relay, tokens["carol"], "POST", "/api/messages",
                     {"to": "alice", "body": "carol answers", "replyTo": private["id"]}).json
    relay.send("alice", "bob", "alice tells bob", replyTo=reply["id"])
    seen = as_agent(relay, tokens["bob"], "GET", "/api/messages/%d/thread" % private["id"]).json["messages"]
    assert [m["body"] for m in seen] == ["alice tells bob"]
    everything = relay.call("GET", "/api/messages/%d/thread" % private["id"]).json["messages"]
    assert len(everything) == 3


def test_marking_a_message_read_needs_the_same_reach_as_reading_it(relay_factory):
    relay = relay_factory(token="admin-token", integrations=json.dumps([OPS]))
    alice, bob = register(relay, "alice", capabilities=["ops"]), register(relay, "bob")
    note = relay.send("alice", "alice", "note to self")
    r = as_agent(relay, bob, "PATCH", "/api/messages/%d" % note["id"], {"read": True})
    assert r.status == 403 and r.json["code"] == "not_your_agent" and "note to self" not in r.raw.decode()
    register(relay, "carol")
    hidden = relay.send("bob", "carol", "bob-carol")
    r = relay.call("PATCH", "/api/messages/%d" % hidden["id"], {"agentId": "alice", "read": True}, token=OPS["token"])
    assert r.status == 403 and r.json["code"] == "outside_reach"
    assert relay.call("GET", "/api/messages/%d/receipts" % hidden["id"]).json["receipts"][0]["readAt"] is None
    assert as_agent(relay, alice, "PATCH", "/api/messages/%d" % note["id"], {"read": True}).json["read"] is True


@pytest.mark.parametrize("how", ["rotate", "delete"])
def test_an_agents_open_stream_ends_when_its_token_is_rotated_or_the_agent_deleted(relay_factory, how):
    relay = relay_factory(token="admin-token", join_token="join-token-123")
    erin = register(relay, "erin")
    stream = relay.events("/api/events", headers={"Authorization": "Bearer " + erin})
    assert stream.status == 200
    relay.send("erin", "erin", "before")
    assert stream.take(1, types=("message.new",))[0]["data"]["body"] == "before"  # live, in the writer's hands
    if how == "rotate":
        assert relay.call("POST", "/api/agents/erin/token").status == 200
    else:
        assert relay.call("DELETE", "/api/agents/erin").status == 200
        register(relay, "erin", token="join-token-123")  # a new owner of the id
    relay.send("erin", "erin", "after the old token stopped working")
    received = []
    while True:
        event = stream.next_event(timeout=5)
        if event is None:
            break
        received.append(event)
    assert not any(e["event"] == "message.new" for e in received), received  # the stream ended first
    assert as_agent(relay, erin, "GET", "/api/events").status == 401
    stream.close()


def test_token_mode_without_an_admin_token_gives_callers_without_a_token_only_the_join_rights(relay_factory):
    relay = relay_factory(agent_identity="token")
    alice = register(relay, "alice")  # registering a new id stays open
    as_agent(relay, alice, "POST", "/api/messages", {"to": "alice", "body": "private"})
    assert relay.call("GET", "/api/agents").status == 200  # the directory
    for method, path in (("GET", "/api/messages"), ("GET", "/api/messages/1"), ("GET", "/api/messages/1/thread"),
                         ("GET", "/api/events?since=0"), ("DELETE", "/api/messages/1"),
                         ("POST", "/api/system/reap")):
        r = relay.call(method, path)
        assert r.status == 403 and r.json["code"] == "agent_token_required", (method, path, r)
    assert as_agent(relay, alice, "GET", "/api/messages/1").json["body"] == "private"


def test_an_integration_registers_agents_but_never_holds_their_tokens(relay_factory):
    relay = relay_factory(token="admin-token", integrations=json.dumps([OPS]))
    r = relay.call("POST", "/api/agents", {"id": "opsbot", "capabilities": ["ops"]}, token=OPS["token"])
    assert r.status == 201 and "agentToken" not in r.json
    token = register(relay, "opsbot", token="admin-token")  # the agent itself (here: admin) gets it
    assert token


def test_integration_callback_urls_are_shown_without_credentials(relay_factory):
    secret_url = dict(CI, callbackUrl="http://user:hunter2@127.0.0.1:9/hook?key=abc")
    relay = relay_factory(token="admin-token", integrations=json.dumps([secret_url]))
    listed = relay.call("GET", "/api/integrations").json["integrations"]
    assert [i["callbackUrl"] for i in listed if i["name"] == "ci"] == ["http://127.0.0.1:9/hook"]
    assert "hunter2" not in relay.call("GET", "/api/integrations").raw.decode()


def test_two_different_tokens_in_one_request_are_refused(relay_factory):
    relay = relay_factory(token="admin-token")
    r = relay.call("GET", "/api/stats", headers={"Authorization": "Bearer wrong",
                                                 "X-Agent-Relay-Token": "admin-token"}, token="")
    assert r.status == 401 and r.json["code"] == "invalid_token"
    same = {"Authorization": "Bearer admin-token", "X-Agent-Relay-Token": "admin-token"}
    assert relay.call("GET", "/api/stats", headers=same, token="").status == 200


def test_cli_reads_send_the_kept_agent_token_under_a_join_token(relay_factory, tmp_path):
    relay = relay_factory(token="admin-token", join_token="join-token-123")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env.update({"AGENT_RELAY_URL": relay.url, "AGENT_RELAY_TOKEN": "join-token-123", "AGENT_RELAY_ID": "me",
                "HOME": str(tmp_path)})

    def cli(*args):
        done = subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=60)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout
    cli("register")
    sent = json.loads(cli("send", "me", "hello", "--json"))
    assert "hello" in cli("thread", str(sent["id"]))
    cli("tasks")
    cli("pair", "list")
