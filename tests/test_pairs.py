"""Pair sessions (SPEC 5): exclusive two-agent live chats over real HTTP."""

import threading

import pytest


@pytest.fixture
def agents(relay):
    relay.register("alice", label="Backend Fixer", provider="claude", tags=["backend"], capabilities=["chat"])
    relay.register("bob", label="Test Writer", provider="codex", tags=["tests"], capabilities=["chat", "review"])
    relay.register("carol", provider="codex", tags=["frontend"], machine="mac2")
    return relay


def invite(relay, sender, to, objective="Debug flaky auth tests"):
    return relay.call("POST", "/api/pairs", {"from": sender, "to": to, "objective": objective})


def test_invite_accept_chat_hangup(agents):
    r = invite(agents, "alice", "bob")
    assert r.status == 201
    pair = r.json
    assert pair["id"].startswith("p_") and len(pair["id"]) == 12
    assert (pair["from"], pair["to"], pair["status"]) == ("alice", "bob", "pending")
    assert pair["objective"] == "Debug flaky auth tests" and pair["acceptedAt"] is None
    invite_message = agents.inbox("bob")[-1]
    assert invite_message["kind"] == "pair" and invite_message["pairId"] == pair["id"]
    assert invite_message["id"] == pair["threadId"] and "Debug flaky auth tests" in invite_message["body"]
    assert "Accept with `agent-relay pair accept %s`" % pair["id"] in invite_message["body"]

    r = agents.call("POST", "/api/pairs/%s/accept" % pair["id"], {"agentId": "bob"})
    assert r.status == 200 and r.json["status"] == "active" and r.json["acceptedAt"]

    r = agents.call("POST", "/api/pairs/%s/messages" % pair["id"], {"from": "alice", "body": "What do you see?"})
    assert r.status == 201
    message = r.json
    assert (message["to"], message["kind"], message["pairId"]) == ("bob", "pair", pair["id"])
    assert message["threadId"] == pair["threadId"]
    assert message["id"] in [m["id"] for m in agents.inbox("bob")]
    assert message["id"] not in [m["id"] for m in agents.inbox("carol")]
    thread = agents.call("GET", "/api/messages/%d/thread" % message["id"]).json["messages"]
    assert thread[0]["id"] == pair["threadId"] and thread[-1]["id"] == message["id"]

    r = agents.call("POST", "/api/pairs/%s/hangup" % pair["id"], {"agentId": "bob", "reason": "fixed"})
    assert r.status == 200
    assert (r.json["status"], r.json["endedBy"], r.json["reason"]) == ("ended", "bob", "fixed")
    r = agents.call("POST", "/api/pairs/%s/messages" % pair["id"], {"from": "alice", "body": "still there?"})
    assert r.status == 409 and r.json["code"] == "invalid_state"


def test_reject(agents):
    pair = invite(agents, "alice", "bob").json
    r = agents.call("POST", "/api/pairs/%s/reject" % pair["id"], {"agentId": "bob", "reason": "busy with CI"})
    assert r.status == 200 and r.json["status"] == "rejected" and r.json["reason"] == "busy with CI"
    assert any("declined" in m["body"] for m in agents.inbox("alice"))
    assert agents.call("POST", "/api/pairs/%s/accept" % pair["id"], {"agentId": "bob"}).status == 409


def test_get_and_list_pairs(agents):
    first = invite(agents, "alice", "bob").json
    agents.register("dave")
    agents.register("erin")
    second = invite(agents, "dave", "erin").json
    assert agents.call("GET", "/api/pairs/%s" % first["id"]).json == first
    assert agents.call("GET", "/api/pairs/p_nothing").status == 404
    everything = agents.call("GET", "/api/pairs").json["pairs"]
    assert {p["id"] for p in everything} == {first["id"], second["id"]}
    assert [p["id"] for p in agents.call("GET", "/api/pairs?agent=bob").json["pairs"]] == [first["id"]]
    agents.call("POST", "/api/pairs/%s/accept" % second["id"], {"agentId": "erin"})
    assert [p["id"] for p in agents.call("GET", "/api/pairs?status=active").json["pairs"]] == [second["id"]]
    assert agents.call("GET", "/api/pairs?status=weird").json["field"] == "status"


@pytest.mark.parametrize("to,expected", [
    ("bob", "bob"),                    # exact id
    ("id:carol", "carol"),
    ("label:test writer", "bob"),
    ("tag:frontend", "carol"),
    ("cap:review", "bob"),
    ("machine:mac2", "carol"),
    ("Test Writer", "bob"),            # bare word: label
    ("frontend", "carol"),             # bare word: tag
    ("review", "bob"),                 # bare word: capability
    ("claude", None),                  # only alice is claude, and she is the inviter
])
def test_target_resolution(agents, to, expected):
    r = invite(agents, "alice", to)
    if expected is None:
        assert r.status == 404 and r.json["code"] == "no_match"
    else:
        assert r.status == 201, r
        assert r.json["to"] == expected


def test_ambiguous_target_lists_candidates(agents):
    r = invite(agents, "alice", "codex")
    assert r.status == 409 and r.json["code"] == "ambiguous_target"
    assert sorted(c["id"] for c in r.json["candidates"]) == ["bob", "carol"]
    assert {"id": "bob", "label": "Test Writer"} in r.json["candidates"]


