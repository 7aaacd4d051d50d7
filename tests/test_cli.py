"""The client side: RelayClient, configuration and profiles, the CLI as a
real subprocess against a real relay, `watch`, setup, daemon and upgrade."""

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest

import agent_relay
from conftest import SCRIPT, free_port, wait_until


@pytest.fixture
def cli(relay, tmp_path):
    """Run `agent_relay.py ARGS` as a subprocess of one session against `relay`."""
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AGENT_RELAY_", "CLAUDE_CODE_")) and k not in agent_relay.PROVIDER_SESSION_VARS}
    base_env.update({"AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "config"),
                     "XDG_STATE_HOME": str(tmp_path / "state"),
                     "XDG_DATA_HOME": str(tmp_path / "data"), "AGENT_RELAY_SESSION": "session-1",
                     "HOME": str(tmp_path / "home")})
    workdir = tmp_path / "myproject"
    workdir.mkdir()

    def run(*args, stdin=None, env=None, check=True):
        full_env = dict(base_env, **(env or {}))
        done = subprocess.run([sys.executable, SCRIPT] + list(args), input=stdin, capture_output=True, text=True,
                              env=full_env, cwd=str(workdir), timeout=60)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done
    run.env = base_env
    run.cwd = str(workdir)
    run.relay = relay
    return run


# ---------------------------------------------------------------------------
# RelayClient
# ---------------------------------------------------------------------------


def test_client_methods_and_errors(relay):
    client = agent_relay.RelayClient(relay.url)
    assert client.health()["status"] == "ok"
    assert client.register(id="a", capabilities=["review"])["id"] == "a"
    client.register(id="b")
    message = client.send("b", "cap:review", "please", claimable=True)
    assert [m["id"] for m in client.messages("a", unread=True)] == [message["id"]]
    assert client.claim(message["id"], "a")["claimedBy"] == "a"
    with pytest.raises(agent_relay.RelayError) as caught:
        client.claim(message["id"], "b")
    error = caught.value
    assert (error.status, error.code) == (409, "already_claimed")
    assert error.message == "Message %d was already claimed by a." % message["id"]
    assert client.mark_read_bulk("a", ids=[message["id"]]) == 1
    assert client.receipts(message["id"])[0]["readAt"]
    assert client.cursor() == message["id"]
    assert [a["id"] for a in client.find_agents("review")] == ["a"]


def test_client_reports_an_unreachable_relay(tmp_path):
    client = agent_relay.RelayClient("http://127.0.0.1:%d" % free_port(), timeout=2)
    with pytest.raises(agent_relay.RelayError) as caught:
        client.health()
    assert caught.value.code == "unreachable" and "Cannot reach the relay" in caught.value.message


class RawAnswer:
    """A loopback listener that answers each connection with fixed bytes
    (what a relay, a proxy or another service might send), then closes."""

    def __init__(self, answer):
        """`answer`: the bytes to send, or a function given the connection."""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.url = "http://127.0.0.1:%d" % self.address[1]
        self.requests = []
        self.thread = threading.Thread(target=self.serve, args=(answer,))
        self.thread.start()

    def serve(self, answer):
        with self.listener:
            conn, _ = self.listener.accept()
            conn.settimeout(5)
            with conn, conn.makefile("rb") as stream:
                head = b""
                for line in stream:  # the request's head, up to its blank line
                    head += line
                    if line == b"\r\n":
                        break
                if head:
                    self.requests.append(head)
                    with contextlib.suppress(OSError):  # the client may hang up first, as it should on junk
                        answer(conn) if callable(answer) else conn.sendall(answer)

    def close(self):
        if not self.requests:  # nothing came: wake the accept (closing the socket would not)
            socket.create_connection(self.address, timeout=5).close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ok\"\r\n6;x=1\r\n: 1}\n\n\r\n0\r\n\r\n",
     {"ok": 1}),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 12\r\n\r\n", None),
    (b"HTTP/1.0 200 OK\r\n\r\n[1, 2]", [1, 2]),  # no length: the body runs to the end
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", {}),  # interim answers come before the answer
])
def test_client_reads_chunked_empty_and_unframed_answers(answer, expected):
    server = RawAnswer(answer)
    try:
        assert agent_relay.RelayClient(server.url, token="t-1", timeout=5).request("GET", "/x") == expected
        head = server.requests[0].decode()
        assert head.startswith("GET /api/x HTTP/1.1\r\n") and "Authorization: Bearer t-1\r\n" in head
    finally:
        server.close()


