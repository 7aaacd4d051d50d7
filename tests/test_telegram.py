"""The Telegram bridge against a fake Bot API (a stdlib HTTP server on
loopback that speaks getUpdates and sendMessage)."""

import threading

import pytest

import agent_relay
from conftest import json_post_server, wait_until

TOKEN = "123456:TEST-token-never-logged"
ALLOWED, OTHER = 1001, 2002


class FakeTelegram:
    """Serves queued updates to getUpdates (honouring offset) and records sendMessage."""

    def __init__(self):
        self.updates = []
        self.sent = []
        self.fail_next = []  # (status, payload) answers to give before behaving
        self.offsets = []
        self.lock = threading.Condition()
        self.next_update_id = 500
        self.next_message_id = 1
        self.paths = []
        self.http = json_post_server(self._post)
        self.url = self.http.url

    def _post(self, path, payload):
        self.paths.append(path)
        return self.answer(path.rsplit("/", 1)[1], payload)

    def answer(self, method, payload):
        with self.lock:
            if self.fail_next and method in ("getUpdates", "sendMessage"):
                failure = self.fail_next[0]
                if len(failure) == 2 or failure[0] == method:  # (method, status, payload) waits for its method
                    self.fail_next.pop(0)
                    return failure[-2:]
            if method == "getUpdates":
                offset = payload.get("offset", 0)
                self.offsets.append(offset)
                ready = [u for u in self.updates if u["update_id"] >= offset]
                if not ready:
                    self.lock.wait(min(payload.get("timeout", 0), 0.2))
                    ready = [u for u in self.updates if u["update_id"] >= offset]
                return 200, {"ok": True, "result": ready}
            if method == "sendMessage":
                if len(payload["text"]) > 4096:
                    return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"}
                self.sent.append(payload)
                self.next_message_id += 1
                return 200, {"ok": True, "result": {"message_id": self.next_message_id, "chat": {
                    "id": payload["chat_id"]}, "text": payload["text"]}}
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}

    def say(self, text, chat_id=ALLOWED, username="alice"):
        with self.lock:
            self.next_update_id += 1
            self.updates.append({"update_id": self.next_update_id, "message": {
                "message_id": self.next_update_id * 10, "from": {"id": 42, "username": username},
                "chat": {"id": chat_id, "type": "private"}, "text": text}})
            self.lock.notify_all()
        return self.next_update_id

    def texts(self, chat_id=ALLOWED):
        with self.lock:
            return [m["text"] for m in self.sent if m["chat_id"] == chat_id]

    def close(self):
        self.http.close()


@pytest.fixture
def telegram():
    fake = FakeTelegram()
    yield fake
    fake.close()


@pytest.fixture
def bridged(relay_factory, telegram, tmp_path):
    def start(**settings):
        settings.setdefault("db_path", str(tmp_path / "bridged.db"))
        return relay_factory(telegram_token=TOKEN, telegram_chat_ids="%d" % ALLOWED, telegram_api=telegram.url,
                             telegram_poll_seconds=1, **settings)
    return start


def test_chat_text_becomes_a_relay_message_to_the_default_target(bridged, telegram):
    relay = bridged(telegram_target="tag:humans-help")
    relay.register("helper", tags=["humans-help"])
    telegram.say("Can someone look at the deploy?")
    wait_until(lambda: relay.inbox("helper"))
    message = relay.inbox("helper")[0]
    assert message["from"] == "telegram:alice" and message["body"] == "Can someone look at the deploy?"
    assert message["sentBy"] == "integration:telegram"  # SPEC 12: who sent it, as the relay saw it
    assert message["to"] == "tag:humans-help" and message["meta"]["telegram"]["chatId"] == ALLOWED


def test_at_agent_and_slash_to_address_someone(bridged, telegram):
    relay = bridged()
    relay.register("backend-agent", label="Backend Fixer")
    relay.register("ops", tags=["ops"])
    telegram.say("@backend-agent check the migration")
    telegram.say("@backend fixer? no such agent")
    telegram.say("/to tag:ops the disk is full")
    wait_until(lambda: relay.inbox("ops"))
    assert relay.inbox("ops")[0]["body"] == "the disk is full"
    bodies = [m["body"] for m in relay.inbox("backend-agent")]
    assert bodies[0] == "check the migration"
    wait_until(lambda: any("Not relayed" in t for t in telegram.texts()))
    assert any("no agent has the id or label 'backend'" in t for t in telegram.texts())


