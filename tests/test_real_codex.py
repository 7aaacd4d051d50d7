"""The Codex connector against the real Codex CLI (the version `.ci/real-tools`
pins), not our fake: `agent-relay codex --headless` drives the real `codex
app-server`, whose model is a stand-in OpenAI Responses API on loopback
(streaming SSE like the real one), configured as a model provider in a temp
CODEX_HOME `config.toml`: whole turns run with no network and no login. And
`agent-relay codex install` in a temp HOME, checked with what the real
app-server reports (`hooks/list`, `skills/list`) and with `codex doctor`.
Every process started here is stopped here (checked by pid)."""

import http.server
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

import agent_relay
from conftest import SCRIPT, free_port, wait_until
from realtools import real_tool

CODEX = real_tool("codex")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CODEX is None, reason="run .ci/real-tools (npm) first")]


class ResponsesAPI(http.server.ThreadingHTTPServer):
    """A stand-in for POST /v1/responses: every request body is kept, every
    answer is one short assistant message streamed as server-sent events."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ResponsesHandler)
        self.bodies = []
        self.headers = []
        self.held = threading.Event()  # set while the first request that says HOLD waits for `release`
        self.release = threading.Event()
        self.url = "http://127.0.0.1:%d/v1" % self.server_address[1]

    def saw(self, text):
        return any(text in body for body in self.bodies)


class ResponsesHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def do_GET(self):  # /v1/models and the like: nothing to offer
        self._send(404, "application/json", b'{"error": {"message": "not here"}}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
        self.server.bodies.append(body)
        self.server.headers.append(dict(self.headers))
        number = len(self.server.bodies)
        if "HOLD" in body and not self.server.held.is_set():  # a long turn: the model is still thinking
            self.server.held.set()
            self.server.release.wait(60)
        events = [
            {"type": "response.created", "response": {"id": "resp_%d" % number}},
            {"type": "response.output_item.done", "item": {
                "type": "message", "role": "assistant", "id": "msg_%d" % number,
                "content": [{"type": "output_text", "text": "Noted."}]}},
            {"type": "response.completed", "response": {"id": "resp_%d" % number, "usage": {
                "input_tokens": 10, "input_tokens_details": None, "output_tokens": 2,
                "output_tokens_details": None, "total_tokens": 12}}},
        ]
        self._send(200, "text/event-stream", "".join(
            "event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event)) for event in events).encode())

    def _send(self, status, content_type, data):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module", autouse=True)
def tool_versions(request):
    version = subprocess.run([CODEX, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        request.config.pluginmanager.get_plugin("terminalreporter").write_line("real tools: %s (%s)" % (
            version, CODEX))


@pytest.fixture
def model():
    server = ResponsesAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def codex_env(relay, model, tmp_path):
    """A private HOME and CODEX_HOME whose only model provider is the stand-in."""
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "stand-in"\nmodel_provider = "stand-in"\napproval_policy = "never"\nsandbox_mode = "read-only"\n'
        "check_for_update_on_startup = false\n"  # no traffic beyond loopback
        '[analytics]\nenabled = false\n'
        '[model_providers.stand-in]\nname = "stand-in"\nbase_url = "%s"\nwire_api = "responses"\n'
        "request_max_retries = 0\nstream_max_retries = 0\n" % model.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "CLAUDE_", "CODEX_", "OPENAI_"))}
    env.update({"AGENT_RELAY_URL": relay.url, "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
                "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")})
    (tmp_path / "project").mkdir()
    return env


def children(pid):
    """Pids of the living processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_launcher(args, env, tmp_path, **options):
    """`agent-relay codex ARGS` in its own session, stderr to a file (an
    orphaned app-server must not keep a pipe open that the test reads)."""
    err = open(str(tmp_path / "launcher.err"), "w")
    proc = subprocess.Popen([sys.executable, SCRIPT, "codex"] + args, stdout=subprocess.PIPE, stderr=err, text=True,
                            env=env, cwd=str(tmp_path / "project"), start_new_session=True, **options)
    err.close()
    return proc


def app_server_pids(proc):
    """The npm `codex` launcher the sidecar started and the native app-server under it."""
    launcher = wait_until(lambda: [pid for pid in children(proc.pid) if b"app-server" in cmdline(pid)], timeout=30)
    return launcher + wait_until(lambda: [pid for pid in children(launcher[0]) if b"app-server" in cmdline(pid)],
                                 timeout=30)