@pytest.mark.parametrize("answer, code", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "unreachable"),  # the wrong port
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"cut\"", "unreachable"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "unreachable"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n{}", "unreachable"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000000\r\n\r\n{}", "unreachable"),  # allocates nothing
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffff\r\n{}", "unreachable"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}}\r\n0\r\n\r\n", "unreachable"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: %s\r\n" % (b"x" * 200) * 400, "unreachable"),  # an endless head
    (b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>hi</html>", "unreachable"),  # not the relay
    (b"HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1/\r\nContent-Length: 0\r\n\r\n", "http_302"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\n\r\nupstream!", "http_502"),
])
def test_client_refuses_broken_and_redirected_answers_without_following(answer, code):
    server = RawAnswer(answer)
    try:
        with pytest.raises(agent_relay.RelayError) as caught:
            agent_relay.RelayClient(server.url, timeout=5).health()
        assert caught.value.code == code
        assert len(server.requests) == 1  # a redirect is reported, never followed
    finally:
        server.close()


def test_a_redirect_says_where_it_points_and_a_stream_does_not_retry_it():
    server = RawAnswer(b"HTTP/1.1 301 Moved\r\nLocation: https://relay.example/\r\nContent-Length: 0\r\n\r\n")
    try:
        with pytest.raises(agent_relay.RelayError) as caught:
            next(agent_relay.RelayClient(server.url, timeout=5).events())
        assert caught.value.status == 301 and "https://relay.example/" in caught.value.message
    finally:
        server.close()


def test_a_stream_without_chunks_delivers_each_event_as_it_arrives():
    delivered = threading.Event()
    in_time = []

    def stream(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     b"id: 1\nevent: message\ndata: {\"n\": 1}\n\n")
        in_time.append(delivered.wait(10))
        conn.sendall(b"id: 2\nevent: message\ndata: {\"n\": 2}\n\n")
    server = RawAnswer(stream)
    try:
        events = agent_relay.RelayClient(server.url, timeout=15).events()
        assert next(events)["data"] == {"n": 1}  # before the second is even sent
        delivered.set()
        assert next(events)["data"] == {"n": 2}
        assert in_time == [True]
    finally:
        delivered.set()
        server.close()


def test_a_token_with_a_line_break_is_never_sent():
    server = RawAnswer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    try:
        with pytest.raises(agent_relay.RelayError) as caught:
            agent_relay.RelayClient(server.url, token="t\r\nX-Admin: 1", timeout=5).health()
        assert "line break" in caught.value.message
    finally:
        server.close()
    assert server.requests == []


def test_client_sends_the_token(relay_factory):
    relay = relay_factory(token="tok-123")
    assert agent_relay.RelayClient(relay.url, token="tok-123").stats()["version"]
    with pytest.raises(agent_relay.RelayError) as caught:
        agent_relay.RelayClient(relay.url, token="nope").stats()
    assert caught.value.status == 401


def test_a_url_without_a_scheme_and_a_missing_token_are_understood(cli, relay_factory):
    """`AGENT_RELAY_URL=localhost:4850` (as the curl examples write it) works;
    a relay that needs a token says how to give one."""
    bare = cli.relay.url.split("://", 1)[1]
    assert json.loads(cli("stats", "--json", env={"AGENT_RELAY_URL": bare}).stdout)["version"]
    assert agent_relay.RelayClient(bare).stats()["version"]
    guarded = relay_factory(token="tok-123")
    done = cli("stats", env={"AGENT_RELAY_URL": guarded.url}, check=False)
    assert done.returncode == 1 and "set AGENT_RELAY_TOKEN or pass --token" in done.stderr


def test_events_generator_reconnects_and_resumes_across_a_restart(relay_factory, tmp_path):
    port, db = free_port(), str(tmp_path / "restart.db")
    first = relay_factory(port=port, db_path=db)
    first.register("a")
    client = agent_relay.RelayClient(first.url)
    stop = threading.Event()
    seen = []

    def follow():
        for event in client.events(for_agent="a", types=["message.new"], stop=stop, max_backoff=0.2):
            seen.append(event["data"]["body"])
    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        wait_until(lambda: first.call("GET", "/api/stats").json["sseClients"] == 1)
        first.send("x", "a", body="one")
        wait_until(lambda: seen == ["one"])
        first.server.stop()
        second = relay_factory(port=port, db_path=db)
        second.send("x", "a", body="two")  # sent while the client was still reconnecting
        second.send("x", "a", body="three")
        wait_until(lambda: len(seen) >= 3)
        assert seen == ["one", "two", "three"]
    finally:
        stop.set()
        reader.join(5)


# ---------------------------------------------------------------------------
# Configuration, profiles, identity
# ---------------------------------------------------------------------------


