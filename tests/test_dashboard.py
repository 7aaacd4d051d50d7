"""The dashboard (dashboard.html) in a real headless Chromium.

Each test starts the real relay (agent_relay.py) as a subprocess on a free
loopback port with a temporary database, opens the page in Debian's
`chromium` and drives it over the DevTools protocol with the small stdlib
WebSocket client below: no extra Python packages. Every process started
here is stopped by id when its fixture ends. Chromium is told to resolve no
host name but 127.0.0.1 and to use no proxy, so all traffic stays on
loopback. The Telegram bridge talks to FakeBotApi, a stdlib HTTP server on
loopback, never to the real Bot API.

Skipped when Chromium is not installed (`.ci/run` installs it).

Run `python3 tests/test_dashboard.py docs/dashboard.png` to write the
README screenshot from a relay seeded with a few agents, messages, tasks, a
pair and a Telegram bridge (`--dark` for the dark theme, `--width`/`--height` for the viewport; a
width under 760 emulates a phone).
"""

import base64
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

import agent_relay
from conftest import json_post_server, wait_until

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "agent_relay.py"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(not SERVER.exists(), reason="agent_relay.py is missing"),
]

# Never route test traffic through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-default-browser-check", "--no-proxy-server",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    # Resolve nothing but loopback: no request can leave the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    "--window-size=1440,900",
]


# ---------------------------------------------------------------------------
# The relay under test
# ---------------------------------------------------------------------------

class Relay:
    """A running agent_relay.py; `call()` speaks its JSON API."""

    def __init__(self, proc, url, token=None):
        self.proc = proc
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method, path, body=None, token=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/api" + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        token = token or self.token
        if token:
            request.add_header("Authorization", "Bearer " + token)
        try:
            with OPENER.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")


def _read_line(stream, timeout):
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            break
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break
        line += chunk
    return line.decode("utf-8", "replace")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(proc):
    """SIGTERM (the relay's clean shutdown), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _stop_group(proc):
    """Stop Chromium and every helper it spawned (they share its process
    group, made by start_new_session), and wait until none is left."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        if not _group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so the group can empty
            if not _group_alive(proc.pid):
                break
            time.sleep(0.05)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def running_relay(folder, token=None, port=0, extra_env=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in ("AGENT_RELAY_TOKEN", "AGENT_RELAY_INTEGRATIONS", "AGENT_RELAY_CORS_ORIGINS",
                 "PORT", "HOST", "DB_PATH"):
        env.pop(name, None)
    for name in list(env):
        if name.startswith("AGENT_RELAY_TELEGRAM_"):
            del env[name]
    if token:
        env["AGENT_RELAY_TOKEN"] = token
    env.update(extra_env or {})
    with open(folder / "relay.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(port), "--host", "127.0.0.1",
             "--db-path", str(folder / "relay.db")],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=str(folder))
    try:
        line = _read_line(proc.stdout, 15)
        words = [w.rstrip(")") for w in line.split() if w.startswith("http://")]
        if not words:
            raise RuntimeError("relay did not start: %r\n%s" % (line, (folder / "relay.log").read_text()))
        yield Relay(proc, words[0], token)
    finally:
        _stop(proc)
        proc.stdout.close()


class FakeBotApi:
    """A tiny Telegram Bot API on loopback: getUpdates long-polls briefly and
    serves queued updates from the offset asked; sendMessage answers ok.
    `fail_updates` makes that many getUpdates calls answer an error first."""

    def __init__(self, fail_updates=0):
        self.lock = threading.Condition()
        self.updates, self.sent, self.calls = [], [], []
        self.fail_updates = fail_updates
        self.http = json_post_server(lambda path, payload: self.answer(path.rsplit("/", 1)[-1], payload))
        self.url = self.http.url

    def env(self, **extra):
        env = {"AGENT_RELAY_TELEGRAM_TOKEN": "123:abc", "AGENT_RELAY_TELEGRAM_CHAT_IDS": "1",
               "AGENT_RELAY_TELEGRAM_API": self.url, "AGENT_RELAY_TELEGRAM_POLL_SECONDS": "1"}
        env.update(extra)
        return env

    def answer(self, method, payload):
        with self.lock:
            self.calls.append(method)
            if method == "getUpdates":
                if self.fail_updates:
                    self.fail_updates -= 1
                    return 502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}
                offset = payload.get("offset", 0)
                ready = [u for u in self.updates if u["update_id"] >= offset]
                if not ready:  # a short long-poll, so the relay does not spin
                    self.lock.wait(min(payload.get("timeout", 0), 0.3))
                    ready = [u for u in self.updates if u["update_id"] >= offset]
                return 200, {"ok": True, "result": ready}
            if method == "sendMessage":
                self.sent.append(payload)
                return 200, {"ok": True, "result": {"message_id": len(self.sent), "chat": {"id": payload["chat_id"]},
                                                    "text": payload["text"]}}
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}

    def say(self, text, chat_id=1, username="alice"):
        with self.lock:
            update_id = 100 + len(self.updates)
            self.updates.append({"update_id": update_id, "message": {
                "message_id": update_id, "from": {"id": 42, "username": username},
                "chat": {"id": chat_id, "type": "private"}, "text": text}})
            self.lock.notify_all()

    def count(self, method):
        with self.lock:
            return self.calls.count(method)

    def close(self):
        self.http.close()


