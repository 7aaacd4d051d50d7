#!/usr/bin/env python3
"""SQLite against PostgreSQL, and several relays on one PostgreSQL (issue 21).

    python3 bench/postgres.py                      # a throwaway cluster (.ci/postgres), ~2 minutes
    python3 bench/postgres.py --db-url postgresql://user@host/db   # an existing server (a scratch schema)
    python3 bench/postgres.py --seconds 5

Measured in one run, each relay its own process, load from bench/loadgen.py
(wrk when installed): sends/s and inbox polls/s of one process on each
backend; then three processes on one PostgreSQL: send-to-stream delivery
p50/p99 across processes (a send through one, its SSE event read on
another), and the send throughput of the three together. Two cores cannot
show a speed-up from more processes: the three share the same two cores
with PostgreSQL and the load generator. See bench/RESULTS.md for the
capacity model.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import loadgen  # noqa: E402

RELAY = os.path.join(ROOT, "agent_relay.py")
SEND = {"from": "bench-sender", "to": "bench-peer", "body": "The migration looks clean; merging now."}
POLL_PATH = "/api/messages?for=bench-target&unread=true"


def relay(store_args):
    return loadgen.Server([sys.executable, RELAY, "--port", "0"] + store_args)


def prepare(port):
    for agent_id in ("bench-sender", "bench-peer", "bench-target"):
        assert loadgen.call(port, "POST", "/api/agents", {"id": agent_id})[0] in (200, 201)
    for i in range(50):
        body = dict(SEND, to="bench-target", body="unread %d: please review the schema change" % i)
        assert loadgen.call(port, "POST", "/api/messages", body)[0] == 201


def single_process(name, store_args, seconds):
    server = relay(store_args)
    try:
        prepare(server.port)
        sends = loadgen.load(server.port, "POST", "/api/messages", SEND, 16, seconds)
        polls = loadgen.load(server.port, "GET", POLL_PATH, None, 16, seconds)
    finally:
        server.stop()
    print("  %-10s sends %7.0f/s (p99 %.1f ms)   polls %7.0f/s (p99 %.1f ms)" % (
        name, sends["rps"], sends["p99_ms"], polls["rps"], polls["p99_ms"]), flush=True)
    return sends, polls


def open_stream(port, path):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
    return sock.makefile("rb")


def delivery(servers, count):
    """Seconds from a send's 201 on servers[0] to its event on the streams of the others."""
    stream_files = [open_stream(s.port, "/api/events?for=bench-peer&types=message.new") for s in servers[1:]]
    arrived = [[] for _ in stream_files]

    def read(index, f):
        for line in f:
            if line.startswith(b"data: "):
                arrived[index].append(time.monotonic())
                if len(arrived[index]) == count:
                    return
    readers = [threading.Thread(target=read, args=(i, f), daemon=True) for i, f in enumerate(stream_files)]
    for t in readers:
        t.start()
    time.sleep(0.5)  # the streams are open
    conn = http.client.HTTPConnection("127.0.0.1", servers[0].port)
    acked = []
    for i in range(count):
        conn.request("POST", "/api/messages", body=json.dumps(dict(SEND, body="d%d" % i)),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        acked.append(time.monotonic())
        deadline = time.monotonic() + 5
        while any(len(a) <= i for a in arrived) and time.monotonic() < deadline:
            time.sleep(0.0005)
    conn.close()
    for t in readers:
        t.join(5)
    return [a[i] - acked[i] for a in arrived for i in range(min(len(a), count))]


def three_processes(db_url, seconds):
    servers = [relay(["--db-url", db_url]) for _ in range(3)]
    try:
        prepare(servers[0].port)
        delays = delivery(servers, 300)
        results = {}
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.port, loadgen.load(
            s.port, "POST", "/api/messages", SEND, 8, seconds, use_wrk=False))) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in servers:
            s.stop()
    delays_ms = sorted(d * 1000 for d in delays)
    total = sum(r["rps"] for r in results.values())
    print("  3 processes: delivery across processes p50 %.1f ms p99 %.1f ms (%d samples)" % (
        statistics.median(delays_ms), loadgen.percentile(delays_ms, 0.99), len(delays_ms)), flush=True)
    print("  3 processes: sends together %.0f/s (%s per process)" % (
        total, ", ".join("%.0f" % r["rps"] for r in results.values())), flush=True)
    return delays_ms, total


def scratch_schema(server_url):
    import psycopg
    name = "bench_%d" % os.getpid()
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % name)
        conn.execute("CREATE SCHEMA %s" % name)
    return name, server_url + ("&" if "?" in server_url else "?") + "options=-csearch_path%3D" + name


def drop_schema(server_url, name):
    import psycopg
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", help="a PostgreSQL server to use (default: start a throwaway one)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load run")
    args = parser.parse_args(argv)
    cluster = None
    server_url = args.db_url
    if server_url is None:
        cluster = tempfile.mkdtemp(prefix="agent-relay-bench-pg-")
        port = loadgen_free_port()
        server_url = subprocess.check_output([os.path.join(ROOT, ".ci", "postgres"), "start", cluster, str(port)],
                                             text=True).strip()
    tmp = tempfile.mkdtemp(prefix="agent-relay-bench-")
    try:
        print("one process each (16 connections, %.0f s, %s):" % (args.seconds, "wrk" if loadgen.have_wrk()
                                                                  else "stdlib load"), flush=True)
        single_process("SQLite", ["--db-path", os.path.join(tmp, "bench.db")], args.seconds)
        name, url = scratch_schema(server_url)
        try:
            single_process("PostgreSQL", ["--db-url", url], args.seconds)
        finally:
            drop_schema(server_url, name)
        name, url = scratch_schema(server_url)
        try:
            three_processes(url, args.seconds)
        finally:
            drop_schema(server_url, name)
    finally:
        subprocess.run(["rm", "-rf", tmp])
        if cluster:
            subprocess.run([os.path.join(ROOT, ".ci", "postgres"), "stop", cluster])


def loadgen_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
