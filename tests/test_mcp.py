"""The MCP endpoint (SPEC 11): raw JSON-RPC over HTTP, and the official MCP
Python SDK as a real client."""

import json
import threading

import pytest

import agent_relay


def rpc(relay, method, params=None, request_id=1, session=None, headers=None, token=None):
    message = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        message["id"] = request_id
    if params is not None:
        message["params"] = params
    headers = dict(headers or {}, Accept="application/json, text/event-stream")
    if session:
        headers["Mcp-Session-Id"] = session
    return relay.call("POST", "/mcp", message, headers=headers, token=token)


def initialize(relay, version="2025-06-18"):
    r = rpc(relay, "initialize", {"protocolVersion": version, "capabilities": {},
                                  "clientInfo": {"name": "test", "version": "1"}})
    assert r.status == 200, r
    return r


def tool(relay, session, name, arguments=None, request_id=7):
    r = rpc(relay, "tools/call", {"name": name, "arguments": arguments or {}}, request_id, session)
    assert r.status == 200, r
    result = r.json["result"]
    return result["isError"], json.loads(result["content"][0]["text"])


@pytest.mark.parametrize("asked,answered", [
    ("2024-11-05", "2024-11-05"), ("2025-03-26", "2025-03-26"), ("2025-06-18", "2025-06-18"),
    ("2025-11-25", "2025-11-25"), ("1999-01-01", "2025-11-25"), (None, "2025-11-25"),
])
def test_initialize_echoes_a_supported_version_and_opens_a_session(relay, asked, answered):
    r = rpc(relay, "initialize", {"protocolVersion": asked} if asked else {})
    result = r.json["result"]
    assert result["protocolVersion"] == answered
    assert result["capabilities"] == {"tools": {}}
    assert result["serverInfo"]["name"] == "agent-relay" and result["serverInfo"]["version"] == agent_relay.__version__
    assert r.headers["Content-Type"].startswith("application/json")
    assert len(r.headers["Mcp-Session-Id"]) >= 16


def test_notifications_answer_202_with_no_body(relay):
    session = initialize(relay).headers["Mcp-Session-Id"]
    r = rpc(relay, "notifications/initialized", request_id=None, session=session)
    assert r.status == 202 and r.raw == b""


def test_a_post_of_only_responses_answers_202_with_no_body(relay):
    session = initialize(relay).headers["Mcp-Session-Id"]
    headers = {"Accept": "application/json, text/event-stream", "Mcp-Session-Id": session}
    for body in ({"jsonrpc": "2.0", "id": 5, "result": {}},
                 {"jsonrpc": "2.0", "id": "x", "error": {"code": -32601, "message": "no"}},
                 [{"jsonrpc": "2.0", "id": 6, "result": {"roots": []}}, {"jsonrpc": "2.0", "id": 7, "result": {}}]):
        r = relay.call("POST", "/mcp", body, headers=headers)
        assert (r.status, r.raw) == (202, b""), body
    # a request without a method is still an invalid request
    r = relay.call("POST", "/mcp", {"jsonrpc": "2.0", "id": 8}, headers=headers)
    assert r.status == 200 and r.json["error"]["code"] == -32600


def test_inbox_limit_out_of_range_quotes_the_real_bound(relay):
    session = initialize(relay).headers["Mcp-Session-Id"]
    tool(relay, session, "register", {"id": "limited"})
    is_error, error = tool(relay, session, "inbox", {"limit": -1})
    assert is_error and error["field"] == "limit" and error["code"] == "out_of_range"
    assert "between 1 and 1000" in error["error"] and "4611686018427387904" not in error["error"]
    is_error, inbox = tool(relay, session, "inbox", {"limit": 5000})  # a larger one is capped, not refused
    assert not is_error and inbox["messages"] == []


