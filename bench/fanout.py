#!/usr/bin/env python3
"""POST -> SSE fan-out latency: the relay against a bare stdlib baseline.

    python3 bench/fanout.py [--subscribers 100] [--rate 200] [--seconds 4]

For each server, SUBSCRIBERS threads hold `GET /api/events?types=message.new`
open; one sender POSTs messages at RATE per second for SECONDS, each body
carrying its send time (time.time()). Every subscriber thread notes when
each frame arrives; the figures are percentiles over all (message,
subscriber) pairs, after a short warm-up. The server and the sender run in
this process; the subscriber threads run in a child process (this file
with --subscribe), so that parsing 20,000 frames a second does not compete
with the server for one interpreter lock.

The baseline is what the relay must not be much slower than: a
ThreadingHTTPServer (HTTP/1.1, keep-alive, TCP_NODELAY) that inserts each
POST into SQLite in WAL mode and pushes one SSE frame onto every
subscriber's queue, with nothing else (no auth, validation, stored events,
filters or receipts).

Stdlib only, loopback only, stops by itself in well under a minute.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import agent_relay  # noqa: E402  (the relay module lives one folder up)
import baselines  # noqa: E402  (beside this file)

WARMUP_SECONDS = 0.5
SENDERS = 4  # parallel keep-alive connections, so a slow answer does not hold back the schedule


# ---------------------------------------------------------------------------
# Subscribers and the sender
# ---------------------------------------------------------------------------


class Subscriber(threading.Thread):
    """Reads one chunked SSE stream; notes (message index, latency) per frame."""

    def __init__(self, port, path):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n"
                           % (path, port)).encode())
        self.samples = []
        self.error = None

    def run(self):
        try:
            self._read()
        except OSError as error:
            self.error = error

    def _read(self):
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += self._recv()
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError("subscribe failed: %r" % head[:80])
        text = b""
        while True:
            while b"\r\n" not in buffer:
                buffer += self._recv()
            size_line, _, buffer = buffer.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                return
            while len(buffer) < size + 2:
                buffer += self._recv()
            text += buffer[:size]
            buffer = buffer[size + 2:]
            frames = text.split(b"\n\n")
            text = frames.pop()
            for frame in frames:
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: "):
                        now = time.time()
                        index, sent_at = json.loads(line[6:])["body"].split()
                        self.samples.append((int(index), now - float(sent_at)))

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise OSError("stream ended")
        return data

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def run_subscribers(port, count, total, warmup):
    """The child process: COUNT subscriber threads; reads "go" on stdin when
    the sender is done, then waits for the last frame and prints the figures."""
    subscribers = [Subscriber(port, "/api/events?types=message.new") for _ in range(count)]
    for subscriber in subscribers:
        subscriber.start()
    print("ready", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 10
    while any(len(s.samples) < total and s.error is None for s in subscribers) and time.monotonic() < deadline:
        time.sleep(0.02)
    for subscriber in subscribers:
        subscriber.close()
    for subscriber in subscribers:
        subscriber.join(5)
    deliveries = [latency for s in subscribers for index, latency in s.samples if index >= warmup]
    print(json.dumps({
        "delivery p50 (ms)": percentile(deliveries, 0.50) * 1000,
        "delivery p99 (ms)": percentile(deliveries, 0.99) * 1000,
        "delivery max (ms)": max(deliveries) * 1000 if deliveries else float("nan"),
        "delivered (%)": 100.0 * len(deliveries) / ((total - warmup) * count),
    }), flush=True)


def send_share(port, start, rate, indexes, warmup, post_latencies, failures):
    """One sender connection: POST message `index` at start + index / rate (open loop)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for index in indexes:
            pause = start + index / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            began = time.perf_counter()
            body = json.dumps({"from": "bench", "to": "broadcast", "body": "%d %.6f" % (index, time.time())})
            conn.request("POST", "/api/messages", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 201:
                failures.append(response.status)
            if index >= warmup:
                post_latencies.append(time.perf_counter() - began)
    finally:
        conn.close()


def measure(port, subscriber_count, subscribed, rate, seconds):
    """Run one measurement against a server on `port`; returns the figures."""
    total = int(rate * seconds)
    warmup = int(rate * WARMUP_SECONDS)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--subscribe", str(port),
                              "--subscribers", str(subscriber_count), "--total", str(total),
                              "--warmup", str(warmup)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the subscriber process failed to start")
        deadline = time.monotonic() + 10
        while not subscribed(subscriber_count):
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("only some subscribers connected")
            time.sleep(0.02)

        post_latencies, failures = [], []
        start = time.perf_counter() + 0.05
        senders = [threading.Thread(target=send_share, args=(port, start, rate, range(k, total, SENDERS), warmup,
                                                              post_latencies, failures)) for k in range(SENDERS)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        send_seconds = time.perf_counter() - start
        output, _ = child.communicate("go\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    figures = json.loads(output.strip().splitlines()[-1])
    figures.update({
        "POST p50 (ms)": percentile(post_latencies, 0.50) * 1000,
        "POST p99 (ms)": percentile(post_latencies, 0.99) * 1000,
        "sent (msg/s)": total / send_seconds,
        "failed POSTs": len(failures),
    })
    return figures


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def bench_relay(tmp, args):
    settings = agent_relay.Settings(port=0, host="127.0.0.1", db_path=os.path.join(tmp, "relay.db"))
    server = agent_relay.RelayServer(settings).start()
    port = server.httpd.server_address[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/agents", json.dumps({"id": "bench"}), {"Content-Type": "application/json"})
        assert conn.getresponse().read()
        conn.close()
        return measure(port, args.subscribers, lambda n: server.relay.sse_clients >= n, args.rate, args.seconds)
    finally:
        server.stop()


def bench_baseline(tmp, args):
    """bench/baselines.py's bare server in its `sse` mode: insert each POST, push it to every stream."""
    server = baselines.BaselineServer("sse", 0, os.path.join(tmp, "baseline.db"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        return measure(server.server_address[1], args.subscribers, lambda n: len(server.streams) >= n,
                       args.rate, args.seconds)
    finally:
        server.shutdown()
        server.server_close()
        server.publish(None)  # ends every stream's handler
        thread.join(5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="sending time per server")
    parser.add_argument("--subscribe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscribe:
        run_subscribers(args.subscribe, args.subscribers, args.total, args.warmup)
        return 0
    print("fan-out: %d subscribers (firehose, ?types=message.new), %g msg/s for %g s, warm-up %g s dropped"
          % (args.subscribers, args.rate, args.seconds, WARMUP_SECONDS))
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        relay = bench_relay(tmp, args)
        baseline = bench_baseline(tmp, args)
    print("%-20s %10s %10s %8s" % ("figure", "relay", "baseline", "ratio"))
    for figure in ("delivery p50 (ms)", "delivery p99 (ms)", "delivery max (ms)", "POST p50 (ms)", "POST p99 (ms)",
                   "sent (msg/s)", "delivered (%)", "failed POSTs"):
        a, b = relay[figure], baseline[figure]
        ratio = "%.2f" % (a / b) if b else "-"
        print("%-20s %10.2f %10.2f %8s" % (figure, a, b, ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