def test_at_label_reaches_the_labelled_agent(bridged, telegram):
    relay = bridged()
    relay.register("a1", label="reviewer")
    telegram.say("@reviewer please review PR 12")
    wait_until(lambda: relay.inbox("a1"))
    message = relay.inbox("a1")[0]
    assert message["to"] == "label:reviewer" and message["body"] == "please review PR 12"


def test_agents_and_tasks_commands_answer_in_the_chat(bridged, telegram):
    relay = bridged()
    relay.register("a1", label="reviewer")
    relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full"})
    telegram.say("/agents")
    telegram.say("/tasks")
    wait_until(lambda: len(telegram.texts()) >= 2)
    agents_answer, tasks_answer = telegram.texts()[:2]
    assert "online a1 (reviewer)" in agents_answer
    assert "#1 open disk full" in tasks_answer


def test_chats_not_on_the_allow_list_are_ignored_and_logged(bridged, telegram, caplog):
    relay = bridged()
    relay.register("a1")
    telegram.say("let me in", chat_id=OTHER, username="mallory")
    marker = telegram.say("from the allowed chat")
    wait_until(lambda: relay.inbox("a1"))
    assert [m["body"] for m in relay.inbox("a1")] == ["from the allowed chat"]
    wait_until(lambda: max(telegram.offsets) > marker)
    assert any("ignored a message from chat %d" % OTHER in r.getMessage() for r in caplog.records)
    channel = [c for c in relay.call("GET", "/api/channels").json["channels"] if c["name"] == "telegram"][0]
    assert channel["kind"] == "bridge" and channel["ignored"] == 1 and channel["received"] == 1
    assert telegram.texts(OTHER) == []


def test_agent_replies_and_channel_messages_go_back_to_the_chat(bridged, telegram):
    relay = bridged()
    relay.register("a1")
    telegram.say("status of the build?")
    wait_until(lambda: relay.inbox("a1"))
    question = relay.inbox("a1")[0]
    relay.send("a1", "broadcast", body="unrelated broadcast")
    relay.register("telegram-reader")
    relay.send("a1", "telegram-reader", body="the build is green", replyTo=question["id"])
    relay.send("a1", "channel:telegram", body="deploy finished")
    wait_until(lambda: len(telegram.texts()) >= 2)
    assert telegram.texts() == ["a1: the build is green", "a1: deploy finished"]


def test_long_messages_are_split_at_4096_characters(bridged, telegram):
    relay = bridged()
    relay.register("a1")
    text = ("x" * 3000 + "\n") * 3
    relay.send("a1", "channel:telegram", body=text)
    wait_until(lambda: len(telegram.texts()) >= 3)
    pieces = telegram.texts()
    assert len(pieces) == 3
    assert all(len(p) <= 4096 for p in pieces)
    assert "".join(pieces).replace("\n", "") == ("a1: " + text).replace("\n", "")


def test_send_failures_are_retried_without_duplicates(bridged, telegram):
    relay = bridged()
    relay.register("a1")
    telegram.fail_next = [(502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}),
                          (429, {"ok": False, "error_code": 429, "description": "Too Many Requests",
                                 "parameters": {"retry_after": 1}})]
    relay.send("a1", "channel:telegram", body="first")
    relay.send("a1", "channel:telegram", body="second")
    wait_until(lambda: len(telegram.texts()) >= 2, timeout=15)
    assert telegram.texts() == ["a1: first", "a1: second"]

    def bridge():
        return [c for c in relay.call("GET", "/api/channels").json["channels"] if c["name"] == "telegram"][0]
    wait_until(lambda: bridge()["sent"] == 2 and bridge()["pending"] == 0)


def test_polling_backs_off_on_errors_and_recovers(bridged, telegram):
    telegram.fail_next = [(500, {"ok": False, "error_code": 500, "description": "Internal Server Error"})]
    relay = bridged()
    relay.register("a1")
    telegram.say("after the outage")
    wait_until(lambda: relay.inbox("a1"), timeout=10)
    channel = [c for c in relay.call("GET", "/api/channels").json["channels"] if c["name"] == "telegram"][0]
    assert channel["state"] == "connected"


