"""Issue 21: GET /api/metrics in the Prometheus text format 0.0.4, read by the
real exposition-format parser of `prometheus-client` (tests only; the relay
writes the format by hand)."""

import json
import socket
import threading

import pytest

from conftest import free_port, wait_until

# the exposition-format parser of the Prometheus client library (`.ci/run` installs it)
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

ADMIN_TOKEN = "admin-token-0123456789"
OPS_TOKEN = "ops-token-0123456789"


def scrape(relay, token=None):
    r = relay.call("GET", "/api/metrics", token=token)
    assert r.status == 200, r
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.raw.decode("utf-8"))}
    return families


def sample(families, family, name=None, **labels):
    """The value of one sample (`name` defaults to the family's)."""
    found = [s.value for s in families[family].samples
             if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, name, labels, families[family].samples)
    return found[0]


def test_requests_are_counted_by_route_template_and_status(relay):
    relay.register("a1")
    relay.register("a2")
    for _ in range(3):
        relay.send("a1", "a2")
    assert relay.call("GET", "/api/agents/nobody").status == 404
    assert relay.call("GET", "/api/no-such-route").status == 404
    families = scrape(relay)
    assert families["agent_relay_requests"].type == "counter"
    count = "agent_relay_requests_total"
    assert sample(families, "agent_relay_requests", count, route="/api/agents", method="POST", status="201") == 2
    assert sample(families, "agent_relay_requests", count, route="/api/messages", method="POST", status="201") == 3
    assert sample(families, "agent_relay_requests", count, route="/api/agents/{id}", method="GET",
                  status="404") == 1
    assert sample(families, "agent_relay_requests", count, route="unmatched", method="GET", status="404") == 1
    latency = families["agent_relay_request_duration_seconds"]
    assert latency.type == "histogram"
    total = sample(families, "agent_relay_request_duration_seconds", "agent_relay_request_duration_seconds_count")
    assert total == 7  # every request before this scrape
    assert sample(families, "agent_relay_request_duration_seconds", "agent_relay_request_duration_seconds_bucket",
                  le="+Inf") == total
    batches = sample(families, "agent_relay_group_commit_batch_size", "agent_relay_group_commit_batch_size_sum")
    assert batches >= 5  # the two registrations and three sends each committed


def test_streams_long_polls_and_queues_are_gauged(relay):
    relay.register("reader")
    relay.register("writer")
    stream = relay.events("/api/events?for=reader")
    answers = []
    poll = threading.Thread(target=lambda: answers.append(relay.call("GET", "/api/messages?for=reader&wait=10")))
    poll.start()
    try:
        wait_until(lambda: sample(scrape(relay), "agent_relay_long_poll_waiters") == 1)
        families = scrape(relay)
        assert sample(families, "agent_relay_sse_streams") == 1
        assert sample(families, "agent_relay_subscribers") >= 2  # the long-poll and the SSE writer
        assert sample(families, "agent_relay_open_connections") >= 3  # the stream, the poll, this scrape
        assert sample(families, "agent_relay_requests", "agent_relay_requests_total", route="/api/events",
                      status="200") == 1
        relay.send("writer", "reader", "wake up")
        poll.join(10)
        assert answers[0].status == 200 and answers[0].json["messages"][0]["body"] == "wake up"
        assert stream.take(1, types=("message.new",))[0]["data"]["body"] == "wake up"
        assert sample(scrape(relay), "agent_relay_long_poll_waiters") == 0
    finally:
        poll.join(10)
        stream.close()
    wait_until(lambda: sample(scrape(relay), "agent_relay_sse_streams") == 0)


def test_outbox_backlogs_are_gauged(relay_factory):
    """A callback to a receiver that is down stays in the outbox and shows in the gauge."""
    nobody = "http://127.0.0.1:%d/hook" % free_port()
    relay = relay_factory(callback_retry_base_ms=3600000, integrations=json.dumps([{
        "name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create"], "callbackUrl": nobody}]))
    assert sample(scrape(relay), "agent_relay_callback_outbox_pending") == 0
    r = relay.call("POST", "/api/integrations/events", {"type": "alarm", "title": "disk full"}, token=OPS_TOKEN)
    assert r.status == 201, r
    assert sample(scrape(relay), "agent_relay_callback_outbox_pending") == 1
    assert sample(scrape(relay), "agent_relay_telegram_outbox_pending") == 0


def test_metrics_need_the_stats_read_scope(relay_factory):
    relay = relay_factory(token=ADMIN_TOKEN, integrations=json.dumps([
        {"name": "watcher", "token": "watch-token-0123456789", "scopes": ["stats:read"]},
        {"name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create"]}]))
    assert relay.call("GET", "/api/metrics", token="").status == 401
    r = relay.call("GET", "/api/metrics", token=OPS_TOKEN)
    assert (r.status, r.json["code"], r.json["scope"]) == (403, "insufficient_scope", "stats:read")
    assert "agent_relay_requests" in scrape(relay, token="watch-token-0123456789")


def test_metrics_are_in_the_openapi_document(relay):
    operation = relay.call("GET", "/api/openapi.json").json["paths"]["/api/metrics"]["get"]
    assert operation["x-scopes"] == ["stats:read"]
    assert "text/plain; version=0.0.4; charset=utf-8" in operation["responses"]["200"]["content"]


@pytest.mark.sqlite_only("fills the SQLite file with max_page_count")
def test_storage_errors_are_counted(relay):
    relay.register("w")
    store = relay.relay.store
    with store.lock:
        store.conn.execute("PRAGMA max_page_count = 1")
    try:
        refused = 0
        for n in range(500):
            status = relay.call("POST", "/api/messages", {"from": "w", "to": "w", "body": "%d" % n}).status
            refused += status == 503
            if refused == 3:
                break
    finally:
        with store.lock:
            store.conn.execute("PRAGMA max_page_count = 1073741823")
    assert sample(scrape(relay), "agent_relay_storage_errors", "agent_relay_storage_errors_total") == 3


def test_made_up_methods_share_one_series(relay):
    """A client names the method: each new name must not grow the metrics for good."""
    for i in range(30):
        conn = socket.create_connection((relay.host, relay.port))
        conn.sendall(b"Z%06d /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n" % i)
        conn.recv(4096)
        conn.close()
    text = relay.call("GET", "/api/metrics").raw.decode()
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("agent_relay_requests_total{")}
    assert "OTHER" in methods and not any(m.startswith("Z") for m in methods)
