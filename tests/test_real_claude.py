"""The Claude Code plugin against the real Claude Code CLI (pinned by
`.ci/real-tools`), with no network: a stand-in Anthropic Messages API on
loopback (tests/stand_in_anthropic.py) answers every model request, a temp
HOME holds Claude Code's settings, and a real relay serves the agents.

Covers the README's install path, `claude plugin validate --strict`, a real
`claude -p` turn (SessionStart registers the session, UserPromptSubmit hands
the model what arrived), and the monitor command started with the
environment Claude Code gives its monitors. Skips only when the binary is
absent."""

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

import agent_relay
from conftest import ROOT, wait_until
from realtools import real_tool
from stand_in_anthropic import StandInAnthropic

CLAUDE = real_tool("claude")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CLAUDE is None, reason="the pinned Claude Code is not installed "
                                                                           "(run .ci/real-tools)")]
# What SessionStart exports through CLAUDE_ENV_FILE: a monitor that starts
# before the hook has finished has none of it.
SESSION_START_EXPORTS = ("AGENT_RELAY_ID", "AGENT_RELAY_SESSION", "AGENT_RELAY_CLI")


@pytest.fixture(scope="module", autouse=True)
def tool_versions(request):
    """Print the versions these tests ran against (also with output captured)."""
    version = subprocess.run([CLAUDE, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    line = "real tools: claude %s (%s); python %s" % (version, CLAUDE, sys.version.split()[0])
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:
        print(line)
    return version


class Claude:
    """The real CLI in a temp HOME, pointed at the stand-in API and the relay."""

    def __init__(self, relay, api, tmp_path):
        self.api = api
        self.home = tmp_path / "home"
        self.project = tmp_path / "project"
        self.home.mkdir()
        self.project.mkdir()
        # a plugin-only install: no `agent-relay` command on PATH
        path = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                if not os.access(os.path.join(d, "agent-relay"), os.X_OK)]
        self.env = {
            "PATH": os.pathsep.join(path), "HOME": str(self.home), "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": "sk-ant-stand-in",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1", "DISABLE_BUG_COMMAND": "1",
            "AGENT_RELAY_URL": relay.url, "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }

    def run(self, *args, timeout=180):
        done = subprocess.run([CLAUDE] + list(args), env=self.env, cwd=str(self.project), capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        return done.stdout

    def install(self):
        """The README's install path."""
        added = self.run("plugin", "marketplace", "add", ROOT)
        installed = self.run("plugin", "install", "agent-relay@agent-relay")
        return added, installed

    def turn(self, prompt, *args):
        out = self.run("-p", "--output-format", "json", "--allowedTools=Bash", *args, prompt)
        result = json.loads(out)
        assert result["is_error"] is False, result
        return result

    def turn_with_env(self, session_id, path):
        """A turn whose model asks for one Bash command dumping the environment
        Claude Code gives the commands it runs (monitors are started the same way)."""
        result = self.turn("Hello.\nRUN: env -0 > %s" % path, "--session-id", session_id)
        with open(path, encoding="utf-8") as f:
            return result, dict(item.split("=", 1) for item in f.read().split("\0") if "=" in item)


@pytest.fixture
def claude(relay, tmp_path):
    with StandInAnthropic() as api:
        yield Claude(relay, api, tmp_path)


def test_claude_plugin_validate_strict_passes_on_the_repository(claude):
    for target in (ROOT, os.path.join(ROOT, ".claude-plugin", "plugin.json")):  # the marketplace, then the plugin
        done = subprocess.run([CLAUDE, "plugin", "validate", "--strict", target], env=claude.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "Validation passed" in done.stdout, (target, done.stdout, done.stderr)


def test_the_readme_install_path_installs_and_enables_the_plugin(claude):
    added, installed = claude.install()
    assert "Successfully added marketplace: agent-relay" in added
    assert "Successfully installed plugin: agent-relay@agent-relay" in installed
    listing = claude.run("plugin", "list")
    assert re.search(r"agent-relay@agent-relay\s+Version: %s\s+Scope: user\s+Status: \S+ enabled" % re.escape(
        agent_relay.__version__), listing), listing
    details = claude.run("plugin", "details", "agent-relay@agent-relay")
    assert "Skills (7)  disconnect, label, message, pair, send-claimable, status, tags" in details, details
    assert "Hooks (5)  SessionStart, UserPromptSubmit, Stop, SessionEnd, PreToolUse" in details, details
    assert "MCP servers (1)  agent-relay" in details, details  # the channel server of .mcp.json


def test_a_real_turn_registers_the_session_and_the_model_sees_a_message(relay, claude):
    claude.install()
    session = str(uuid.uuid4())
    agent_id = agent_relay.deterministic_agent_id(str(claude.project), session)
    claude.turn("Hello, who am I on the relay?", "--session-id", session)
    agent = relay.call("GET", "/api/agents/" + agent_id).json
    assert agent["provider"] == "claude" and agent["meta"]["session"] == session
    assert agent["status"] == "offline"  # SessionEnd: -p exits after its turn
    # the channel server Claude Code spawned (CLAUDE_CODE_SESSION_ID, CLAUDE_PROJECT_DIR) derived the same id
    assert [a["id"] for a in relay.call("GET", "/api/agents").json["agents"]] == [agent_id]
    assert any("Agent Relay active. Your agent ID: %s" % agent_id in seen for seen in claude.api.seen())
    # The MCP channel server of the plugin's .mcp.json is loaded: its reply tool is offered to the model.
    assert any("mcp__plugin_agent-relay_agent-relay__reply" in seen for seen in claude.api.seen())

    relay.register("backend-agent")
    message = relay.send("backend-agent", agent_id, body="Migration 0042 is ready for review (marker 7f3a)")
    before = len(claude.api.seen())
    # started as the README says for channels (the flag is accepted; the push itself sits behind a
    # server-side flag here), the hooks hand the model what arrived while it was away
    claude.turn("Anything new?", "--dangerously-load-development-channels", "plugin:agent-relay@agent-relay",
                "--resume", session)
    later = claude.api.seen()[before:]
    line = agent_relay.format_message(message)
    assert any("marker 7f3a" in seen and json.dumps(line)[1:-1] in seen for seen in later), later[-1][-3000:]
    assert relay.inbox(agent_id, unread="true") == []  # the hook marked it read
    assert relay.call("GET", "/api/agents/" + agent_id).json["meta"]["session"] == session


def test_a_skill_runs_the_plugins_own_file_with_nothing_on_path(relay, claude):
    claude.install()
    session = str(uuid.uuid4())
    agent_id = agent_relay.deterministic_agent_id(str(claude.project), session)
    claude.turn("/agent-relay:label Reviewer", "--session-id", session)  # the model runs the skill's command
    # ${CLAUDE_PLUGIN_ROOT} expanded by Claude Code in the skill's text (the request body is JSON, quotes escaped)
    command = re.compile(r'python3 \\"%s/+agent_relay\.py\\" /label Reviewer' % re.escape(ROOT))
    assert any(command.search(seen) for seen in claude.api.seen())
    assert any("%s label: Reviewer" % agent_id in seen for seen in claude.api.seen())  # the tool's output
    assert relay.call("GET", "/api/agents/" + agent_id).json["label"] == "Reviewer"


def test_the_monitor_follows_the_agent_the_hook_registered(relay, claude, tmp_path):
    claude.install()
    previous = str(uuid.uuid4())
    claude.turn("An earlier session in this project.", "--session-id", previous)
    previous_id = agent_relay.deterministic_agent_id(str(claude.project), previous)
    session = str(uuid.uuid4())
    _, env = claude.turn_with_env(session, str(tmp_path / "env.bin"))
    assert env["CLAUDE_CODE_SESSION_ID"] == session and env["CLAUDECODE"] == "1"
    agent_id = agent_relay.deterministic_agent_id(str(claude.project), session)
    assert env.get("AGENT_RELAY_ID") == agent_id  # SessionStart's exports, once it has finished
    monitor_env = {k: v for k, v in env.items() if k not in SESSION_START_EXPORTS}

    with open(os.path.join(ROOT, "monitors", "monitors.json"), encoding="utf-8") as f:
        # a marketplace added from a local folder runs the plugin from that folder
        command = json.load(f)[0]["command"].replace("${CLAUDE_PLUGIN_ROOT}", ROOT)
    proc = subprocess.Popen(command, shell=True, env=monitor_env, cwd=str(claude.project), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr.readline() == "agent-relay: watching as %s on %s\n" % (agent_id, relay.url)
        wait_until(lambda: relay.call("GET", "/api/agents/" + agent_id).json["status"] == "online", 20)
        relay.register("backend-agent")
        message = relay.send("backend-agent", agent_id, body="Tests pass on main.")
        assert proc.stdout.readline() == "[msg:%d] from backend-agent: Tests pass on main.\n" % message["id"]
        agent = relay.call("GET", "/api/agents/" + agent_id).json
        assert agent["provider"] == "claude" and agent["meta"]["session"] == session
        earlier = relay.call("GET", "/api/agents/" + previous_id).json
        assert earlier["status"] == "offline" and earlier["provider"] == "claude"  # not revived as cli
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