def test_a_restart_in_the_middle_processes_no_update_twice(relay_factory, telegram, tmp_path):
    db = str(tmp_path / "restart.db")
    settings = dict(telegram_token=TOKEN, telegram_chat_ids=str(ALLOWED), telegram_api=telegram.url,
                    telegram_poll_seconds=1, db_path=db)
    relay = relay_factory(**settings)
    relay.register("a1")
    telegram.say("one")
    telegram.say("two")
    wait_until(lambda: len(relay.inbox("a1")) == 2)
    relay.server.stop()
    telegram.say("three")
    again = relay_factory(**settings)
    wait_until(lambda: len(again.inbox("a1")) == 3)
    assert [m["body"] for m in again.inbox("a1")] == ["one", "two", "three"]
    wait_until(lambda: telegram.offsets[-1] > telegram.updates[-1]["update_id"])  # the offset moved past all


def test_the_token_never_appears_in_answers_or_logs(bridged, telegram, caplog):
    telegram.fail_next = [(500, {"ok": False, "error_code": 500, "description": "boom"})]
    relay = bridged()
    wait_until(lambda: len(telegram.offsets) >= 1, timeout=10)
    channels = relay.call("GET", "/api/channels").raw.decode()
    assert TOKEN not in channels and "telegram" in channels
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("env,expected", [
    ({"AGENT_RELAY_TELEGRAM_TOKEN": TOKEN}, "AGENT_RELAY_TELEGRAM_CHAT_IDS is required"),
    ({"AGENT_RELAY_TELEGRAM_TOKEN": TOKEN, "AGENT_RELAY_TELEGRAM_CHAT_IDS": "abc"}, "comma list of chat ids"),
    ({"AGENT_RELAY_TELEGRAM_TOKEN": TOKEN, "AGENT_RELAY_TELEGRAM_CHAT_IDS": "1",
      "AGENT_RELAY_TELEGRAM_API": "ftp://x"}, "must be an http(s) URL"),
])
def test_half_configured_bridge_refuses_to_start(spawn_relay, env, expected):
    relay = spawn_relay(env=env)
    assert relay.stop() == 2
    assert expected in relay.stderr and TOKEN not in relay.stderr


def test_split_for_telegram():
    assert agent_relay.split_for_telegram("short") == ["short"]
    pieces = agent_relay.split_for_telegram("a" * 5000)
    assert [len(p) for p in pieces] == [4096, 904]


def test_a_message_to_telegram_user_goes_to_their_chat(bridged, telegram):
    relay = bridged()
    relay.register("a1")
    r = relay.call("POST", "/api/messages", {"from": "a1", "to": "telegram:alice", "body": "hi"})
    assert r.status == 404  # alice has not written yet: no chat to answer in
    telegram.say("hello agents", username="alice")
    wait_until(lambda: relay.inbox("a1"))
    relay.send("a1", "telegram:alice", body="hello alice")
    wait_until(lambda: telegram.texts())
    assert telegram.texts() == ["a1: hello alice"]


def test_a_send_error_stays_visible_until_a_send_succeeds(bridged, telegram):
    relay = bridged()
    relay.register("a1")
    telegram.fail_next = [("sendMessage", 403, {"ok": False, "error_code": 403,
                                                "description": "Forbidden: bot was blocked"})]
    relay.send("a1", "channel:telegram", body="are you there?")

    def bridge():
        return [c for c in relay.call("GET", "/api/channels").json["channels"] if c["name"] == "telegram"][0]
    wait_until(lambda: bridge()["lastError"] == "Forbidden: bot was blocked", timeout=10)
    polls = len(telegram.offsets)
    wait_until(lambda: len(telegram.offsets) >= polls + 2, timeout=10)  # polls succeed meanwhile...
    if not telegram.texts():  # ...and do not hide the send error while the message waits for its retry
        assert bridge()["lastError"] == "Forbidden: bot was blocked" and bridge()["state"] == "error"
    wait_until(lambda: telegram.texts(), timeout=10)
    wait_until(lambda: bridge()["lastError"] is None, timeout=10)