def test_offline_agents_do_not_count(agents):
    agents.call("PATCH", "/api/agents/bob", {"status": "offline"})
    r = invite(agents, "alice", "codex")
    assert r.status == 201 and r.json["to"] == "carol"
    r = invite(agents, "carol", "bob")
    assert r.status == 404 and r.json["code"] == "no_match"


def test_busy_either_side(agents):
    agents.register("dave")
    pair = invite(agents, "alice", "bob").json
    r = invite(agents, "carol", "bob")
    assert r.status == 409 and r.json["code"] == "busy"
    r = invite(agents, "alice", "carol")
    assert r.status == 409 and r.json["code"] == "busy"
    agents.call("POST", "/api/pairs/%s/hangup" % pair["id"], {"agentId": "alice"})
    assert invite(agents, "carol", "bob").status == 201


def test_only_members_act(agents):
    pair = invite(agents, "alice", "bob").json
    path = "/api/pairs/%s/" % pair["id"]
    r = agents.call("POST", path + "accept", {"agentId": "carol"})
    assert r.status == 403 and r.json["code"] == "not_a_member"
    r = agents.call("POST", path + "accept", {"agentId": "alice"})  # the inviter cannot accept for bob
    assert r.status == 403 and r.json["code"] == "not_a_member"
    agents.call("POST", path + "accept", {"agentId": "bob"})
    r = agents.call("POST", path + "messages", {"from": "carol", "body": "let me in"})
    assert r.status == 403 and r.json["code"] == "not_a_member"
    r = agents.call("POST", path + "hangup", {"agentId": "carol"})
    assert r.status == 403


@pytest.mark.parametrize("body,field", [
    ({"to": "bob"}, "from"),
    ({"from": "alice"}, "to"),
    ({"from": "alice", "to": "bob", "objective": 5}, "objective"),
    ({"from": "alice", "to": ""}, "to"),
])
def test_bad_invites_are_400_and_change_nothing(agents, body, field):
    before = agents.snapshot()
    r = agents.call("POST", "/api/pairs", body)
    assert r.status == 400 and r.json["field"] == field
    assert agents.snapshot() == before
    assert agents.call("GET", "/api/pairs").json["pairs"] == []


def test_unknown_inviter_is_404(agents):
    r = invite(agents, "ghost", "bob")
    assert r.status == 404 and r.json["code"] == "unknown_agent"


def test_racing_invites_to_one_target_make_exactly_one_pair(relay):
    inviters = ["inviter%d" % i for i in range(16)]
    for agent in inviters:
        relay.register(agent)
    relay.register("target", tags=["popular"])
    barrier = threading.Barrier(len(inviters))
    results = []

    def race(agent):
        barrier.wait()
        results.append(relay.call("POST", "/api/pairs", {"from": agent, "to": "target"}))
    threads = [threading.Thread(target=race, args=(a,)) for a in inviters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == [201] + [409] * (len(inviters) - 1)
    assert all(r.json["code"] == "busy" for r in results if r.status == 409)
    assert len(relay.call("GET", "/api/pairs?status=pending").json["pairs"]) == 1


def test_reaper_expires_invites_and_ends_pairs_with_an_offline_member(relay_factory, clock):
    relay = relay_factory(clock=clock, pair_invite_ttl_ms=60000, stale_ttl_ms=300000)
    for agent in ("a", "b", "c", "d"):
        relay.register(agent)
    stream = relay.events("/api/events?types=pair.expired,pair.ended")
    try:
        pending = invite(relay, "a", "b").json
        active = invite(relay, "c", "d").json
        relay.call("POST", "/api/pairs/%s/accept" % active["id"], {"agentId": "d"})
        clock.advance(61)
        relay.call("POST", "/api/agents/c/heartbeat")
        relay.call("POST", "/api/agents/d/heartbeat")
        assert relay.call("POST", "/api/system/reap").status == 200
        assert relay.call("GET", "/api/pairs/%s" % pending["id"]).json["status"] == "expired"
        assert relay.call("GET", "/api/pairs/%s" % active["id"]).json["status"] == "active"
        relay.call("PATCH", "/api/agents/d", {"status": "offline"})
        relay.call("POST", "/api/system/reap")
        ended = relay.call("GET", "/api/pairs/%s" % active["id"]).json
        assert (ended["status"], ended["endedBy"], ended["reason"]) == ("ended", "relay", "member_offline")
        events = stream.take(2)
        assert [e["event"] for e in events] == ["pair.expired", "pair.ended"]
        assert events[0]["data"]["id"] == pending["id"] and events[1]["data"]["id"] == active["id"]
    finally:
        stream.close()


def test_pair_events_reach_members_only(agents):
    alice = agents.events("/api/events?for=alice&types=pair.created,pair.accepted")
    carol = agents.events("/api/events?for=carol&types=pair.created,message.new")
    try:
        pair = invite(agents, "alice", "bob").json
        agents.call("POST", "/api/pairs/%s/accept" % pair["id"], {"agentId": "bob"})
        assert [e["event"] for e in alice.take(2)] == ["pair.created", "pair.accepted"]
        agents.send("bob", "carol", body="marker")
        assert carol.take(1)[0]["data"]["body"] == "marker"  # nothing of the pair came first
    finally:
        alice.close()
        carol.close()