def test_ping_tools_list_and_errors(relay):
    session = initialize(relay).headers["Mcp-Session-Id"]
    assert rpc(relay, "ping", session=session).json["result"] == {}
    tools = rpc(relay, "tools/list", session=session).json["result"]["tools"]
    names = {t["name"] for t in tools}
    assert {"register", "send", "inbox", "mark_read", "claim", "list_agents", "list_tasks", "claim_task",
            "update_task", "pair", "pair_accept", "pair_send", "pair_hangup"} <= names
    assert all(t["inputSchema"]["type"] == "object" and t["description"] for t in tools)
    assert rpc(relay, "no/such/method", session=session).json["error"]["code"] == -32601
    r = rpc(relay, "tools/call", {"name": "no_such_tool", "arguments": {}}, session=session)
    assert r.json["error"]["code"] == -32602
    r = relay.call("POST", "/mcp", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json["error"]["code"] == -32700


def test_get_is_405_with_allow_and_delete_ends_the_session(relay):
    r = relay.call("GET", "/mcp")
    assert r.status == 405 and r.headers["Allow"] == "DELETE, OPTIONS, POST"
    session = initialize(relay).headers["Mcp-Session-Id"]
    assert relay.call("DELETE", "/mcp", headers={"Mcp-Session-Id": session}).status == 204
    r = rpc(relay, "ping", session=session)
    assert r.status == 404 and r.json["code"] == "unknown_session"


def test_an_unsupported_protocol_version_header_is_400(relay):
    r = rpc(relay, "ping", headers={"MCP-Protocol-Version": "1999-01-01"})
    assert r.status == 400 and r.json["field"] == "MCP-Protocol-Version"
    assert rpc(relay, "ping", headers={"MCP-Protocol-Version": "2025-06-18"}).status == 200


def test_token_and_origin_rules_are_the_apis(relay_factory):
    relay = relay_factory(token="mcp-token")
    assert rpc(relay, "ping", token="").status == 401
    assert rpc(relay, "ping", token="wrong").status == 401
    assert rpc(relay, "ping").status == 200
    r = rpc(relay, "ping", headers={"Origin": "https://evil.example"})
    assert r.status == 403 and r.json["code"] == "origin_not_allowed"
    r = relay.call("POST", "/mcp", raw=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                   headers={"Content-Type": "text/plain"})
    assert r.status == 415


def test_an_integration_token_is_held_to_its_scopes(relay_factory):
    relay = relay_factory(integrations=json.dumps([{"name": "reader", "token": "reader-token-1",
                                                    "scopes": ["agents:read"]}]))
    relay.register("someone")
    session = initialize(relay).headers["Mcp-Session-Id"]
    headers = {"Authorization": "Bearer reader-token-1"}
    r = rpc(relay, "tools/call", {"name": "list_agents", "arguments": {}}, session=session, headers=headers)
    assert r.json["result"]["isError"] is False
    r = rpc(relay, "tools/call", {"name": "register", "arguments": {"id": "x"}}, session=session, headers=headers)
    error = json.loads(r.json["result"]["content"][0]["text"])
    assert r.json["result"]["isError"] is True and error["code"] == "insufficient_scope"


def test_tools_act_as_the_agent_bound_by_register(relay):
    relay.register("boss")
    session = initialize(relay).headers["Mcp-Session-Id"]
    is_error, error = tool(relay, session, "send", {"to": "boss", "body": "before register"})
    assert is_error and error["code"] == "no_agent"
    is_error, agent = tool(relay, session, "register", {"id": "mcp-agent", "capabilities": ["review"], "label": "m"})
    assert not is_error and agent["id"] == "mcp-agent" and agent["provider"] == "mcp"
    is_error, sent = tool(relay, session, "send", {"to": "boss", "body": "hello from MCP"})
    assert not is_error and sent["from"] == "mcp-agent"
    work = relay.send("boss", "cap:review", body="review please", claimable=True)
    is_error, inbox = tool(relay, session, "inbox", {"unread": True})
    assert [m["id"] for m in inbox["messages"]] == [work["id"]]
    is_error, claimed = tool(relay, session, "claim", {"messageId": work["id"]})
    assert not is_error and claimed["claimedBy"] == "mcp-agent"
    is_error, marked = tool(relay, session, "mark_read", {"ids": [work["id"]]})
    assert marked == {"marked": 1}
    is_error, agents = tool(relay, session, "list_agents", {"capability": "review"})
    assert [a["id"] for a in agents["agents"]] == ["mcp-agent"]
    is_error, error = tool(relay, session, "claim", {"messageId": "one"})
    assert is_error and error["field"] == "messageId"


def test_the_agent_header_names_the_agent_without_a_session(relay):
    relay.register("header-agent")
    relay.register("boss")
    r = rpc(relay, "tools/call", {"name": "send", "arguments": {"to": "boss", "body": "via header"}},
            headers={"X-Agent-Relay-Agent": "header-agent"})
    assert r.json["result"]["isError"] is False
    assert relay.inbox("boss")[0]["from"] == "header-agent"


def test_inbox_wait_long_polls(relay):
    relay.register("boss")
    session = initialize(relay).headers["Mcp-Session-Id"]
    tool(relay, session, "register", {"id": "waiter"})
    timer = threading.Timer(0.3, lambda: relay.send("boss", "waiter", body="arrived"))
    timer.start()
    try:
        is_error, inbox = tool(relay, session, "inbox", {"unread": True, "wait": 10})
    finally:
        timer.join()
    assert [m["body"] for m in inbox["messages"]] == ["arrived"]


def test_tasks_and_pairs_through_tools(relay):
    relay.register("peer", provider="codex")
    session = initialize(relay).headers["Mcp-Session-Id"]
    tool(relay, session, "register", {"id": "worker", "capabilities": ["ops"]})
    task = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full",
                                                           "target": "cap:ops"}).json["task"]
    is_error, tasks = tool(relay, session, "list_tasks", {"status": "open"})
    assert [t["id"] for t in tasks["tasks"]] == [task["id"]]
    is_error, claimed = tool(relay, session, "claim_task", {"taskId": task["id"], "leaseSeconds": 60})
    assert not is_error and claimed["claimedBy"] == "worker" and claimed["claimToken"]
    is_error, done = tool(relay, session, "update_task", {"taskId": task["id"], "status": "done", "result": "freed"})
    assert not is_error and done["status"] == "done" and done["result"] == "freed"
    is_error, pair = tool(relay, session, "pair", {"to": "codex", "objective": "debug"})
    assert not is_error and pair["to"] == "peer"
    relay.call("POST", "/api/pairs/%s/accept" % pair["id"], {"agentId": "peer"})
    is_error, message = tool(relay, session, "pair_send", {"pairId": pair["id"], "body": "what do you see?"})
    assert not is_error and message["to"] == "peer"
    is_error, ended = tool(relay, session, "pair_hangup", {"pairId": pair["id"]})
    assert ended["status"] == "ended"