def test_profiles_with_explicit_env_winning(tmp_path):
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"backend-tester": {
        "label": "backend tester", "tags": ["backend", "api"], "capabilities": ["chat", "test"],
        "channels": ["backend", "qa"], "approval": "guarded", "meta": {"role": "backend-tester"}}}))
    env = {"AGENT_RELAY_PROFILE": "backend-tester", "AGENT_RELAY_PROFILES_FILE": str(profiles)}
    config = agent_relay.ClientConfig(env, cwd=str(tmp_path))
    assert (config.label, config.capabilities, config.channels, config.approval) == (
        "backend tester", ["chat", "test"], ["backend", "qa"], "guarded")
    assert config.meta == {"role": "backend-tester"}
    config = agent_relay.ClientConfig(dict(env, AGENT_RELAY_LABEL="mine", AGENT_RELAY_CAPS="review",
                                           AGENT_RELAY_TAGS="extra", AGENT_RELAY_CHANNELS="all",
                                           AGENT_RELAY_APPROVAL="read-only"), cwd=str(tmp_path))
    assert (config.label, config.capabilities, config.channels, config.approval) == (
        "mine", ["review"], [], "read-only")
    assert config.tags == ["backend", "api", "extra"]  # extra tags add to the profile's


def test_defaults_without_profile(tmp_path):
    config = agent_relay.ClientConfig({}, cwd=str(tmp_path))
    assert config.url == "http://localhost:4850" and config.capabilities == ["chat"]
    assert config.channels == [] and config.approval == "open" and config.tags == []


def test_a_missing_profile_is_a_clear_error(tmp_path):
    with pytest.raises(agent_relay.RelayError) as caught:
        agent_relay.ClientConfig({"AGENT_RELAY_PROFILE": "nope",
                                  "AGENT_RELAY_PROFILES_FILE": str(tmp_path / "none.json")})
    assert "Cannot read profiles file" in caught.value.message


def test_deterministic_agent_ids(tmp_path):
    first = agent_relay.deterministic_agent_id(str(tmp_path / "myproject"), "s1", hostname="macmini2.local")
    assert first == agent_relay.deterministic_agent_id(str(tmp_path / "myproject"), "s1", hostname="macmini2.local")
    assert first.startswith("macmini2.local-myproject-") and len(first.rsplit("-", 1)[1]) == 6
    assert first != agent_relay.deterministic_agent_id(str(tmp_path / "myproject"), "s2", hostname="macmini2.local")
    assert agent_relay.valid_agent_id(first)


# ---------------------------------------------------------------------------
# The CLI against a real relay
# ---------------------------------------------------------------------------


def test_register_remembers_the_agent_for_the_session(cli):
    out = cli("register", "--label", "backend fixer", "--caps", "chat,review").stdout
    agent_id = out.split()[1]
    assert agent_id == agent_relay.deterministic_agent_id(cli.cwd, "session-1")
    agent = cli.relay.call("GET", "/api/agents/" + agent_id).json
    assert agent["label"] == "backend fixer" and agent["capabilities"] == ["chat", "review"]
    assert agent["machine"] and agent["project"] == "myproject" and agent["provider"] == "cli"
    cli.relay.register("peer")
    assert cli("send", "peer", "hello", "there").stdout.startswith("sent [msg:1] to peer (1 recipient)")
    assert cli.relay.inbox("peer")[0]["from"] == agent_id
    # explicit --from wins over the session's id
    cli("send", "peer", "as someone else", "--from", "ghostwriter")
    assert cli.relay.inbox("peer")[-1]["from"] == "ghostwriter"
    # another session is another agent, which has not registered (SPEC 10)
    done = cli("inbox", env={"AGENT_RELAY_SESSION": "session-2"}, check=False)
    assert done.returncode == 1 and agent_relay.deterministic_agent_id(cli.cwd, "session-2") in done.stderr


def test_another_session_in_the_same_project_registers_as_another_agent(cli):
    """README: ids are `{hostname}-{project}-{sessionhash}`. A second terminal
    in the same project must not take over the first one's agent (commands
    still fall back to the project's agent; `register` does not)."""
    first = cli("register", "--label", "first").stdout.split()[1]
    second = cli("register", "--label", "second", env={"AGENT_RELAY_SESSION": "session-2"}).stdout.split()[1]
    assert second == agent_relay.deterministic_agent_id(cli.cwd, "session-2") != first
    assert cli.relay.call("GET", "/api/agents/" + first).json["label"] == "first"
    assert cli("register", env={"AGENT_RELAY_SESSION": "session-2"}).stdout.split()[1] == second