def stop_launcher(proc, how, app_pids, tmp_path):
    """Stop `agent-relay codex` with `how`; it must exit 0 and take its
    app-server with it (checked by pid). Its stderr, as text."""
    how()
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = [pid for pid in app_pids if alive(pid)]
        for pid in app_pids:  # the app-server runs in its own process group
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()
    wait_until(lambda: not any(alive(pid) for pid in left), timeout=10)  # after SIGTERM: exited by itself
    assert not left, "the app-server outlived agent-relay codex"
    return (tmp_path / "launcher.err").read_text()


def test_an_idle_headless_codex_still_takes_each_message_as_a_turn(relay, model, codex_env, tmp_path):
    proc = start_launcher(["--headless", "--port", str(free_port()), "--codex-bin", CODEX, "--agent", "codex-real"],
                          codex_env, tmp_path)
    app_pids = []
    try:
        banner = [proc.stdout.readline(), proc.stdout.readline()]
        app_pids = app_server_pids(proc)
        assert len(app_pids) == 2
        wait_until(lambda: relay.call("GET", "/api/agents/codex-real").status == 200)
        relay.register("boss")
        for spell in (1, 2):
            # 30 s of quiet: the same code path as 10 minutes or a night (the
            # WebSocket read simply blocks; before the fix it gave up at 10 s).
            time.sleep(30)
            assert proc.poll() is None and relay.call("GET", "/api/agents/codex-real").json["status"] != "offline"
            text = "after idle spell %d, please run the tests" % spell
            sent = relay.send("boss", "codex-real", body=text)
            wait_until(lambda t=text: model.saw(t), timeout=20)  # it reached the model as a turn
            assert model.saw("[msg:%d] from boss" % sent["id"])
            assert relay.call("GET", "/api/agents/codex-real").json["status"] != "offline"
        assert "waiting for relay messages as codex-real" in banner[0]
        assert "--remote-auth-token-env AGENT_RELAY_CODEX_TOKEN" in banner[1]
    finally:
        err = stop_launcher(proc, lambda: proc.send_signal(signal.SIGTERM), app_pids, tmp_path)
    assert relay.call("GET", "/api/agents/codex-real").json["status"] == "offline", err
    assert "closed the connection" not in err