@contextmanager
def fake_bot_api(**options):
    fake = FakeBotApi(**options)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def server(tmp_path):
    with running_relay(tmp_path / "relay") as relay:
        yield relay


@pytest.fixture
def token_server(tmp_path):
    with running_relay(tmp_path / "relay-token", token="s3cret-token") as relay:
        yield relay


# ---------------------------------------------------------------------------
# Chromium over the DevTools protocol
# ---------------------------------------------------------------------------

class WebSocket(agent_relay.WebSocket):
    """The relay's own RFC 6455 client, for the DevTools socket; a close is an error here."""

    def recv(self):
        text = super().recv()
        if text is None:
            raise ConnectionError("DevTools socket closed")
        return text


class Page:
    """One browser tab: CDP calls, JS evaluation, waiting, and its console."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")

    def call(self, method, params=None, timeout=15):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        self.ws.sock.settimeout(timeout)
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError("%s: %s" % (method, message["error"]))
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def js(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError("JS failed: %s\n%s" % (expression, json.dumps(result["exceptionDetails"])[:2000]))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=5.0, poll=0.02):
        """Poll a JS expression until it is truthy; return (value, seconds waited)."""
        start = time.monotonic()
        while True:
            value = self.js(expression)
            if value:
                return value, time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError("timed out after %.1fs waiting for: %s" % (timeout, expression))
            time.sleep(poll)

    def goto(self, url):
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href.startsWith(%s)" % json.dumps(url))

    def viewport(self, width, height, mobile=False, scale=1, dark=False):
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})
        self.call("Emulation.setEmulatedMedia",
                  {"features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]})

    def screenshot(self, path, full_page=False):
        params = {"format": "png", "captureBeyondViewport": full_page}
        data = base64.b64decode(self.call("Page.captureScreenshot", params, timeout=30)["data"])
        Path(path).write_bytes(data)
        return data

    def click(self, selector, timeout=5.0):
        """Click the element once it exists and is enabled, as a user would wait to.
        `element.click()` on a disabled button dispatches no click at all, and the
        dashboard re-enables a button in the animation frame after its request ends:
        a click in between would be lost without a trace. Check and click run in
        one evaluation, so no render can come between them."""
        self.wait_for("(() => { const e = document.querySelector(%s); if (!e || e.disabled) return false;"
                      " e.click(); return true; })()" % json.dumps(selector), timeout=timeout)

    def fill(self, selector, value):
        self.js("(() => { const e = document.querySelector(%s); e.value = %s;"
                " e.dispatchEvent(new Event('input', {bubbles: true})); })()"
                % (json.dumps(selector), json.dumps(value)))

    def problems(self, allowed_network=()):
        """Console errors and uncaught exceptions; `allowed_network` lists URL parts
        whose failed loads are expected (e.g. an action the server refuses)."""
        self.js("0")  # drain events that arrived since the last call
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails"))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                if entry.get("source") == "network" and any(part in entry.get("url", "") for part in allowed_network):
                    continue
                found.append("%s %s" % (entry.get("text"), entry.get("url", "")))
        return found


class Browser:
    def __init__(self, proc, port):
        self.proc = proc
        self.base = "http://127.0.0.1:%d" % port

    def _json(self, path, method="GET"):
        request = urllib.request.Request(self.base + path, method=method)
        with OPENER.open(request, timeout=10) as response:
            return json.loads(response.read())

    @contextmanager
    def page(self, width=1440, height=900, dark=False):
        target = self._json("/json/new?about:blank", method="PUT")
        ws = WebSocket(target["webSocketDebuggerUrl"])
        try:
            page = Page(ws)
            page.viewport(width, height, dark=dark)
            yield page
        finally:
            ws.close()
            try:
                self._json("/json/close/" + target["id"])
            except (urllib.error.URLError, ValueError, OSError):
                pass


@contextmanager
def running_browser(profile):
    log = open(os.path.join(profile, "chromium.log"), "wb")
    command = [CHROMIUM] + CHROMIUM_FLAGS + ["--user-data-dir=" + os.path.join(profile, "data"), "about:blank"]
    proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "data" / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start:\n" + Path(profile, "chromium.log").read_text()[-3000:])
            time.sleep(0.05)
        yield Browser(proc, int(port_file.read_text().split()[0]))
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with running_browser(str(tmp_path_factory.mktemp("chromium"))) as b:
        yield b


def agent(agent_id, label, **extra):
    body = {"id": agent_id, "label": label, "machine": "ci-box", "project": "relay", "provider": "claude",
            "capabilities": ["chat"], "tags": []}
    body.update(extra)
    return body


# JS snippets for Page.js / Page.wait_for; selectors are quoted by json.dumps.
def q(selector):
    return "document.querySelector(%s)" % json.dumps(selector)


def exists(selector):
    return "!!" + q(selector)


def text_of(selector):
    return "(%s || {}).textContent" % q(selector)


def count(selector):
    return "document.querySelectorAll(%s).length" % json.dumps(selector)


def message(message_id, inner=""):
    return ('[data-message-id="%d"] ' % message_id + inner).strip()


def task(status, task_id, inner=""):
    return ('[data-status="%s"] [data-task-id="%d"] ' % (status, task_id) + inner).strip()


CONN_STATE = "document.getElementById('conn').dataset.state"
OPTIONAL_ROUTES = ("/api/tasks", "/api/pairs")  # may answer 404 until the server serves them


def open_dashboard(page, relay):
    page.goto(relay.url + "/")
    page.wait_for(CONN_STATE + " === 'live'")
    page.wait_for("agentRelayDashboard.state.loaded")


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_page_loads_shows_agents_and_a_message_within_a_second(server, browser, tmp_path):
    reviewer = agent("ci-backend-1", "backend fixer", capabilities=["chat", "review"], tags=["backend"])
    assert server.call("POST", "/agents", reviewer)[0] == 201
    with browser.page() as page:
        open_dashboard(page, server)
        card, _ = page.wait_for(text_of('[data-agent-id="ci-backend-1"]'))
        for text in ("backend fixer", "ci-backend-1", "ci-box", "claude", "review", "backend"):
            assert text in card

        body = "Migration looks clean <b>not html</b>"
        status, sent = server.call("POST", "/messages", {"from": "ci-backend-1", "to": "broadcast", "body": body})
        assert status == 201
        shown, waited = page.wait_for(text_of(message(sent["id"], ".msg-body")), timeout=1.0)
        assert waited < 1.0
        assert shown == body  # shown as text, never as markup

        # The counters follow (GET /api/stats, refreshed after events).
        page.wait_for(text_of('[data-stat="messages.total"] .stat-value') + " === '1'", timeout=3)
        # Agents that register later appear live too, without a reload.
        server.call("POST", "/agents", agent("ci-tests-2", "test writer", provider="codex"))
        page.wait_for(exists('[data-agent-id="ci-tests-2"]'), timeout=2)

        shot = tmp_path / "dashboard.png"
        data = page.screenshot(shot)
        assert data.startswith(b"\x89PNG") and shot.stat().st_size > 10000
        assert page.problems(allowed_network=OPTIONAL_ROUTES) == []


def test_the_messages_header_keeps_up_with_the_counters_and_a_phone_shows_them_all(server, browser):
    assert server.call("POST", "/agents", agent("ci-sender", "sender"))[0] == 201
    with browser.page() as page:
        open_dashboard(page, server)
        for total in (1, 2, 3):
            server.call("POST", "/messages", {"from": "ci-sender", "to": "broadcast", "body": "n%d" % total})
            page.wait_for(text_of('[data-stat="messages.total"] .stat-value') + " === '%d'" % total, timeout=3)
            page.wait_for(text_of("#messages-count") + " === '%d total'" % total, timeout=3)
        page.viewport(390, 844, mobile=True)
        page.wait_for("innerWidth === 390")
        strip = "document.getElementById('stats')"
        assert page.js(count(".stat")) == 10
        assert page.js(strip + ".scrollWidth <= %s.clientWidth" % strip)
        assert page.js("Array.from(document.querySelectorAll('.stat')).every((e) => { const r = "
                       "e.getBoundingClientRect(); return r.left >= 0 && r.right <= innerWidth && r.width > 0; })")
        assert page.js("Array.from(document.querySelectorAll('.stat-label')).every((e) => "
                       "e.scrollWidth <= e.clientWidth)")
        assert page.problems(allowed_network=OPTIONAL_ROUTES) == []


def test_threads_expand_claims_show_and_filters_narrow(server, browser):
    server.call("POST", "/agents", agent("ci-a", "reviewer", capabilities=["review"]))
    server.call("POST", "/agents", agent("ci-b", "author"))
    _, root = server.call("POST", "/messages", {"from": "ci-b", "to": "cap:review", "body": "please review",
                                                "claimable": True})
    with browser.page() as page:
        open_dashboard(page, server)
        page.wait_for(text_of(message(root["id"], ".claim")) + " === 'claimable · unclaimed'")
        server.call("POST", "/messages/%d/claim" % root["id"], {"agentId": "ci-a"})
        page.wait_for("/claimed by ci-a/.test(%s)" % text_of(message(root["id"], ".claim")), timeout=2)

        _, reply = server.call("POST", "/messages", {"from": "ci-a", "to": "ci-b", "body": "LGTM",
                                                     "replyTo": root["id"]})
        page.wait_for(exists(message(reply["id"], "[data-action=thread]")), timeout=2)
        page.click(message(reply["id"], "[data-action=thread]"))
        texts, _ = page.wait_for("Array.from(document.querySelectorAll(%s)).map(li => li.textContent)"
                                 % json.dumps(message(reply["id"], ".thread li")))
        assert len(texts) == 2 and "please review" in texts[0] and "LGTM" in texts[1]

        # Filters narrow the feed: by agent, then by text; reset shows all.
        server.call("POST", "/agents", agent("ci-c", "bystander"))
        _, other = server.call("POST", "/messages", {"from": "ci-c", "to": "broadcast", "body": "unrelated chatter"})
        page.wait_for(exists(message(other["id"])), timeout=2)
        page.fill("#f-agent", "ci-c")
        page.wait_for(count("#message-list > li") + " === 1")
        page.fill("#f-agent", "")
        page.fill("#f-text", "lgtm")
        page.wait_for(count("#message-list > li") + " === 1 && " + exists(message(reply["id"])))
        page.click("[type=reset]")
        page.wait_for(count("#message-list > li") + " === 3")
        assert page.problems(allowed_network=OPTIONAL_ROUTES) == []


def test_human_can_send_and_sees_the_servers_refusals(server, browser):
    server.call("POST", "/agents", agent("ci-worker", "worker"))
    with browser.page() as page:
        open_dashboard(page, server)
        page.fill("#send-to", "ci-worker")
        page.fill("#send-body", "please rebase")
        page.click("#send-btn")
        page.wait_for("/Sent #\\d+/.test(%s)" % text_of("#send-ok"))
        sent = server.call("GET", "/messages?order=desc&limit=1")[1]["messages"][0]
        assert (sent["from"], sent["to"], sent["body"]) == ("dashboard", "ci-worker", "please rebase")

        # A target the relay refuses: its own error sentence is shown.
        status, refusal = server.call("POST", "/messages", {"from": "dashboard", "to": "nobody-here", "body": "x"})
        assert status == 404
        page.fill("#send-to", "nobody-here")
        page.fill("#send-body", "anyone?")
        page.click("#send-btn")
        shown, _ = page.wait_for(text_of("#send-error"))
        assert shown == refusal["error"]

        # Delete takes two clicks, then the message is gone here and on the relay.
        delete = message(sent["id"], "[data-action=delete-message]")
        page.click(delete)
        page.wait_for(text_of(delete) + " === 'Really delete?'")
        page.click(delete)
        page.wait_for("!" + exists(message(sent["id"])))
        assert server.call("GET", "/messages/%d" % sent["id"])[0] == 404

        # Nobody chosen under "Claim as": the page asks instead of claiming as
        # an agent that does not exist; as a real agent it goes through.
        _, work = server.call("POST", "/messages", {"from": "ci-worker", "to": "broadcast", "body": "who takes this?",
                                                    "claimable": True})
        claim = message(work["id"], "[data-action=claim-message]")
        page.wait_for(exists(claim), timeout=2)
        assert page.js(q("#act-as") + ".value") == ""
        page.click(claim)
        shown, _ = page.wait_for(text_of(message(work["id"], ".error")))
        assert shown.startswith("Choose who acts") and page.js("document.activeElement.id") == "act-as"
        assert server.call("GET", "/messages/%d" % work["id"])[1]["claimedBy"] is None
        # A name the relay does not know is refused in the server's words.
        status, refusal = server.call("POST", "/messages/%d/claim" % work["id"], {"agentId": "dashboard"})
        assert status == 404
        page.fill("#act-as", "dashboard")
        page.click(claim)
        page.wait_for(text_of(message(work["id"], ".error")) + " === %s" % json.dumps(refusal["error"]))
        page.fill("#act-as", "ci-worker")
        page.click(claim)
        page.wait_for("/claimed by ci-worker/.test(%s)" % text_of(message(work["id"], ".claim")))
        assert page.problems(allowed_network=OPTIONAL_ROUTES + ("/api/messages",)) == []


def test_tasks_board_counts_occurrences_shows_history_and_actions(server, browser):
    alarm = {"type": "alarm", "severity": "critical", "dedupeKey": "prod-api:5xx", "title": "prod-api 5xx rate high",
             "target": "cap:ops", "channel": "alerts"}
    status, created = server.call("POST", "/integrations/events", alarm)
    if status == 404:
        pytest.skip("this relay does not serve tasks yet")
    assert status == 201
    task_id = created["task"]["id"]
    server.call("POST", "/agents", agent("ci-ops", "ops", capabilities=["ops"]))
    with browser.page() as page:
        open_dashboard(page, server)
        page.wait_for("/×1/.test(%s)" % text_of(task("open", task_id)))
        assert server.call("POST", "/integrations/events", alarm)[1]["action"] == "deduped"
        page.wait_for("/×2/.test(%s)" % text_of(task("open", task_id)), timeout=2)

        page.click(task("open", task_id, "[data-action=task-history]"))
        history, _ = page.wait_for("Array.from(document.querySelectorAll(%s)).map(li => li.textContent).join(' | ')"
                                   % json.dumps('[data-task-id="%d"] .history li' % task_id))
        assert "created" in history and "occurrence" in history

        # Resolving an open task as "dashboard" is refused: the server's words show.
        status, refusal = server.call("PATCH", "/tasks/%d/status" % task_id, {"agentId": "dashboard", "status": "done"})
        assert status >= 400
        page.fill("#act-as", "dashboard")
        page.click(task("open", task_id, "[data-action=resolve-task]"))
        shown, _ = page.wait_for(text_of('[data-task-id="%d"] .error' % task_id))
        assert shown == refusal["error"]

        # The board follows the stream, so the claimed card can show before the
        # claim's own answer is in, with Resolve still disabled. Hold that answer
        # to meet that moment every time: Resolve is usable once it arrives, and
        # the late answer must not move the card back from a newer state.
        page.js("""(() => { const fetch = window.fetch;
            window.fetch = (url, init) => fetch(url, init).then((res) => !/[/]claim$/.test(url) ? res
                : new Promise((resolve) => { window.releaseClaim = () => resolve(res); })); })()""")
        page.fill("#act-as", "ci-ops")
        page.click(task("open", task_id, "[data-action=claim-task]"))
        resolve = task("claimed", task_id, "[data-action=resolve-task]")
        page.wait_for("window.releaseClaim && /claimed by ci-ops/.test(%s) && (%s || {}).disabled"
                      % (text_of(task("claimed", task_id)), q(resolve)), timeout=2)
        time.sleep(0.005)  # a later updatedAt than the claim's
        started = server.call("PATCH", "/tasks/%d/status" % task_id, {"agentId": "ci-ops", "status": "in_progress"})
        assert started[0] == 200
        page.wait_for(exists(task("in_progress", task_id)), timeout=2)
        page.js("window.releaseClaim()")
        resolve = task("in_progress", task_id, "[data-action=resolve-task]")
        page.wait_for("!(%s || {disabled: true}).disabled" % q(resolve), timeout=2)  # the claim's answer is in
        assert page.js(exists(task("claimed", task_id))) is False, "the claim's late answer moved the card back"
        page.click(resolve)
        page.wait_for(exists(task("done", task_id)), timeout=2)
        assert server.call("GET", "/tasks/%d" % task_id)[1]["status"] == "done"
        assert page.problems(allowed_network=("/api/tasks/%d/status" % task_id, "/api/pairs")) == []


def test_pairs_show_and_follow_their_status(server, browser):
    server.call("POST", "/agents", agent("ci-left", "left"))
    server.call("POST", "/agents", agent("ci-right", "right"))
    with browser.page() as page:
        open_dashboard(page, server)
        status, pair = server.call("POST", "/pairs", {"from": "ci-left", "to": "ci-right",
                                                      "objective": "Debug flaky auth tests"})
        if status == 404:
            pytest.skip("this relay does not serve pairs yet")
        assert status == 201
        item = '[data-pair-id="%s"]' % pair["id"]
        text, _ = page.wait_for(text_of(item), timeout=2)
        assert "left" in text and "right" in text and "pending" in text and "Debug flaky auth tests" in text
        server.call("POST", "/pairs/%s/accept" % pair["id"], {"agentId": "ci-right"})
        page.wait_for("/active/.test(%s)" % text_of(item + " .pair-status"), timeout=2)
        assert page.problems(allowed_network=("/api/tasks",)) == []


def test_token_prompt_then_data_with_the_right_token(token_server, browser):
    token_server.call("POST", "/agents", agent("ci-secure", "secured agent"))
    with browser.page() as page:
        page.goto(token_server.url + "/")
        page.wait_for("!%s.hidden" % q("#token-dialog"))
        assert page.js(CONN_STATE) == "auth"
        assert page.js(exists("[data-agent-id]")) is False  # the page itself holds no data

        page.fill("#token-input", "wrong-token")
        page.js(q("#token-form") + ".requestSubmit()")
        page.wait_for("/refused/.test(%s)" % text_of("#token-error"))
        assert page.js(q("#token-dialog") + ".hidden") is False

        page.fill("#token-input", "s3cret-token")
        page.js(q("#token-form") + ".requestSubmit()")
        page.wait_for(exists('[data-agent-id="ci-secure"]'))
        page.wait_for(CONN_STATE + " === 'live'")
        assert page.js("localStorage.getItem('agentRelay.token')") == "s3cret-token"

        # Live events flow with the token header, and a reload asks nothing.
        _, sent = token_server.call("POST", "/messages", {"from": "ci-secure", "to": "broadcast", "body": "authed"})
        page.wait_for(exists(message(sent["id"])), timeout=1.0)
        page.goto(token_server.url + "/")
        page.wait_for(exists('[data-agent-id="ci-secure"]'))
        assert page.js(q("#token-dialog") + ".hidden") is True
        # 401s from the tokenless first load and the wrong token are expected.
        assert page.problems(allowed_network=("/api/",)) == []


def test_shows_who_it_acts_as_and_who_sent_each_message(tmp_path, browser):
    with running_relay(tmp_path / "relay", token="s3cret-token", extra_env={"AGENT_IDENTITY": "token"}) as relay:
        status, registered = relay.call("POST", "/agents", agent("ci-me", "me", capabilities=["review"]))
        assert status == 201
        relay.call("POST", "/agents", agent("ci-peer", "peer"))
        _, work = relay.call("POST", "/messages", {"from": "ci-peer", "to": "cap:review", "body": "review please",
                                                   "claimable": True})
        with browser.page() as page:
            page.goto(relay.url + "/")
            page.wait_for("!%s.hidden" % q("#token-dialog"))
            page.fill("#token-input", "s3cret-token")
            page.js(q("#token-form") + ".requestSubmit()")
            page.wait_for(CONN_STATE + " === 'live'")
            page.wait_for(text_of("#acting") + " === 'as admin'")
            page.wait_for(text_of(message(work["id"], ".sent-by")) + " === 'via admin'")
            # With an agent token the page is that agent: it claims and sends as it, nobody else.
            page.js("localStorage.setItem('agentRelay.token', %s)" % json.dumps(registered["agentToken"]))
            page.goto(relay.url + "/")
            page.wait_for(CONN_STATE + " === 'live'")
            page.wait_for(text_of("#acting") + " === 'as agent:ci-me'")
            assert page.js(q("#act-as") + ".value") == "ci-me" and page.js(q("#act-as") + ".readOnly") is True
            page.wait_for(exists(message(work["id"], "[data-action=claim-message]")))
            page.click(message(work["id"], "[data-action=claim-message]"))
            page.wait_for("/claimed by ci-me/.test(%s)" % text_of(message(work["id"], ".claim")), timeout=2)
            page.fill("#send-to", "ci-peer")
            page.fill("#send-body", "on it")
            page.js(q("#send-form") + ".requestSubmit()")
            def sent_on_it():
                return [m for m in relay.call("GET", "/messages")[1]["messages"] if m["body"] == "on it"]
            wait_until(sent_on_it)
            sent = sent_on_it()[0]
            assert sent["from"] == "ci-me" and sent["sentBy"] == "agent:ci-me"
            page.wait_for(text_of(message(sent["id"], ".sent-by")) + " === 'via agent:ci-me'", timeout=2)
            assert page.problems(allowed_network=("/api/",)) == []


def test_reconnects_and_resumes_from_the_last_event_id(tmp_path, browser):
    folder = tmp_path / "relay"
    with browser.page() as page:
        with running_relay(folder) as first:
            first.call("POST", "/agents", agent("ci-resume", "resumer"))
            port = urllib.parse.urlsplit(first.url).port
            open_dashboard(page, first)
            _, seen = first.call("POST", "/messages", {"from": "ci-resume", "to": "broadcast", "body": "before"})
            page.wait_for(exists(message(seen["id"])))
            page.js("window.sameDocument = true")
        page.wait_for(CONN_STATE + " === 'reconnecting'", timeout=10)
        with running_relay(folder, port=port) as second:
            _, missed = second.call("POST", "/messages", {"from": "ci-resume", "to": "broadcast", "body": "while away"})
            # Sent before the page is back (its retry waits about 3 s), so
            # only a resume with Last-Event-ID can deliver it.
            assert page.js(CONN_STATE) == "reconnecting"
            page.wait_for(exists(message(missed["id"])), timeout=10)
            assert page.js("window.sameDocument === true && " + CONN_STATE) == "live"
        assert page.problems(allowed_network=("/api/",)) == []


def channel(name, kind, inner=""):
    return ('[data-kind="%s"][data-channel="%s"] ' % (kind, name) + inner).strip()


def test_channels_panel_shows_the_telegram_bridge_and_topic_channels(tmp_path, browser):
    # The fake Bot API fails the first getUpdates: the bridge recovers and
    # keeps the time of its last error.
    with fake_bot_api(fail_updates=1) as bot, \
            running_relay(tmp_path / "relay", extra_env=bot.env()) as relay:
        relay.call("POST", "/agents", agent("ci-deployer", "deployer", channels=["deploys"]))
        _, on_topic = relay.call("POST", "/messages", {"from": "ci-deployer", "to": "broadcast", "channel": "deploys",
                                                       "body": "v2.3 is out"})
        relay.call("POST", "/messages", {"from": "ci-deployer", "to": "broadcast", "body": "off topic"})

        def bridge_state():
            status, data = relay.call("GET", "/channels")
            if status == 404:
                pytest.skip("this relay does not serve channels yet")
            found = [c for c in data["channels"] if c["kind"] == "bridge"]
            return found and found[0]["state"] == "connected" and found[0]
        bridge = wait_until(bridge_state, timeout=8)
        assert bridge["lastErrorAt"] and not bridge["lastError"]

        with browser.page() as page:
            open_dashboard(page, relay)
            badge = channel("telegram", "bridge", ".bridge-state")
            page.wait_for(text_of(badge) + " === 'connected'")
            text = page.js(text_of(channel("telegram", "bridge")))
            for part in ("telegram", "bridge", "1 chat allowed", "default target broadcast", "0 received", "0 ignored",
                         "0 sent", "0 pending", "recovered; last error"):
                assert part in text, (part, text)
            assert re.match(r"^(just now|\d+s ago)$", page.js(text_of(channel("telegram", "bridge", "time"))))
            # The badge is coloured by state: green when connected.
            same_colour = """((sel, variable) => { const probe = document.createElement('span');
                probe.style.color = 'var(' + variable + ')'; document.body.append(probe);
                const want = getComputedStyle(probe).color; probe.remove();
                return getComputedStyle(document.querySelector(sel)).color === want; })(%s, %s)"""
            assert page.js(same_colour % (json.dumps(badge), json.dumps("--ok")))

            # A topic channel from the agent's subscription; a click filters the feed by it.
            topic = channel("deploys", "topic")
            assert "1 subscriber" in page.js(text_of(topic))
            page.click(topic + " [data-action=filter-channel]")
            page.wait_for(count("#message-list > li") + " === 1 && " + exists(message(on_topic["id"])))
            assert page.js(q("#f-channel") + ".value") == "deploys"
            assert page.js(q(topic) + ".classList.contains('selected')")
            page.click(topic + " [data-action=filter-channel]")
            page.wait_for(count("#message-list > li") + " === 2")

            # New topics appear live: from a message's channel and from a subscription.
            relay.call("POST", "/messages", {"from": "ci-deployer", "to": "broadcast", "channel": "releases",
                                             "body": "rc1 tagged"})
            relay.call("PATCH", "/agents/ci-deployer", {"channels": ["deploys", "night-ops"]})
            both = exists(channel("releases", "topic")) + " && " + exists(channel("night-ops", "topic"))
            page.wait_for(both, timeout=3)
            assert "0 subscribers" in page.js(text_of(channel("releases", "topic")))

            # The bridge's counters change without events: the panel polls them.
            bot.say("is the deploy done?")
            relay.call("POST", "/messages", {"from": "ci-deployer", "to": "channel:telegram", "body": "deploy done"})
            wait_until(lambda: bot.sent, timeout=5)
            counts = channel("telegram", "bridge", ".bridge-counts")
            page.wait_for("/1 received/.test(%s) && /1 sent/.test(%s)" % (text_of(counts), text_of(counts)), timeout=8)

            # A bridge in trouble: a red badge, its error and how long ago.
            page.js("""(() => { const d = agentRelayDashboard;
                const at = new Date(Date.now() - 125000).toISOString();
                d.state.channels = d.state.channels.map((c) => c.kind !== 'bridge' ? c : Object.assign({}, c,
                    {state: 'error', lastError: 'Unauthorized', lastErrorAt: at}));
                d.mark('channels'); d.render(); })()""")
            assert page.js(text_of(badge)) == "error"
            assert page.js(same_colour % (json.dumps(badge), json.dumps("--danger")))
            assert page.js(text_of(channel("telegram", "bridge", ".bridge-error"))) == "⚠ Unauthorized · 2m ago"

            # On a phone, in the dark theme, the panel fits the screen.
            page.viewport(390, 844, mobile=True, dark=True)
            page.wait_for("innerWidth === 390")
            page.click('.tabs a[href="#channels-panel"]')
            assert page.js("document.documentElement.scrollWidth <= innerWidth")
            assert page.js("document.getElementById('channels-panel').getBoundingClientRect().right <= innerWidth")
            assert page.js(q(badge) + ".getBoundingClientRect().right <= innerWidth")
            assert page.problems(allowed_network=OPTIONAL_ROUTES) == []


def test_stays_fast_with_1000_agents_and_10000_messages(server, browser):
    with browser.page() as page:
        open_dashboard(page, server)
        elapsed_ms = page.js("""(() => {
            const d = agentRelayDashboard, now = new Date().toISOString(), t0 = performance.now();
            for (let i = 0; i < 1000; i++) d.applyEvent('agent.status', {id: 'bulk-' + i, label: 'agent ' + i,
                status: ['online', 'busy', 'idle', 'offline'][i % 4], machine: 'm' + (i % 20), provider: 'claude',
                capabilities: ['chat'], tags: ['t' + (i % 7)], channels: [], lastSeenAt: now});
            for (let i = 1; i <= 10000; i++) d.applyEvent('message.new', {id: 1000000 + i, from: 'bulk-' + (i % 1000),
                to: 'broadcast', body: 'message ' + i, kind: 'message', threadId: 1000000 + i, createdAt: now,
                recipients: []});
            d.render();
            return performance.now() - t0;
        })()""")
        assert elapsed_ms < 3000
        assert page.js(count("#agent-list > li")) == 300
        assert page.js(count("#message-list > li")) == 200
        assert "newest 200 of 10,000" in page.js(text_of("#messages-note"))
        assert "300 of 1,000 agents" in page.js(text_of("#agents-note"))
        # Filtering 10,000 messages stays interactive.
        filter_ms = page.js("""(() => { const t0 = performance.now();
            document.getElementById('f-text').value = 'message 9999';
            document.getElementById('filters').requestSubmit(); agentRelayDashboard.render();
            return performance.now() - t0; })()""")
        assert filter_ms < 1000
        assert page.js(count("#message-list > li")) == 1


# ---------------------------------------------------------------------------
# The README screenshot
# ---------------------------------------------------------------------------

def seed_demo(relay):
    """A small, believable relay: a few agents, a thread, a claim, a task."""
    agents = [
        agent("macmini2-api-a1b2c3", "backend fixer", machine="macmini2", project="api",
              capabilities=["chat", "review", "backend"], tags=["backend"]),
        agent("macmini2-web-d4e5f6", "frontend", machine="macmini2", project="web", provider="codex",
              capabilities=["chat", "ui"], tags=["frontend"], status="busy"),
        agent("buildbox-api-0a9b8c", "test writer", machine="buildbox", project="api",
              capabilities=["chat", "test"], tags=["backend", "qa"], channels=["qa"]),
        agent("laptop-ops-77e1f0", "ops watcher", machine="laptop", project="ops",
              capabilities=["ops"], tags=["ops"], channels=["alerts", "deploys"], status="idle", approval="guarded"),
        agent("buildbox-docs-5c6d7e", "docs", machine="buildbox", project="docs", provider="codex",
              capabilities=["chat", "write"], tags=["docs"]),
    ]
    for body in agents:
        relay.call("POST", "/agents", body)
    relay.call("PATCH", "/agents/buildbox-docs-5c6d7e", {"status": "offline"})

    def send(**body):
        return relay.call("POST", "/messages", body)[1]

    root = send(**{"from": "macmini2-web-d4e5f6", "to": "macmini2-api-a1b2c3", "subject": "Login returns 500",
                   "body": "POST /login answers 500 since the last migration. Can you check the users table?"})
    send(**{"from": "macmini2-api-a1b2c3", "to": "macmini2-web-d4e5f6", "replyTo": root["id"],
            "body": "Found it: the migration dropped a default. Fix pushed on fix/login-default."})
    review = send(**{"from": "macmini2-api-a1b2c3", "to": "cap:review", "claimable": True,
                     "body": "Please review fix/login-default (2 files, +14 -3)."})
    relay.call("POST", "/messages/%d/claim" % review["id"], {"agentId": "buildbox-api-0a9b8c"})
    send(**{"from": "buildbox-api-0a9b8c", "to": "tag:backend", "channel": "qa",
            "body": "Flaky test tests/test_auth.py::test_refresh is quarantined; 312 passed."})
    send(**{"from": "dashboard", "to": "broadcast", "body": "Release freeze at 17:00, please wrap up."})
    send(**{"from": "laptop-ops-77e1f0", "to": "cap:test", "claimable": True,
            "body": "Nightly e2e run needs someone to look at the checkout timeout."})
    alarm = {"type": "alarm", "severity": "critical", "dedupeKey": "prod-api:5xx", "title": "prod-api 5xx rate high",
             "body": "5xx above 8% for 5 min", "target": "cap:ops", "channel": "alerts"}
    for _ in range(3):
        relay.call("POST", "/integrations/events", alarm)
    _, ticket = relay.call("POST", "/integrations/events", {"type": "ticket", "severity": "warning",
                                                            "title": "Customer cannot reset password",
                                                            "target": "tag:backend"})
    if ticket and ticket.get("task"):
        task_id = ticket["task"]["id"]
        relay.call("POST", "/tasks/%d/claim" % task_id, {"agentId": "buildbox-api-0a9b8c"})
        relay.call("PATCH", "/tasks/%d/status" % task_id, {"agentId": "buildbox-api-0a9b8c", "status": "in_progress",
                                                            "progress": "reproduced locally"})
    _, pair = relay.call("POST", "/pairs", {"from": "macmini2-api-a1b2c3", "to": "label:test writer",
                                            "objective": "Debug flaky auth tests"})
    if pair and pair.get("id"):
        relay.call("POST", "/pairs/%s/accept" % pair["id"], {"agentId": "buildbox-api-0a9b8c"})
    return root


def seed_telegram(relay, bot):
    """A question from a Telegram chat and an agent's answer back to it."""
    bot.say("Is the login fix deployed yet?", username="maria")
    asked = wait_until(lambda: [m for m in relay.call("GET", "/messages?order=desc&limit=20")[1]["messages"]
                                if m["from"] == "telegram:maria"], timeout=10)[0]
    # A reply goes back to the chat it answers (whatever its target reaches here).
    relay.call("POST", "/messages", {"from": "macmini2-api-a1b2c3", "to": "broadcast", "replyTo": asked["id"],
                                     "body": "Yes, fix/login-default went out at 14:05."})
    wait_until(lambda: bot.sent, timeout=10)