def test_registering_again_keeps_what_this_configuration_leaves_unset(cli):
    """`register --caps/--tags/--channels/--approval` set the agent up; a later
    `watch` (or `register --label`) with nothing configured must not reset
    them to the defaults; a new agent still starts with capability `chat`."""
    agent_id = cli("register", "--caps", "chat,review", "--tags", "web", "--channels", "dev",
                   "--approval", "guarded").stdout.split()[1]
    cli("register", "--label", "backend fixer")
    proc = start_watch(cli, env={"AGENT_RELAY_ID": agent_id}, agent=agent_id)
    try:
        agent = cli.relay.call("GET", "/api/agents/" + agent_id).json
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()
    assert (agent["capabilities"], agent["tags"], agent["channels"], agent["approval"], agent["label"]) == (
        ["chat", "review"], ["web"], ["dev"], "guarded", "backend fixer")
    # What the environment does set still applies on the next registration.
    cli("register", env={"AGENT_RELAY_CAPS": "ops"})
    assert cli.relay.call("GET", "/api/agents/" + agent_id).json["capabilities"] == ["ops"]
    fresh = cli("register", env={"AGENT_RELAY_SESSION": "session-3"}).stdout.split()[1]
    assert cli.relay.call("GET", "/api/agents/" + fresh).json["capabilities"] == ["chat"]


def test_agent_relay_id_env_names_the_agent(cli):
    cli.relay.register("explicit")
    cli.relay.register("peer")
    cli("send", "peer", "hi", env={"AGENT_RELAY_ID": "explicit"})
    assert cli.relay.inbox("peer")[0]["from"] == "explicit"


