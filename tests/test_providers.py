"""Providers: the Claude Code plugin (manifests, hooks, monitor, skills), the
Codex connector (plugin, sidecar against a fake app-server, launcher,
doctor) and `upgrade`'s provider refresh. Hooks are fed the JSON the
runtimes send on stdin and run as real subprocesses against a real relay."""

import base64
import hashlib
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
import fake_codex
from conftest import ROOT, SCRIPT, free_port, wait_until

FAKE_CODEX = os.path.join(ROOT, "tests", "fake_codex.py")


# ---------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------


def read_json(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return json.load(f)


def test_the_plugin_files_in_the_repository_are_the_generated_ones():
    for relative, content in agent_relay.claude_plugin_files().items():
        with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
            assert f.read() == content, "%s is stale: regenerate it from claude_plugin_files()" % relative


def test_claude_plugin_and_marketplace_manifests():
    plugin = read_json(".claude-plugin/plugin.json")
    assert plugin["name"] == "agent-relay" and plugin["version"] == agent_relay.__version__
    assert plugin["description"]
    marketplace = read_json(".claude-plugin/marketplace.json")
    assert marketplace["name"] and marketplace["owner"]["name"] and marketplace["description"]
    entry = marketplace["plugins"][0]
    assert entry["name"] == plugin["name"] and entry["source"] == "./"


def test_claude_hooks_cover_the_session_and_run_this_file():
    hooks = read_json("hooks/hooks.json")["hooks"]
    assert set(hooks) == {"SessionStart", "UserPromptSubmit", "Stop", "SessionEnd", "PreToolUse"}
    for groups in hooks.values():
        for group in groups:
            for hook in group["hooks"]:
                assert hook["type"] == "command" and hook["timeout"] > 0
                assert hook["command"].startswith(agent_relay.CLAUDE_MODULE_CLI + " hook ")
    assert hooks["SessionEnd"][0]["hooks"][0]["timeout"] <= 2
    assert hooks["PreToolUse"][0]["matcher"] == "*"


def test_claude_monitor_manifest():
    monitors = read_json("monitors/monitors.json")
    assert isinstance(monitors, list) and len(monitors) == 1
    assert set(monitors[0]) == {"name", "command", "description"}
    assert monitors[0]["command"] == agent_relay.CLAUDE_MODULE_CLI + " watch --monitor"


@pytest.mark.parametrize("name", ["pair", "message", "send-claimable", "disconnect", "status", "label", "tags"])
def test_each_slash_command_has_a_skill(name):
    with open(os.path.join(ROOT, "skills", name, "SKILL.md"), encoding="utf-8") as f:
        text = f.read()
    front = text.split("---")[1]
    fields = dict(line.split(": ", 1) for line in front.strip().splitlines())
    # quoted YAML (a JSON string is one): a `: ` inside a description cannot break the parse
    assert set(fields) == {"name", "description"}
    assert json.loads(fields["name"]) == name and json.loads(fields["description"])
    # the plugin's own copy of this file, never an `agent-relay` that may not be on PATH
    assert 'python3 "${CLAUDE_PLUGIN_ROOT}/agent_relay.py" /%s $ARGUMENTS' % name in text
    assert "AGENT_RELAY_CLI" not in text


def test_skill_frontmatter_quotes_a_colon_in_the_description():
    text = agent_relay.skill_markdown("x", 'Leave: now, "really"', "/x", "cli")
    front = text.split("---")[1].strip().splitlines()
    assert front[1] == 'description: "Leave: now, \\"really\\""'
    assert json.loads(front[1].split(": ", 1)[1]) == 'Leave: now, "really"'


def test_codex_plugin_manifest_and_hooks():
    plugin = read_json(".codex-plugin/plugin.json")
    assert plugin["name"] == "agent-relay" and plugin["skills"] == "./skills/"
    hooks = read_json(plugin["hooks"])["hooks"]
    assert set(hooks) == {"SessionStart", "UserPromptSubmit", "Stop"}  # Codex has no SessionEnd
    assert all("--provider codex" in h["command"] for g in hooks.values() for x in g for h in x["hooks"])


# ---------------------------------------------------------------------------
# Hooks, as Claude Code runs them
# ---------------------------------------------------------------------------


@pytest.fixture
def hook_env(relay, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "CLAUDE_"))}
    env.update({"AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "CLAUDE_PLUGIN_ROOT": ROOT, "CLAUDE_ENV_FILE": str(tmp_path / "claude.env")})
    project = tmp_path / "myproject"
    project.mkdir()
    env["TEST_PROJECT"] = str(project)
    return env


def claude_hook_command(event):
    """The command hooks/hooks.json gives Claude Code for `event` (run through a shell, as Claude Code does)."""
    commands = [hook["command"] for groups in read_json("hooks/hooks.json")["hooks"].values() for group in groups
                for hook in group["hooks"] if hook["command"].endswith(" hook " + event)]
    assert len(commands) == 1, event
    return commands[0]


def run_hook(env, event, payload, provider="claude"):
    started = time.monotonic()
    if provider == "claude":
        command = ["/bin/sh", "-c", claude_hook_command(event)]
    else:
        command = [sys.executable, SCRIPT, "hook", event, "--provider", provider]
    done = subprocess.run(command, input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=30)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return (json.loads(done.stdout) if done.stdout.strip() else None), elapsed


def session_payload(env, event, **extra):
    return dict({"session_id": "sess-1234", "cwd": env["TEST_PROJECT"], "hook_event_name": event,
                 "transcript_path": "/tmp/t.jsonl"}, **extra)


def start_session(relay, env):
    output, _ = run_hook(env, "session-start", session_payload(env, "SessionStart", source="startup"))
    agent_id = agent_relay.deterministic_agent_id(env["TEST_PROJECT"], "sess-1234")
    return output, agent_id


def test_session_start_registers_answers_context_and_exports_the_id(relay, hook_env):
    output, agent_id = start_session(relay, hook_env)
    assert agent_id.startswith(agent_relay.short_hostname()[:60] + "-myproject-")
    context = output["hookSpecificOutput"]
    assert context["hookEventName"] == "SessionStart"
    text = context["additionalContext"]
    assert text.startswith("Agent Relay active. Your agent ID: %s\n" % agent_id)
    assert "Relay URL: %s | Server: %s | Plugin: %s" % (relay.url, agent_relay.__version__,
                                                         agent_relay.__version__) in text
    assert "Approval mode: open" in text
    agent = relay.call("GET", "/api/agents/" + agent_id).json
    assert agent["provider"] == "claude" and agent["project"] == "myproject" and agent["status"] == "online"
    with open(hook_env["CLAUDE_ENV_FILE"], encoding="utf-8") as f:
        exported = f.read()
    assert "export AGENT_RELAY_ID=%s\n" % agent_id in exported
    assert "export AGENT_RELAY_SESSION=sess-1234\n" in exported and "export AGENT_RELAY_CLI=" in exported
    again, same_id = start_session(relay, hook_env)  # a resumed session keeps its id
    assert same_id == agent_id and len(relay.call("GET", "/api/agents").json["agents"]) == 1


def test_session_start_honours_profiles_and_env(relay, hook_env, tmp_path):
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"reviewer": {"label": "code reviewer", "capabilities": ["chat", "review"],
                                                 "approval": "guarded", "tags": ["backend"]}}))
    hook_env.update({"AGENT_RELAY_PROFILE": "reviewer", "AGENT_RELAY_PROFILES_FILE": str(profiles),
                     "AGENT_RELAY_TAGS": "extra"})
    output, agent_id = start_session(relay, hook_env)
    agent = relay.call("GET", "/api/agents/" + agent_id).json
    assert agent["label"] == "code reviewer" and agent["capabilities"] == ["chat", "review"]
    assert agent["tags"] == ["backend", "extra"] and agent["approval"] == "guarded"
    assert "Approval mode: guarded" in output["hookSpecificOutput"]["additionalContext"]
    assert "confirm with your user" in output["hookSpecificOutput"]["additionalContext"]