def test_codex_install_is_what_the_real_app_server_loads_and_doctor_agrees(relay, codex_env, tmp_path, monkeypatch):
    project = str(tmp_path / "project")

    def doctor():
        done = subprocess.run([sys.executable, SCRIPT, "codex", "doctor", "--codex-bin", CODEX], capture_output=True,
                              text=True, env=codex_env, cwd=project, timeout=60)
        return done.returncode, done.stdout.splitlines()
    code, lines = doctor()
    assert code == 1 and "FAIL Codex loads the agent-relay@agent-relay hooks: none (run `agent-relay codex " \
                          "install`)" in lines
    done = subprocess.run([sys.executable, SCRIPT, "codex", "install", "--codex-bin", CODEX], capture_output=True,
                          text=True, env=codex_env, cwd=project, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "/hooks" in done.stdout.splitlines()[-1]
    assert not os.path.exists(os.path.join(codex_env["HOME"], ".codex", "plugins", "agent-relay"))

    for name in ("HOME", "CODEX_HOME"):
        monkeypatch.setenv(name, codex_env[name])
    hooks, skills = agent_relay.codex_app_server_calls(CODEX, [("hooks/list", {"cwds": [project]}),
                                                               ("skills/list", {"cwds": [project]})])
    ours = [h for entry in hooks["data"] for h in entry["hooks"] if h["pluginId"] == "agent-relay@agent-relay"]
    assert sorted(h["eventName"] for h in ours) == ["sessionStart", "stop", "userPromptSubmit"]
    assert all(SCRIPT in h["command"] and h["trustStatus"] == "untrusted" for h in ours)
    names = {s["name"] for entry in skills["data"] for s in entry["skills"]}
    assert {"agent-relay:pair", "agent-relay:message", "agent-relay:status"} <= names

    code, lines = doctor()
    assert "ok   Codex loads the agent-relay@agent-relay hooks: sessionStart, stop, userPromptSubmit" in lines
    assert any(line.startswith("FAIL Codex runs none of these hooks until you trust them") and "/hooks" in line
               for line in lines)
    assert any(line.startswith("ok   Codex lists the agent-relay@agent-relay skills: agent-relay:disconnect")
               for line in lines)
    assert code == 1  # until the user trusts the hooks in Codex


def test_the_real_app_server_answers_the_keepalive_pings(codex_env, tmp_path):
    """The sidecar cuts a peer that answers nothing for two ping intervals:
    the real app-server must answer its pings, or every quiet spell would
    end the connection."""
    token_file = tmp_path / "token"
    token_file.write_text("a-capability-token")
    port = free_port()
    app = subprocess.Popen([CODEX, "app-server", "--listen", "ws://127.0.0.1:%d" % port, "--ws-auth",
                            "capability-token", "--ws-token-file", str(token_file)], env=codex_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert agent_relay.wait_for_port("127.0.0.1", port, 30)
        ws = agent_relay.WebSocket("ws://127.0.0.1:%d" % port, headers={"Authorization": "Bearer a-capability-token"})
        ws.keepalive(0.3)
        ended = []

        def read():
            try:
                ended.append(ws.recv())
            except OSError as error:  # the peer was cut, or the test closed the socket
                ended.append(error)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(3)  # ten intervals with nothing but pings and pongs
        assert ended == [] and time.monotonic() - ws.received < 1.0
        ws.close()
        reader.join(5)
    finally:
        agent_relay.stop_process_group(app)


def test_the_real_tui_attached_by_agent_relay_codex_gets_relay_messages_as_turns(relay, model, codex_env, tmp_path):
    """`agent-relay codex` with the real terminal UI (`codex --remote`, with
    the capability token) in a pseudo-terminal. The sidecar adopts the
    thread the TUI starts without thread/resume (the app-server refuses it:
    no rollout yet) and goes by the thread's status: idle, a relay message
    becomes a turn there; while a prompt typed in the TUI is running, a
    relay message is steered into that very turn. SIGTERM ends it all."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the launcher on the pseudo-terminal
        try:
            os.chdir(str(tmp_path / "project"))
            os.execve(sys.executable, [sys.executable, SCRIPT, "codex", "--codex-bin", CODEX, "--agent", "codex-tui"],
                      dict(codex_env, TERM="xterm-256color"))
        finally:
            os._exit(127)
    screen = bytearray()

    def pump(seconds):
        """Read the terminal for `seconds`, answering the TUI's cursor-position queries."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the terminal is gone: everything on it exited
                    return
                screen.extend(data)
                if b"\x1b[6n" in data:
                    os.write(fd, b"\x1b[1;1R")

    def pump_until(condition, seconds=30):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, bytes(screen)[-3000:]
            pump(0.1)

    def turn_of(text):
        """The turn ids of the model requests that carried `text`."""
        return {json.loads(headers.get("x-codex-turn-metadata") or "{}").get("turn_id")
                for headers, body in zip(model.headers, model.bodies) if text in body}
    app_pids = []
    status = None
    try:
        pump_until(lambda: [p for p in children(pid) if b"app-server" in cmdline(p)])
        launcher = [p for p in children(pid) if b"app-server" in cmdline(p)]
        pump_until(lambda: [p for p in children(launcher[0]) if b"app-server" in cmdline(p)])
        app_pids = launcher + [p for p in children(launcher[0]) if b"app-server" in cmdline(p)]
        pump_until(lambda: relay.call("GET", "/api/agents/codex-tui").status == 200)
        relay.register("boss")

        sent = relay.send("boss", "codex-tui", body="hello from the relay, TUI")  # Codex is idle: a turn
        pump_until(lambda: model.saw("[msg:%d] from boss: hello from the relay, TUI" % sent["id"]))
        pump_until(lambda: relay.call("GET", "/api/agents/codex-tui").json["status"] == "idle")

        for key in b"the user's prompt, HOLD":  # the user types a prompt; the model keeps thinking
            os.write(fd, bytes([key]))
            pump(0.02)
        pump(0.5)
        os.write(fd, b"\r")
        pump_until(model.held.is_set)
        pump_until(lambda: relay.call("GET", "/api/agents/codex-tui").json["status"] == "busy")
        sent = relay.send("boss", "codex-tui", body="also check the auth module")
        pump_until(lambda: relay.inbox("codex-tui", unread="true") == [])  # delivered
        model.release.set()
        pump_until(lambda: model.saw("[msg:%d] from boss: also check the auth module" % sent["id"]))
        typed = turn_of("the user's prompt, HOLD")
        assert len(typed) == 1 and turn_of("also check the auth module") == typed  # steered into the user's turn
        assert relay.call("GET", "/api/agents/codex-tui").json["status"] != "offline"
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            pump(0.1)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
        left = [p for p in app_pids if alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
    text = re.sub(rb"\x1b\[[0-9;?<>]*[a-zA-Z]", b"", bytes(screen)).decode("utf-8", "replace")
    assert "no rollout" not in text and "Codex refused" not in text, text[-3000:]
    assert os.waitstatus_to_exitcode(status) == 0 and not left
    assert relay.call("GET", "/api/agents/codex-tui").json["status"] == "offline"