def test_the_official_mcp_sdk_client_works_end_to_end(relay):
    pytest.importorskip("mcp")
    anyio = pytest.importorskip("anyio")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    relay.register("boss")
    found = {}

    async def session_flow():
        async with streamable_http_client(relay.url + "/mcp") as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                init = await session.initialize()
                found["version"] = init.protocol_version
                found["tools"] = [t.name for t in (await session.list_tools()).tools]
                result = await session.call_tool("register", {"id": "sdk-agent"})
                found["register_error"] = result.is_error
                await session.call_tool("send", {"to": "boss", "body": "hello from the SDK"})
                relay.send("boss", "sdk-agent", body="hello back")
                result = await session.call_tool("inbox", {"unread": True})
                found["inbox"] = json.loads(result.content[0].text)["messages"]
                result = await session.call_tool("claim", {"messageId": found["inbox"][0]["id"]})
                found["claim_error"] = json.loads(result.content[0].text)["code"] if result.is_error else None
                await session.send_ping()

    anyio.run(session_flow)
    assert found["version"] in agent_relay.MCP_PROTOCOL_VERSIONS
    assert "send" in found["tools"] and found["register_error"] is False
    assert [m["body"] for m in found["inbox"]] == ["hello back"]
    assert found["claim_error"] == "not_claimable"
    assert relay.inbox("boss")[0]["body"] == "hello from the SDK"


def test_an_error_reads_the_same_over_mcp_as_over_http(relay, monkeypatch):
    """One JSON form for a RelayError: retryAfter in camelCase, Allow only as an HTTP header."""
    def refuse(self, args, call):
        raise agent_relay.RelayError(503, "storage_unavailable", "Try again.", retry_after=2, allow="GET")
    monkeypatch.setattr(agent_relay.McpServer, "tool_inbox", refuse)
    session = initialize(relay).headers["Mcp-Session-Id"]
    assert tool(relay, session, "inbox") == (True, {"error": "Try again.", "code": "storage_unavailable",
                                                     "retryAfter": 2})
    r = relay.call("PUT", "/api/health")
    assert (r.status, r.headers["Allow"]) == (405, "GET, HEAD, OPTIONS") and "allow" not in r.json, r