def test_session_start_with_the_relay_down_still_answers(hook_env):
    hook_env["AGENT_RELAY_URL"] = "http://127.0.0.1:%d" % free_port()
    output, elapsed = run_hook(hook_env, "session-start", session_payload(hook_env, "SessionStart"))
    assert "is not reachable" in output["hookSpecificOutput"]["additionalContext"]
    assert elapsed < 10


def test_user_prompt_submit_marks_busy_and_delivers_unread_messages(relay, hook_env):
    _, agent_id = start_session(relay, hook_env)
    relay.register("peer")
    message = relay.send("peer", agent_id, body="check the migration")
    output, _ = run_hook(hook_env, "user-prompt-submit", session_payload(hook_env, "UserPromptSubmit",
                                                                         prompt="hello"))
    text = output["hookSpecificOutput"]["additionalContext"]
    assert "[msg:%d] from peer: check the migration" % message["id"] in text
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "busy"
    assert relay.inbox(agent_id, unread="true") == []
    output, _ = run_hook(hook_env, "user-prompt-submit", session_payload(hook_env, "UserPromptSubmit"))
    assert output is None  # nothing new: no context


# What a hook must not import (issue 22): each costs start-up time on every
# prompt and tool call, and none is needed to read an inbox over HTTP.
SERVER_MODULES = ("argparse", "http.server", "http.client", "email", "sqlite3", "logging", "ssl", "socketserver",
                  "urllib.request", "subprocess", "secrets", "tempfile", "shutil")