def test_send_options_and_stdin(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me")
    cli.relay.register("peer", tags=["backend"], channels=["alerts"])
    cli("send", "tag:backend", "claim me", "--claimable", "--channel", "alerts", "--subject", "job")
    message = cli.relay.inbox("peer")[0]
    assert message["claimable"] and message["channel"] == "alerts" and message["subject"] == "job"
    cli("send", "peer", "a reply", "--reply-to", str(message["id"]))
    assert cli.relay.inbox("peer")[-1]["threadId"] == message["id"]
    cli("send", "peer", "-", stdin="line one\nline two\n")
    assert cli.relay.inbox("peer")[-1]["body"] == "line one\nline two\n"


def test_inbox_read_claim_thread(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me", "--caps", "review")
    cli.relay.register("boss")
    first = cli.relay.send("boss", "me", body="first")
    work = cli.relay.send("boss", "cap:review", body="review this", claimable=True)
    out = cli("inbox").stdout.splitlines()
    assert out == ["[msg:%d] from boss: first (unread)" % first["id"],
                   "[msg:%d] from boss: review this (claimable: agent-relay claim %d) (unread)" % (
                       work["id"], work["id"])]
    data = json.loads(cli("inbox", "--unread", "--json").stdout)
    assert [m["id"] for m in data] == [first["id"], work["id"]]
    assert cli("read", str(first["id"])).stdout.strip() == "marked 1 message read"
    assert cli("read", "999").stdout.strip() == "marked 0 messages read (already read, or not in me's inbox)"
    assert [m["id"] for m in cli.relay.inbox("me", unread="true")] == [work["id"]]
    assert cli("claim", str(work["id"])).stdout.startswith("claimed [msg:%d]" % work["id"])
    cli("inbox", "--unread", "--mark-read")
    assert cli.relay.inbox("me", unread="true") == []
    cli.relay.send("me", "boss", body="answer", replyTo=first["id"])
    assert cli("thread", str(first["id"])).stdout.splitlines()[1].endswith("from me: answer")


def test_errors_print_the_servers_text_on_one_line_and_exit_non_zero(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me")
    cli.relay.register("boss")
    work = cli.relay.send("boss", "broadcast", claimable=True)
    cli.relay.call("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "boss"})
    done = cli("claim", str(work["id"]), check=False)
    assert done.returncode == 1
    assert done.stderr == "agent-relay: Message %d was already claimed by boss.\n" % work["id"]
    done = cli("send", "nobody", "hi", check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "nobody" in done.stderr
    done = cli("send", check=False)
    assert done.returncode == 2 and "error" in done.stderr


def test_agents_tasks_stats_status_label_tags_disconnect(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me", "--label", "first label")
    cli.relay.register("other", tags=["x"])
    lines = cli("agents").stdout.splitlines()
    assert any(line.startswith("● me online label='first label'") for line in lines)
    assert len(json.loads(cli("agents", "--tag", "x", "--json").stdout)) == 1
    assert "agents: 2 (2 online" in cli("stats").stdout
    assert cli("status").stdout.splitlines()[0].startswith("relay %s: ok" % cli.relay.url)
    assert cli("status", "busy").stdout.strip() == "me is now busy"
    assert cli("label", "backend", "fixer").stdout.strip() == "me label: backend fixer"
    assert cli("label").stdout.strip() == "me label: (none)"
    assert cli("tags", "api", "tests").stdout.strip() == "me tags: api, tests"
    assert cli("tasks").stdout.strip() == "no tasks"
    assert cli("disconnect").stdout.strip() == "me is offline"
    assert cli.relay.call("GET", "/api/agents/me").json["status"] == "offline"


def test_agents_says_when_no_agent_matches_and_shows_relative_times(cli):
    assert cli("agents").stdout.strip() == "no agents yet: run `agent-relay register` in a session"
    cli.relay.register("me")
    assert cli("agents", "--tag", "nonexistent").stdout.strip() == "no agent matches tag=nonexistent"
    line = cli("agents").stdout.strip()
    assert line.endswith(("(seen just now)", "s ago)")) and "T" not in line.split("(seen")[1]


def test_ago_says_times_as_people_do():
    now = 1800000000
    stamp = agent_relay.iso(now * 1000)
    assert [agent_relay.ago(stamp, now + d) for d in (0, 42, 300, 7200, 3 * 86400)] == [
        "just now", "42s ago", "5m ago", "2h ago", "3d ago"]
    assert agent_relay.ago(None) == "never"


def test_task_commands(cli):
    cli.env["AGENT_RELAY_ID"] = "ops1"  # SPEC 10: who later commands act as
    cli("register", "--id", "ops1", "--caps", "ops")
    r = cli.relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full", "target": "cap:ops",
                                                            "severity": "critical"})
    task_id = r.json["task"]["id"]
    assert "[task:%d] open critical disk full -> cap:ops" % task_id in cli("tasks", "--status", "active").stdout
    out = cli("task", "claim", str(task_id), "--lease", "60").stdout
    assert out.startswith("claimed [task:%d] until " % task_id) and "claimToken ct_" in out
    cli("task", "status", str(task_id), "in_progress", "--progress", "cleaning /var/log")
    out = cli("task", "status", str(task_id), "done", "--result", '{"freed": "20G"}', "--note", "rotated logs").stdout
    assert out.startswith("[task:%d] done by ops1" % task_id)
    assert cli.relay.call("GET", "/api/tasks/%d" % task_id).json["result"] == {"freed": "20G"}
    events = cli("task", "events", str(task_id)).stdout.splitlines()
    assert [line.split()[1] for line in events] == ["created", "claimed", "status", "status"]
    # The shared options work after the action too, and before it as ever.
    second = cli.relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "cpu", "target": "cap:ops"})
    cli.relay.register("ops2", capabilities=["ops"])
    second_id = second.json["task"]["id"]
    assert cli("task", "claim", str(second_id), "--agent", "ops2").stdout.startswith("claimed [task:%d]" % second_id)
    history = json.loads(cli("task", "--agent", "ops2", "events", str(second_id), "--json").stdout)
    assert history[-1]["type"] == "claimed"
    assert cli.relay.call("GET", "/api/tasks/%d" % second_id).json["claimedBy"] == "ops2"


def test_task_status_without_a_change_shows_the_task(cli):
    r = cli.relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full", "target": "cap:ops"})
    task_id = r.json["task"]["id"]
    out = cli("task", "status", str(task_id)).stdout
    assert out.strip() == "[task:%d] open disk full -> cap:ops" % task_id
    assert cli.relay.call("GET", "/api/tasks/%d/events" % task_id).json["events"][-1]["type"] == "created"


def test_pair_show_prints_the_whole_pair_and_list_shows_only_mine(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me")
    for agent in ("codex-1", "x", "y"):
        cli.relay.register(agent)
    pair_id = cli("pair", "invite", "codex-1", "--objective", "Debug flaky auth tests").stdout.split()[4]
    others = cli.relay.call("POST", "/api/pairs", {"from": "x", "to": "y"}).json["id"]
    cli("pair", "accept", pair_id, "--agent", "codex-1")
    shown = cli("pair", "show", pair_id).stdout.splitlines()
    assert shown[0] == "[pair:%s] active me -> codex-1: Debug flaky auth tests" % pair_id
    assert [line.split(":")[0].strip() for line in shown[1:]] == ["objective", "created", "accepted", "thread"]
    assert cli("pair", "list").stdout.splitlines() == [shown[0]]
    everyone = cli("pair", "list", "--all").stdout
    assert pair_id in everyone and others in everyone
    assert others in cli("pair", "list", "--with", "x").stdout


def test_pair_commands_and_slash_aliases(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me")
    cli.relay.register("codex-1", provider="codex")
    out = cli("/pair", "codex", "Debug flaky auth tests").stdout
    pair_id = out.split()[4]
    assert out.startswith("invited codex-1 to pair p_")
    pair = cli.relay.call("GET", "/api/pairs/" + pair_id).json
    assert pair["objective"] == "Debug flaky auth tests"
    cli("pair", "accept", pair_id, "--agent", "codex-1")
    assert cli("pair", "send", pair_id, "What do you see?").stdout.startswith("sent [msg:")
    assert cli.relay.inbox("codex-1")[-1]["body"] == "What do you see?"
    cli("pair", "send", pair_id, "--from", "codex-1", "--body", "a stack trace")
    assert "active me -> codex-1: Debug flaky auth tests" in cli("pair", "list").stdout
    assert cli("pair", "hangup", pair_id, "--reason", "done").stdout.startswith("[pair:%s] ended" % pair_id)
    second = cli("pair", "codex", "--objective", "again").stdout.split()[4]
    assert cli("pair", "reject", second, "--agent", "codex-1").stdout.startswith("[pair:%s] rejected" % second)


def test_slash_aliases_message_send_claimable_status_label_tags_disconnect(cli):
    cli.env["AGENT_RELAY_ID"] = "me"  # SPEC 10: who later commands act as
    cli("register", "--id", "me")
    cli.relay.register("peer", tags=["backend"])
    cli("/message", "peer", "Can you look at that failing action?")
    assert cli.relay.inbox("peer")[-1]["body"] == "Can you look at that failing action?"
    cli("/send-claimable", "tag:backend", "Please claim and fix the failing API test")
    message = cli.relay.inbox("peer")[-1]
    assert message["claimable"] and message["body"] == "Please claim and fix the failing API test"
    cli("/label", "backend-fixer")
    cli("/agent-relay:tags", "backend", "tests", "urgent")
    agent = cli.relay.call("GET", "/api/agents/me").json
    assert agent["label"] == "backend-fixer" and agent["tags"] == ["backend", "tests", "urgent"]
    assert "relay " in cli("/status").stdout
    cli("/disconnect")
    assert cli.relay.call("GET", "/api/agents/me").json["status"] == "offline"


# ---------------------------------------------------------------------------
# watch
# ---------------------------------------------------------------------------


def start_watch(cli, *args, env=None, agent="watcher"):
    """`watch` with SIGINT ignored, as a script's background job starts it: SIGINT still stops it."""
    full_env = dict(cli.env, **(env or {}))
    proc = subprocess.Popen([sys.executable, SCRIPT, "watch", "--agent", agent, "--heartbeat", "0.2"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cli.cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "watching as %s" % agent in proc.stderr.readline()
    return proc


def test_watch_prints_marks_read_and_goes_offline_on_sigint(cli):
    cli.relay.register("boss")
    cli.relay.register("watcher")
    early = cli.relay.send("boss", "watcher", body="sent before watch started")
    proc = start_watch(cli)
    try:
        assert proc.stdout.readline() == "[msg:%d] from boss: sent before watch started\n" % early["id"]
        live = cli.relay.send("boss", "watcher", body="live one")
        assert proc.stdout.readline() == "[msg:%d] from boss: live one\n" % live["id"]
        cli.relay.send("watcher", "boss", body="my own message is not echoed")
        group = cli.relay.send("boss", "broadcast", body="to everyone\nsecond line")
        assert proc.stdout.readline() == "[msg:%d] from boss: to everyone | second line\n" % group["id"]
        wait_until(lambda: cli.relay.inbox("watcher", unread="true") == [])
        assert cli.relay.call("GET", "/api/agents/watcher").json["status"] == "online"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()
    assert cli.relay.call("GET", "/api/agents/watcher").json["status"] == "offline"


def test_watch_prints_tasks_and_pair_invites_in_one_line(cli):
    cli.relay.register("inviter")
    proc = start_watch(cli, env={"AGENT_RELAY_CAPS": "ops"})
    try:
        cli.relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full", "target": "cap:ops"})
        line = proc.stdout.readline()
        assert line.startswith("[task:1] from admin: disk full (msg:") and "agent-relay task claim 1" in line
        pair = cli.relay.call("POST", "/api/pairs", {"from": "inviter", "to": "watcher", "objective": "pairing"}).json
        assert proc.stdout.readline().startswith("[pair:%s] [msg:" % pair["id"])
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_watch_lines_keep_the_channel_and_the_subject(cli):
    cli.relay.register("boss")
    cli.relay.register("watcher")
    sent = cli.relay.send("boss", "watcher", body="ship it", channel="ops", subject="Release 1.2")
    proc = start_watch(cli)
    try:
        assert proc.stdout.readline() == "[msg:%d] from boss in #ops (re: Release 1.2): ship it\n" % sent["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


def test_watch_exec_runs_per_message_with_json_on_stdin(cli, tmp_path):
    out = tmp_path / "exec.jsonl"
    cli.relay.register("boss")
    proc = start_watch(cli, "--exec", "cat >> %s; echo >> %s" % (out, out))
    try:
        message = cli.relay.send("boss", "watcher", body="run me")
        proc.stdout.readline()
        wait_until(lambda: out.exists() and out.read_text().strip())
        assert json.loads(out.read_text().strip())["id"] == message["id"]
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_watch_json_prints_one_message_object_per_line(cli):
    cli.relay.register("boss")
    proc = start_watch(cli, "--json")
    try:
        message = cli.relay.send("boss", "watcher", body="two\nlines")
        line = proc.stdout.readline()
        assert json.loads(line) == dict(json.loads(line), id=message["id"], body="two\nlines", **{"from": "boss"})
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_watch_survives_a_relay_restart_without_losing_or_repeating(relay_factory, tmp_path):
    port, db = free_port(), str(tmp_path / "watched.db")
    relay = relay_factory(port=port, db_path=db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env.update({"AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    proc = subprocess.Popen([sys.executable, SCRIPT, "watch", "--agent", "watcher", "--heartbeat", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        assert "watching as" in proc.stderr.readline()
        relay.send("boss", "watcher", body="before")
        assert proc.stdout.readline().endswith("before\n")
        relay.server.stop()  # the watcher reconnects, resumes by event id, and catches up
        again = relay_factory(port=port, db_path=db)
        for body in ("during", "after"):
            again.send("boss", "watcher", body=body)
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert [line.split(": ", 1)[1] for line in lines] == ["during\n", "after\n"]
        again.send("boss", "watcher", body="last")
        assert proc.stdout.readline().endswith("last\n")  # nothing repeated before it
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# ---------------------------------------------------------------------------
# setup, daemon, upgrade
# ---------------------------------------------------------------------------


def test_setup_writes_a_private_env_file_and_refuses_to_overwrite(cli, tmp_path):
    out = cli("setup", "--yes").stdout
    path = tmp_path / "config" / "agent-relay" / "agent-relay.env"
    assert "wrote %s (mode 0600)" % path in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = agent_relay.read_env_file(str(path))
    assert values["HOST"] == "127.0.0.1" and values["PORT"] == "4850" and len(values["AGENT_RELAY_TOKEN"]) >= 24
    assert values["DB_PATH"] == str(tmp_path / "data" / "agent-relay" / "agent-relay.db")
    assert values["AGENT_RELAY_TOKEN"] in out
    done = cli("setup", "--yes", check=False)
    assert done.returncode == 1 and "--force" in done.stderr
    cli("setup", "--yes", "--force")
    assert agent_relay.read_env_file(str(path))["AGENT_RELAY_TOKEN"] != values["AGENT_RELAY_TOKEN"]
    done = cli("setup", "--force", check=False)  # no --yes and no terminal: nothing written
    assert done.returncode == 1 and "--yes" in done.stderr


def test_the_env_file_starts_a_relay(cli, spawn_relay, tmp_path):
    cli("setup", "--yes")
    values = agent_relay.read_env_file(str(tmp_path / "config" / "agent-relay" / "agent-relay.env"))
    values["PORT"] = "0"
    relay = spawn_relay(env=values)
    assert relay.url
    assert relay.stop() == 0


def test_daemon_dry_run_on_linux_prints_the_unit_and_the_plan(cli, tmp_path):
    out = cli("daemon", "install", "--enable", "--start", "--dry-run", "--platform", "linux").stdout
    unit_path = tmp_path / "home" / ".config" / "systemd" / "user" / "agent-relay.service"
    assert "write %s:" % unit_path in out
    assert "EnvironmentFile=%s" % (tmp_path / "config" / "agent-relay" / "agent-relay.env") in out
    assert "ExecStart=%s %s serve" % (sys.executable, SCRIPT) in out
    assert "Restart=on-failure" in out and "WantedBy=default.target" in out
    assert out.strip().splitlines()[-3:] == ["run: systemctl --user daemon-reload",
                                            "run: systemctl --user enable agent-relay",
                                            "run: systemctl --user restart agent-relay"]
    assert not unit_path.exists()
    for action, expected in (("status", "systemctl --user status agent-relay"),
                             ("logs", "journalctl --user -u agent-relay"),
                             ("stop", "systemctl --user stop agent-relay"),
                             ("uninstall", "systemctl --user disable --now agent-relay")):
        assert "run: " + expected in cli("daemon", action, "--dry-run", "--platform", "linux").stdout


def test_daemon_dry_run_on_macos_prints_a_launch_agent(cli, tmp_path):
    cli("setup", "--yes")
    out = cli("daemon", "install", "--start", "--dry-run", "--platform", "macos",
              "--binary", "/usr/local/bin/agent-relay").stdout
    plist = tmp_path / "home" / "Library" / "LaunchAgents" / "dev.agent-relay.relay.plist"
    assert "write %s:" % plist in out
    assert "<string>/usr/local/bin/agent-relay</string><string>serve</string>" in out
    assert "<key>AGENT_RELAY_TOKEN</key>" in out and "<key>KeepAlive</key><true/>" in out
    assert "run: launchctl bootstrap gui/" in out


def test_daemon_install_writes_the_unit_file(tmp_path, monkeypatch):
    plan = agent_relay.daemon_plan("install", platform="linux", binary="/opt/bin/agent-relay", home=str(tmp_path))
    plan.commands = []  # the unit file only; no systemctl in a test
    plan.execute()
    unit = (tmp_path / ".config" / "systemd" / "user" / "agent-relay.service").read_text()
    assert "ExecStart=/opt/bin/agent-relay serve" in unit


def test_upgrade_dry_run_names_the_install_method(cli, tmp_path):
    out = cli("upgrade", "--dry-run").stdout
    assert out.startswith("installed as: file (%s)" % SCRIPT)
    home = str(tmp_path / "empty-home")  # not this machine's: its installed plugins would join the plan
    assert agent_relay.upgrade_plan(method="pipx", restart=False, home=home)[1] == [["pipx", "upgrade", "agent-relay"]]
    method, commands = agent_relay.upgrade_plan(method="pip", restart=False, home=home)
    assert commands == [[sys.executable, "-m", "pip", "install", "--upgrade", "agent-relay"]]


def test_upgrade_restarts_the_managed_service_when_installed(tmp_path):
    unit = tmp_path / ".config" / "systemd" / "user" / "agent-relay.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    _, commands = agent_relay.upgrade_plan(method="pipx", platform="linux", home=str(tmp_path))
    assert commands[-1] == ["systemctl", "--user", "restart", "agent-relay"]
    _, commands = agent_relay.upgrade_plan(method="pipx", restart=False, platform="linux", home=str(tmp_path))
    assert commands == [["pipx", "upgrade", "agent-relay"]]


def test_upgrade_providers_refreshes_only_the_named_plugins(cli):
    out = cli("upgrade", "--providers", "claude", "--dry-run").stdout.splitlines()
    assert out[1:] == ["refreshing the claude provider only", "run: claude plugin marketplace update agent-relay",
                       "run: claude plugin update agent-relay@agent-relay"]
    out = cli("upgrade", "--providers", "codex", "--dry-run").stdout.splitlines()
    assert out[1:] == ["refreshing the codex provider only", "run: %s %s codex install" % (sys.executable, SCRIPT)]
    done = cli("upgrade", "--providers", "gemini", check=False)
    assert done.returncode == 2 and "providers are claude and codex" in done.stderr


def test_daemon_without_a_user_bus_explains_and_leaves_no_half_install(cli, tmp_path):
    if agent_relay.user_bus_reachable():
        pytest.skip("this machine has a systemd user manager: the real install would run")
    cli("setup", "--yes")
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "no-runtime"), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent"}
    done = cli("daemon", "install", "--enable", "--start", "--yes", "--platform", "linux", env=env, check=False)
    unit = tmp_path / "home" / ".config" / "systemd" / "user" / "agent-relay.service"
    assert done.returncode == 1 and "loginctl enable-linger $USER" in done.stderr and "no unit written" in done.stderr
    assert not unit.exists()
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    done = cli("daemon", "uninstall", "--yes", "--platform", "linux", env=env, check=False)
    assert done.returncode == 1 and "removed %s" % unit in done.stderr and "loginctl enable-linger" in done.stderr
    assert not unit.exists()


def test_version_flag(cli):
    assert cli("--version").stdout.strip() == "agent-relay %s" % agent_relay.__version__