def main(argv):
    import argparse
    parser = argparse.ArgumentParser(description="Write a screenshot of the dashboard with demo data.")
    parser.add_argument("output")
    parser.add_argument("--dark", action="store_true")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if not CHROMIUM:
        sys.exit("chromium is not installed")
    with tempfile.TemporaryDirectory() as tmp, fake_bot_api() as bot:
        with running_relay(os.path.join(tmp, "relay"), extra_env=bot.env()) as relay, running_browser(tmp) as browser:
            root = seed_demo(relay)
            seed_telegram(relay, bot)
            with browser.page(args.width, args.height, dark=args.dark) as page:
                if args.width < 760:
                    page.call("Emulation.setDeviceMetricsOverride",
                              {"width": args.width, "height": args.height, "deviceScaleFactor": 1, "mobile": True})
                open_dashboard(page, relay)
                page.wait_for(count("#message-list > li") + " >= 5")
                page.click(message(root["id"] + 1, "[data-action=thread]"))  # show a thread open
                page.wait_for(exists(".thread li"))
                if page.js(exists('[data-status="open"] [data-action=task-history]')):
                    page.click('[data-status="open"] [data-action=task-history]')  # and a task's history
                    page.wait_for(exists(".history li"))
                time.sleep(1.8)  # let the "fresh" highlight fade
                page.screenshot(args.output)
    print("wrote", args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