IMPORTS_OF_A_HOOK = """
import json, sys
before = set(sys.modules)
sys.path.insert(0, sys.argv[1])
import agent_relay
status = agent_relay.main(sys.argv[2:])
print(json.dumps(sorted(name for name in set(sys.modules) - before if name in %r)))
sys.exit(status)
""" % (SERVER_MODULES,)


def test_a_hook_delivers_without_loading_the_server_modules(relay, hook_env):
    _, agent_id = start_session(relay, hook_env)
    relay.register("peer")
    message = relay.send("peer", agent_id, body="light start")
    for argv in (["hook", "user-prompt-submit"], ["hook", "pre-tool-use", "--provider", "claude"]):
        payload = session_payload(hook_env, "UserPromptSubmit" if argv[1] == "user-prompt-submit" else "PreToolUse")
        done = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_HOOK, ROOT] + argv, input=json.dumps(payload),
                              capture_output=True, text=True, env=hook_env, timeout=30)
        assert done.returncode == 0, done.stderr
        *hook_output, loaded = done.stdout.splitlines()
        assert json.loads(loaded) == [], argv  # e.g. ["argparse"] when the hook went through the parser
        if argv[1] == "user-prompt-submit":
            assert "[msg:%d] from peer: light start" % message["id"] in hook_output[0]
    assert relay.inbox(agent_id, unread="true") == []


def test_hook_options_stand_in_for_the_environment(relay, hook_env, tmp_path):
    env = dict(hook_env, AGENT_RELAY_URL="http://127.0.0.1:9")  # nothing listens there
    payload = session_payload(env, "SessionStart")
    done = subprocess.run([sys.executable, SCRIPT, "hook", "session-start", "--url", relay.url],
                          input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Agent Relay active" in json.loads(done.stdout)["hookSpecificOutput"]["additionalContext"]


def test_stop_continues_with_new_messages_then_goes_idle(relay, hook_env):
    _, agent_id = start_session(relay, hook_env)
    relay.register("peer")
    relay.send("peer", agent_id, body="one more thing")
    output, _ = run_hook(hook_env, "stop", session_payload(hook_env, "Stop", stop_hook_active=False))
    assert output["decision"] == "block" and "one more thing" in output["reason"]
    output, _ = run_hook(hook_env, "stop", session_payload(hook_env, "Stop", stop_hook_active=True))
    assert output is None
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "idle"


def test_session_end_goes_offline_within_its_budget_but_not_on_clear(relay, hook_env):
    _, agent_id = start_session(relay, hook_env)
    run_hook(hook_env, "session-end", session_payload(hook_env, "SessionEnd", reason="clear"))
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "online"
    _, elapsed = run_hook(hook_env, "session-end", session_payload(hook_env, "SessionEnd", reason="logout"))
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "offline"
    assert elapsed < 1.5


def test_session_end_with_the_relay_down_stays_within_budget(hook_env):
    hook_env["AGENT_RELAY_URL"] = "http://127.0.0.1:%d" % free_port()
    _, elapsed = run_hook(hook_env, "session-end", session_payload(hook_env, "SessionEnd", reason="other"))
    assert elapsed < 1.5


@pytest.mark.parametrize("approval,tool,origin,expected", [
    ("open", "Edit", "relay", None),
    ("guarded", "Read", "relay", "ask"),
    ("guarded", "Edit", "human", None),
    ("read-only", "Edit", "relay", "deny"),
    ("read-only", "Bash", "relay", "deny"),
    ("read-only", "Read", "relay", None),
    ("read-only", "Edit", "human", None),
    ("guarded", "Read", "channel", "ask"),
    ("read-only", "Edit", "channel", "deny"),
])
def test_the_approval_gate(relay, hook_env, approval, tool, origin, expected):
    hook_env["AGENT_RELAY_APPROVAL"] = approval
    _, agent_id = start_session(relay, hook_env)
    relay.register("peer")
    if origin == "relay":
        relay.send("peer", agent_id, body="please delete the tests")
        run_hook(hook_env, "stop", session_payload(hook_env, "Stop"))  # delivers it: a relay turn follows
    elif origin == "channel":  # a turn Claude Code starts for a push of the channel server
        prompt = ('<channel source="plugin:agent-relay:agent-relay" id="7" from="peer" kind="message" '
                  'claimable="false">\nplease delete the tests\n</channel>')
        run_hook(hook_env, "user-prompt-submit", session_payload(hook_env, "UserPromptSubmit", prompt=prompt))
    else:
        run_hook(hook_env, "user-prompt-submit", session_payload(hook_env, "UserPromptSubmit", prompt="hi"))
    output, _ = run_hook(hook_env, "pre-tool-use", session_payload(hook_env, "PreToolUse", tool_name=tool,
                                                                   tool_input={}))
    if expected is None:
        assert output is None
    else:
        decision = output["hookSpecificOutput"]
        assert decision["hookEventName"] == "PreToolUse" and decision["permissionDecision"] == expected
        assert approval in decision["permissionDecisionReason"]


def test_codex_hooks_register_a_codex_agent(relay, hook_env):
    output, _ = run_hook(hook_env, "session-start", session_payload(hook_env, "SessionStart"), provider="codex")
    agent_id = agent_relay.deterministic_agent_id(hook_env["TEST_PROJECT"], "sess-1234")
    assert relay.call("GET", "/api/agents/" + agent_id).json["provider"] == "codex"
    assert output["hookSpecificOutput"]["additionalContext"].startswith("Agent Relay active.")


def test_the_monitor_command_delivers_flushed_lines(relay, hook_env):
    _, agent_id = start_session(relay, hook_env)
    proc = start_monitor(dict(hook_env, AGENT_RELAY_ID=agent_id), hook_env["TEST_PROJECT"])
    try:
        relay.register("backend-agent")
        message = relay.send("backend-agent", agent_id, body="Migration looks clean, tests pass.")
        assert proc.stdout.readline() == "[msg:%d] from backend-agent: Migration looks clean, tests pass.\n" % (
            message["id"])
    finally:
        stop_monitor(proc)


def monitor_env(env, session):
    """What Claude Code 2.1.197 gives a plugin monitor: its own environment
    plus CLAUDECODE, CLAUDE_CODE_SESSION_ID (the hooks' session_id) and
    CLAUDE_CODE_CHILD_SESSION; ${CLAUDE_PLUGIN_ROOT} is substituted in the
    command text, and nothing from SessionStart (no AGENT_RELAY_ID)."""
    env = {k: v for k, v in env.items() if k not in ("CLAUDE_PLUGIN_ROOT", "CLAUDE_ENV_FILE")}
    return dict(env, CLAUDECODE="1", CLAUDE_CODE_SESSION_ID=session, CLAUDE_CODE_CHILD_SESSION="1")


def start_monitor(env, cwd):
    command = read_json("monitors/monitors.json")[0]["command"].replace("${CLAUDE_PLUGIN_ROOT}", ROOT)
    return subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)


def stop_monitor(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.parametrize("hook_first", [True, False])
def test_the_monitor_without_agent_relay_id_follows_this_sessions_agent(relay, hook_env, hook_first):
    # An earlier session in the same project left its agent remembered for the project, then ended.
    run_hook(hook_env, "session-start", dict(session_payload(hook_env, "SessionStart"), session_id="sess-old"))
    old_id = agent_relay.deterministic_agent_id(hook_env["TEST_PROJECT"], "sess-old")
    run_hook(hook_env, "session-end", dict(session_payload(hook_env, "SessionEnd"), session_id="sess-old",
                                           reason="logout"))
    new_id = agent_relay.deterministic_agent_id(hook_env["TEST_PROJECT"], "sess-new")
    payload = dict(session_payload(hook_env, "SessionStart", source="startup"), session_id="sess-new")
    if hook_first:
        run_hook(hook_env, "session-start", payload)
    proc = start_monitor(monitor_env(hook_env, "sess-new"), hook_env["TEST_PROJECT"])
    try:
        wait_until(lambda: relay.call("GET", "/api/agents/" + new_id).status == 200)
        if not hook_first:  # the monitor started before SessionStart finished
            run_hook(hook_env, "session-start", payload)
        relay.register("backend-agent")
        message = relay.send("backend-agent", new_id, body="for this session")
        assert proc.stdout.readline() == "[msg:%d] from backend-agent: for this session\n" % message["id"]
        agent = relay.call("GET", "/api/agents/" + new_id).json
        assert agent["provider"] == "claude" and agent["meta"]["session"] == "sess-new"
        old = relay.call("GET", "/api/agents/" + old_id).json
        assert old["status"] == "offline" and old["provider"] == "claude"  # not revived, not rewritten to cli
    finally:
        stop_monitor(proc)


def test_the_channel_server_pushes_messages_to_the_official_mcp_client_and_replies(relay, hook_env):
    """`agent_relay.py channel` as the plugin's .mcp.json declares it, driven
    by the official MCP Python SDK over stdio, with the environment Claude Code
    gives an MCP server (CLAUDE_CODE_SESSION_ID, CLAUDE_PROJECT_DIR)."""
    pytest.importorskip("mcp")
    anyio = pytest.importorskip("anyio")
    from mcp import ClientSession, StdioServerParameters
    from mcp.client import NotificationBinding
    from mcp.client.stdio import stdio_client
    from pydantic import BaseModel

    class ChannelParams(BaseModel):
        content: str
        meta: dict[str, str]

    server = read_json(".mcp.json")["mcpServers"]["agent-relay"]
    args = [a.replace("${CLAUDE_PLUGIN_ROOT}", ROOT) for a in server["args"]]
    env = {k: v for k, v in hook_env.items() if k.startswith(("AGENT_RELAY_", "XDG_"))}
    env.update(CLAUDECODE="1", CLAUDE_CODE_SESSION_ID="sess-chan", CLAUDE_PROJECT_DIR=hook_env["TEST_PROJECT"])
    agent_id = agent_relay.deterministic_agent_id(hook_env["TEST_PROJECT"], "sess-chan")
    run_hook(hook_env, "session-start", dict(session_payload(hook_env, "SessionStart"), session_id="sess-chan"))
    relay.register("backend-agent")
    early = relay.send("backend-agent", agent_id, body="sent before the channel started")
    found = {"events": []}

    async def flow():
        arrived = anyio.Event()

        async def on_channel(params):
            found["events"].append((time.monotonic(), params.content, params.meta))
            if len(found["events"]) == 2:
                arrived.set()

        binding = NotificationBinding(method="notifications/claude/channel", params_type=ChannelParams,
                                      handler=on_channel)
        params = StdioServerParameters(command=sys.executable if server["command"] == "python3" else server[
            "command"], args=args, env=env, cwd=hook_env["TEST_PROJECT"])
        async with stdio_client(params) as streams:
            async with ClientSession(streams[0], streams[1], notification_bindings=[binding]) as session:
                init = await session.initialize()
                found["experimental"] = init.capabilities.experimental
                found["instructions"] = init.instructions
                found["tools"] = [t.name for t in (await session.list_tools()).tools]
                with anyio.fail_after(20):
                    while relay.call("GET", "/api/agents/" + agent_id).status != 200 or not found["events"]:
                        await anyio.sleep(0.05)
                found["sent_at"] = time.monotonic()
                live = relay.send("backend-agent", agent_id, body="wake up: review #12", claimable=True)
                found["live_id"] = live["id"]
                with anyio.fail_after(10):
                    await arrived.wait()
                found["unread_pushed"] = relay.inbox(agent_id, unread="true")
                bad = await session.call_tool("reply", {"to": "nobody-here", "text": "lost"})
                found["bad_reply"] = (bad.is_error, bad.content[0].text)
                result = await session.call_tool("reply", {"to": "backend-agent", "text": "on it",
                                                           "replyTo": live["id"]})
                found["reply"] = (result.is_error, result.content[0].text)
                found["agent"] = relay.call("GET", "/api/agents/" + agent_id).json
                found["unread"] = relay.call("GET", "/api/messages?for=%s&unread=true" % agent_id).json["messages"]

    anyio.run(flow)
    assert found["experimental"] == {"claude/channel": {}}
    assert "reply tool" in found["instructions"] and found["tools"] == ["reply"]
    (_, first, first_meta), (at, text, meta) = found["events"]
    assert first == "sent before the channel started"
    assert first_meta == {"id": str(early["id"]), "from": "backend-agent", "kind": "message", "claimable": "false"}
    assert text == "wake up: review #12" and at - found["sent_at"] < 1.0
    assert meta == {"id": str(found["live_id"]), "from": "backend-agent", "kind": "message", "claimable": "true"}
    assert found["agent"]["provider"] == "claude" and found["agent"]["status"] == "online"
    assert found["reply"][0] is False and found["reply"][1].startswith("sent (msg:")
    assert found["bad_reply"][0] is True and "nobody-here" in found["bad_reply"][1]
    answer = relay.inbox("backend-agent")[-1]
    assert (answer["from"], answer["body"], answer["replyTo"]) == (agent_id, "on it", found["live_id"])
    # Pushing marks nothing read (a session without channels drops the push; the hooks still hand it over);
    # a reply with replyTo marks that message read.
    assert [m["id"] for m in found["unread_pushed"]] == [early["id"], found["live_id"]]
    assert [m["id"] for m in found["unread"]] == [early["id"]]
    # nor does it tell the approval gate that a relay turn is under way (the push may have been dropped)
    digest = hashlib.sha256(agent_id.encode()).hexdigest()[:16]
    assert not os.path.exists(os.path.join(hook_env["XDG_CONFIG_HOME"], "agent-relay", "sessions",
                                           "turn-%s.json" % digest))
    # the session closed the channel's stdin: the agent is offline
    assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "offline"


def test_the_channel_survives_a_relay_restart_without_losing_or_repeating(relay_factory, tmp_path):
    port, db = free_port(), str(tmp_path / "channel.db")
    relay = relay_factory(port=port, db_path=db)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "CLAUDE_"))}
    env.update({"AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    proc = subprocess.Popen([sys.executable, SCRIPT, "channel", "--agent", "chan"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))

    def pushed():
        return json.loads(proc.stdout.readline())["params"]["content"]
    try:
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}\n'
                         b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["id"] == 1
        assert b"watching as chan" in proc.stderr.readline()
        relay.send("boss", "chan", body="before")
        assert pushed() == "before"
        relay.server.stop()  # the channel reconnects, resumes by event id, and catches up
        again = relay_factory(port=port, db_path=db)
        for body in ("during", "after"):
            again.send("boss", "chan", body=body)
        assert [pushed(), pushed()] == ["during", "after"]
        again.send("boss", "chan", body="last")
        assert pushed() == "last"  # nothing repeated before it, though nothing was marked read
        assert len(again.inbox("chan", unread="true")) == 4
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_the_channel_server_ends_cleanly_on_sigint_as_claude_code_stops_it(relay, hook_env):
    env = dict(hook_env, CLAUDE_CODE_SESSION_ID="sess-int", CLAUDE_PROJECT_DIR=hook_env["TEST_PROJECT"])
    agent_id = agent_relay.deterministic_agent_id(hook_env["TEST_PROJECT"], "sess-int")
    # Started with SIGINT ignored, as from the background of a script: it still stops on SIGINT.
    proc = subprocess.Popen([sys.executable, SCRIPT, "channel"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=hook_env["TEST_PROJECT"],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}\n'
                         b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["result"]["capabilities"]["experimental"] == {"claude/channel": {}}
        wait_until(lambda: relay.call("GET", "/api/agents/" + agent_id).json.get("status") == "online", 20)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read().decode()
        assert relay.call("GET", "/api/agents/" + agent_id).json["status"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


# ---------------------------------------------------------------------------
# Codex
# ---------------------------------------------------------------------------


@pytest.fixture
def codex_env(relay, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "CLAUDE_"))}
    env.update({"AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "FAKE_CODEX_LOG": str(tmp_path / "codex.log"), "HOME": str(tmp_path / "home")})
    return env


def stop_launcher(proc, how):
    """Ask `agent-relay codex` to stop; it must exit 0. Kill its process group
    (the launcher and the app-server it started) if it does not."""
    how()
    try:
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()


def codex_log(env):
    try:
        with open(env["FAKE_CODEX_LOG"], encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    except OSError:
        return []


def test_the_codex_sidecar_delivers_messages_as_turns_and_steers(relay, codex_env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, SCRIPT, "codex", "--headless", "--port", str(port), "--codex-bin",
                             FAKE_CODEX, "--agent", "codex-agent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=codex_env, cwd=str(tmp_path), start_new_session=True)
    try:
        banner = proc.stdout.readline()
        assert "waiting for relay messages as codex-agent" in banner
        attach = proc.stdout.readline().strip()
        assert attach.startswith("AGENT_RELAY_CODEX_TOKEN=$(cat ") and attach.endswith(
            " %s resume --remote ws://127.0.0.1:%d --remote-auth-token-env AGENT_RELAY_CODEX_TOKEN thr_fake" % (
                FAKE_CODEX, port))
        wait_until(lambda: relay.call("GET", "/api/agents/codex-agent").status == 200)
        assert relay.call("GET", "/api/agents/codex-agent").json["provider"] == "codex"
        methods = [m["method"] for m in codex_log(codex_env)]
        assert methods[:3] == ["initialize", "initialized", "thread/start"]
        relay.register("boss")
        first = relay.send("boss", "codex-agent", body="run the tests")
        wait_until(lambda: any(m["method"] == "turn/start" for m in codex_log(codex_env)))
        start = [m for m in codex_log(codex_env) if m["method"] == "turn/start"][0]
        assert start["params"]["threadId"] == "thr_fake"
        line = "[msg:%d] from boss: run the tests" % first["id"]
        assert start["params"]["input"] == [{"type": "text", "text": line}]
        second = relay.send("boss", "codex-agent", body="focus on auth first")
        wait_until(lambda: any(m["method"] == "turn/steer" for m in codex_log(codex_env)))
        steer = [m for m in codex_log(codex_env) if m["method"] == "turn/steer"][0]
        assert steer["params"]["expectedTurnId"] == "turn_1"
        assert "focus on auth first" in steer["params"]["input"][0]["text"] and str(second["id"]) in \
            steer["params"]["input"][0]["text"]
        wait_until(lambda: relay.inbox("codex-agent", unread="true") == [])
    finally:
        stop_launcher(proc, lambda: proc.send_signal(signal.SIGINT))
    assert relay.call("GET", "/api/agents/codex-agent").json["status"] == "offline"


class QuietWebSocketServer:
    """One WebSocket connection on loopback, scripted by the test: it
    records every frame the client sends and never answers pings by itself."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "ws://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.frames = []
        self.conn = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        conn, _ = self.listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        key = [line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
               if line.lower().startswith("sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1((key + agent_relay.WEBSOCKET_GUID).encode()).digest()).decode()
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
        self.conn = conn
        self.accepted.set()
        buffer = b""
        try:
            while True:
                opcode, payload, buffer = fake_codex.read_frame(conn, buffer)
                self.frames.append((opcode, payload))
        except (ConnectionError, OSError):
            self.frames.append(("closed", b""))

    def send(self, opcode, payload):
        self.conn.sendall(bytes([0x80 | opcode, len(payload)]) + payload)

    def close(self):
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


def test_a_websocket_stays_open_through_a_quiet_spell_and_answers_pings():
    """The handshake timeout (0.5 s here, 10 s by default) must not outlive
    the handshake: a Codex session may say nothing for hours."""
    server = QuietWebSocketServer()
    try:
        ws = agent_relay.WebSocket(server.url, timeout=0.5)
        server.accepted.wait(5)
        server.send(0x9, b"are you there")
        received = []
        reader = threading.Thread(target=lambda: received.append(ws.recv()), daemon=True)
        reader.start()
        wait_until(lambda: (0xA, b"are you there") in server.frames)  # the pong
        time.sleep(1.5)  # three handshake timeouts of silence
        assert reader.is_alive() and received == []
        server.send(0x1, b'{"method": "turn/started"}')
        reader.join(5)
        assert received == ['{"method": "turn/started"}']
        ws.close()
    finally:
        server.close()


def test_a_websocket_pings_and_cuts_a_peer_that_stopped_answering():
    server = QuietWebSocketServer()
    try:
        ws = agent_relay.WebSocket(server.url)
        ws.keepalive(0.2)
        ended = []
        reader = threading.Thread(target=lambda: ended.append(_recv_or_error(ws)), daemon=True)
        reader.start()
        wait_until(lambda: any(opcode == 0x9 for opcode, _ in server.frames))  # its own pings
        reader.join(5)  # no pong for two intervals: the peer is gone, and the blocked read ends
        assert ended in ([None], ["error"])
        ws.close()
    finally:
        server.close()


def _recv_or_error(ws):
    try:
        return ws.recv()
    except OSError:
        return "error"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_codex_app_server_only_takes_the_launchers_capability_token(stop, relay, codex_env, tmp_path):
    """Also: SIGTERM or SIGINT stops it cleanly (exit 0, agent offline, token
    gone), even started like a background job, which has SIGINT ignored."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, SCRIPT, "codex", "--headless", "--port", str(port), "--codex-bin",
                             FAKE_CODEX, "--agent", "codex-agent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=codex_env, cwd=str(tmp_path), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        attach = proc.stdout.readline() and proc.stdout.readline()
        token_file = attach.split("$(cat ", 1)[1].split(")", 1)[0]
        assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
        with pytest.raises(ConnectionError, match="401"):
            agent_relay.WebSocket("ws://127.0.0.1:%d" % port)  # any other local process: refused
        with pytest.raises(ConnectionError, match="401"):
            agent_relay.WebSocket("ws://127.0.0.1:%d" % port, headers={"Authorization": "Bearer guess"})
        with open(token_file) as f:
            ws = agent_relay.WebSocket("ws://127.0.0.1:%d" % port, headers={"Authorization": "Bearer " + f.read()})
        ws.close()
        wait_until(lambda: relay.call("GET", "/api/agents/codex-agent").json.get("status") in ("online", "idle"))
    finally:
        stop_launcher(proc, lambda: proc.send_signal(stop))
    assert not os.path.exists(token_file)
    assert relay.call("GET", "/api/agents/codex-agent").json["status"] == "offline"


def test_the_codex_sidecar_follows_the_tuis_thread_from_its_notifications(relay, codex_env, tmp_path):
    """The TUI's thread has no rollout when it starts: the sidecar adopts it
    without thread/resume, so it never gets the TUI's turn notifications and
    must go by thread/status/changed (which every connection gets). Busy:
    steer the running turn (the TUI's own, found with thread/turns/list);
    idle: start a turn. No steer is ever tried against a finished turn."""
    codex_env["FAKE_CODEX_TUI_TURN"] = "1"
    port = free_port()
    proc = subprocess.Popen([sys.executable, SCRIPT, "codex", "--port", str(port), "--codex-bin", FAKE_CODEX,
                             "--agent", "codex-tui"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=codex_env, cwd=str(tmp_path),
                            start_new_session=True)

    def tui_conn():
        return next((m["conn"] for m in codex_log(codex_env) if m["method"] == "thread/start"), None)

    def sidecar_calls():
        return [m for m in codex_log(codex_env) if m["conn"] != tui_conn() and "id" in m
                and m["method"] != "initialize"]
    try:
        wait_until(lambda: any(m["method"] == "turn/start" and m["conn"] == tui_conn() for m in codex_log(codex_env)))
        wait_until(lambda: relay.call("GET", "/api/agents/codex-tui").status == 200)
        wait_until(lambda: relay.call("GET", "/api/agents/codex-tui").json["status"] == "busy")  # the TUI's turn
        relay.register("boss")
        expected = [("thread/turns/list", None), ("turn/steer", "turn_1"), ("turn/start", None),
                    ("turn/steer", "turn_2"), ("turn/start", None)]
        for number, (method, _) in enumerate(expected[1:], 1):
            relay.send("boss", "codex-tui", body="message %d" % number)
            wait_until(lambda n=number: sum(m["method"] in ("turn/start", "turn/steer") for m in sidecar_calls()) == n)
            status = "busy" if method == "turn/start" else "idle"  # steering completes the fake's turn
            wait_until(lambda s=status: relay.call("GET", "/api/agents/codex-tui").json["status"] == s)
        calls = sidecar_calls()
        assert [(m["method"], m["params"].get("expectedTurnId")) for m in calls] == expected
        assert all(m["params"]["threadId"] == "thr_fake" for m in calls)
        assert "message 4" in calls[-1]["params"]["input"][0]["text"]
    finally:
        stop_launcher(proc, proc.stdin.close)  # the TUI's user leaves
    assert relay.call("GET", "/api/agents/codex-tui").json["status"] == "offline"


def test_codex_doctor_checks_codex_and_the_relay(relay, codex_env, tmp_path):
    codex_env["PATH"] = str(tmp_path / "empty")  # no codex here
    done = subprocess.run([sys.executable, SCRIPT, "codex", "doctor"], capture_output=True, text=True, env=codex_env)
    lines = done.stdout.splitlines()
    assert lines[0] == "FAIL codex CLI on PATH (install Codex)" and done.returncode == 1
    assert any(line.startswith("ok   relay at %s answers" % relay.url) for line in lines)
    assert "ok   the token is accepted" in lines  # what the real app-server loaded: tests/test_real_codex.py


def test_codex_install_uses_codexs_plugin_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    commands = []

    def run(command, **_):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "Added.\n", "")
    root = agent_relay.codex_install("codex", run=run)
    assert root == str(tmp_path / "data" / "agent-relay" / "codex-marketplace")
    assert commands == [["codex", "plugin", "marketplace", "add", root],
                        ["codex", "plugin", "add", "agent-relay@agent-relay"]]
    marketplace = json.loads((tmp_path / "data" / "agent-relay" / "codex-marketplace" / ".agents" / "plugins" /
                              "marketplace.json").read_text())
    assert marketplace["name"] == "agent-relay" and marketplace["plugins"][0]["name"] == "agent-relay"
    plugin = os.path.join(root, marketplace["plugins"][0]["source"])
    hooks = json.loads(open(os.path.join(plugin, "hooks", "hooks.json")).read())["hooks"]
    assert SCRIPT in hooks["SessionStart"][0]["hooks"][0]["command"]  # this file, not whatever is on PATH
    assert os.path.exists(os.path.join(plugin, "skills", "pair", "SKILL.md"))

    def refuse(command, **_):
        return subprocess.CompletedProcess(command, 1, "", "Error: no such marketplace\n")
    with pytest.raises(agent_relay.RelayError, match="no such marketplace"):
        agent_relay.codex_install("codex", run=refuse)


@pytest.mark.parametrize("words", [["install", "--help"], ["doctor", "--help"], ["install", "-h"], ["--help"]])
def test_codex_subcommand_help_only_prints_help(words, codex_env, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "codex").write_text("#!/bin/sh\necho \"$@\" >> %s\n" % (tmp_path / "ran"))
    (bin_dir / "codex").chmod(0o755)
    codex_env["PATH"] = str(bin_dir) + os.pathsep + codex_env["PATH"]
    done = subprocess.run([sys.executable, SCRIPT, "codex"] + words, capture_output=True, text=True,
                          env=codex_env, cwd=str(tmp_path), timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("usage: agent-relay codex")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "home").exists()  # nothing ran, nothing written


def test_the_codex_launcher_reports_a_missing_codex(codex_env, tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "codex", "--headless", "--codex-bin", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=codex_env, timeout=30)
    assert done.returncode == 1 and "Cannot start" in done.stderr


def test_upgrade_refreshes_installed_providers(tmp_path):
    home = tmp_path / "home"
    (home / ".claude" / "plugins").mkdir(parents=True)
    (home / ".claude" / "plugins" / "installed_plugins.json").write_text('{"plugins": {"agent-relay@agent-relay": {}}}')
    (home / ".codex" / "plugins" / "cache" / "agent-relay").mkdir(parents=True)  # Codex's plugin cache
    _, commands = agent_relay.upgrade_plan(method="pipx", restart=False, home=str(home), which=lambda name: "/bin/x")
    assert commands == [["pipx", "upgrade", "agent-relay"],
                        ["claude", "plugin", "marketplace", "update", "agent-relay"],
                        ["claude", "plugin", "update", "agent-relay@agent-relay"],
                        [sys.executable, SCRIPT, "codex", "install"]]
    _, commands = agent_relay.upgrade_plan(method="pipx", restart=False, home=str(tmp_path / "empty"),
                                           which=lambda name: None)
    assert commands == [["pipx", "upgrade", "agent-relay"]]
