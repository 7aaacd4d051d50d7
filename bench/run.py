#!/usr/bin/env python3
"""The relay's speed targets (issue 10), each a ratio against a baseline
measured in the same run on the same machine.

    python3 bench/run.py            # everything, about 3 minutes on 2 cores
    python3 bench/run.py --quick    # shorter runs, one round, 200,000 stored messages
    python3 bench/run.py --only send,poll,latency
    python3 bench/run.py --record   # also rewrite the figures block of bench/RESULTS.md
    python3 bench/run.py --relay /tmp/candidate/agent_relay.py   # measure a candidate fix

Every server is its own process (`python3 agent_relay.py --port 0
--db-path ...`, `python3 bench/baselines.py get|post|sse`), so the load
generator never shares its interpreter lock. Load comes from wrk when it is
installed (`apt-get install wrk`), else from bench/loadgen.py's stdlib
generator. Throughput is the best of the rounds and latency the best
round's percentile, for the relay and its baseline alike: the machines are
shared and noisy, and alternating rounds with best-of keeps a neighbour's
burst from deciding a ratio. Loopback only; every step has a time bound.

Figures (names as in the table):
  send       POST /api/messages (direct), 16 keep-alive connections / bare POST+insert
  poll       GET /api/messages?for=..&unread=true with 50 unread, 16 connections / bare GET
  latency    one client, back to back: GET /api/health and a send / bare GET and POST
  fanout     POST -> SSE delivery, 100 subscribers (?for=<agent>&types=message.new),
             broadcasts at 200/s / bare insert-and-push SSE server
  streams    1,000 SSE subscribers: every one receives a broadcast; relay RSS / the same bare server
  scaling    inbox poll and send latency with 1,000,000 stored messages / the same with 1,000;
             prints EXPLAIN QUERY PLAN of every statement the two requests run
  coldstart  process start to the first /api/health answer / bare GET server start
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import py_compile
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import agent_relay  # noqa: E402
import loadgen  # noqa: E402
import prefill  # noqa: E402

RELAY = os.environ.get("BENCH_RELAY") or os.path.join(ROOT, "agent_relay.py")
BASELINES = os.path.join(HERE, "baselines.py")
RESULTS = os.path.join(HERE, "RESULTS.md")
ALL = ("send", "poll", "latency", "fanout", "streams", "scaling", "coldstart")

ROWS = []  # (figure, relay, baseline, ratio, target, met)
NOTES = []  # lines printed after the table
PLANS = []  # (label, sql, plan lines)


def row(figure, relay, baseline, target, met, unit=""):
    ratio = relay / baseline if baseline else float("nan")
    ROWS.append((figure, relay, baseline, ratio, target, met, unit))
    print("  %-44s relay %10.2f  baseline %10.2f  ratio %5.2f  %s" % (figure, relay, baseline, ratio,
                                                                     "ok" if met else "MISSED"), flush=True)


def note(text):
    NOTES.append(text)
    print("  " + text, flush=True)


def relay_server(db_path):
    return loadgen.Server([sys.executable, RELAY, "--port", "0", "--db-path", db_path])


def use_relay(path):
    """Measure another copy of the relay (a candidate fix) with the same figures."""
    global RELAY, agent_relay
    import importlib.util
    RELAY = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location("agent_relay", RELAY)
    agent_relay = importlib.util.module_from_spec(spec)
    sys.modules["agent_relay"] = agent_relay
    spec.loader.exec_module(agent_relay)
    prefill.agent_relay = agent_relay


def baseline_server(mode, db_path=None):
    argv = [sys.executable, BASELINES, mode]
    if db_path:
        argv += ["--db-path", db_path]
    return loadgen.Server(argv)


def register(port, agent_id, **fields):
    status, _ = loadgen.call(port, "POST", "/api/agents", dict(fields, id=agent_id))
    assert status in (200, 201), (agent_id, status)


def register_many(port, ids):
    conn = loadgen.Connection(port)
    try:
        for agent_id in ids:
            status, _ = conn.exchange(loadgen.build_request("POST", "/api/agents", {"id": agent_id}, port))
            assert status in (200, 201), (agent_id, status)
    finally:
        conn.close()


def ms(seconds):
    return seconds * 1000.0


# ---------------------------------------------------------------------------
# send, poll, latency: request/response figures
# ---------------------------------------------------------------------------

SEND_BODY = {"from": "bench-sender", "to": "bench-target", "body": "The migration looks clean; merging now."}
POLL_PATH = "/api/messages?for=bench-target&unread=true"


def prepare_relay(port):
    """bench-sender, bench-peer and bench-target, with 50 unread messages for the target."""
    for agent_id in ("bench-sender", "bench-peer"):
        register(port, agent_id)
    register(port, "bench-target", tags=["team-0"], capabilities=["chat"], machine="host-00")
    conn = loadgen.Connection(port)
    try:
        for i in range(50):
            body = dict(SEND_BODY, to="bench-target", body="unread %d: please review the schema change" % i)
            assert conn.exchange(loadgen.build_request("POST", "/api/messages", body, port))[0] == 201
    finally:
        conn.close()
    status, answer = loadgen.call(port, "GET", POLL_PATH)
    assert status == 200 and len(answer["messages"]) == 50, (status, answer and len(answer["messages"]))


def throughput(args, name, figure, relay_request, baseline_request):
    """Best of the alternating rounds at 16 connections, relay against baseline; target 0.6x."""
    best = {}
    for _ in range(args.rounds):
        for side, (port, method, path, body) in (("relay", relay_request), ("baseline", baseline_request)):
            result = loadgen.load(port, method, path, body, 16, args.load_seconds)
            if result["errors"]:
                note("%s: %d errors on %s" % (name, result["errors"], side))
            if side not in best or result["rps"] > best[side]["rps"]:
                best[side] = result
    r, b = best["relay"]["rps"], best["baseline"]["rps"]
    row(figure, r, b, ">= 0.6x", r / b >= 0.6)
    note("%s: relay p50 %.2f ms p99 %.2f ms under load; baseline p50 %.2f ms p99 %.2f ms (%s)" % (
        name, best["relay"]["p50_ms"], best["relay"]["p99_ms"], best["baseline"]["p50_ms"],
        best["baseline"]["p99_ms"], best["relay"]["tool"]))


def bench_http(args, tmp, wanted):
    relay = relay_server(os.path.join(tmp, "http-relay.db"))
    bare_get = baseline_server("get")
    bare_post = baseline_server("post", os.path.join(tmp, "http-baseline.db"))
    try:
        prepare_relay(relay.port)
        peer_send = dict(SEND_BODY, to="bench-peer")  # keeps the target's 50 unread as they are
        if "send" in wanted:
            throughput(args, "send", "send throughput (req/s, 16 conns)",
                       (relay.port, "POST", "/api/messages", peer_send),
                       (bare_post.port, "POST", "/api/messages", peer_send))
        if "poll" in wanted:
            throughput(args, "poll", "inbox poll throughput (req/s, 50 unread)",
                       (relay.port, "GET", POLL_PATH, None), (bare_get.port, "GET", "/", None))
        if "latency" in wanted:
            cases = (("latency p50, 1 client: GET /api/health (ms)", "GET", "/api/health", None, bare_get, "/"),
                     ("latency p50, 1 client: POST /api/messages (ms)", "POST", "/api/messages", peer_send,
                      bare_post, "/api/messages"),
                     ("latency p50, 1 client: inbox poll, 50 (ms)", "GET", POLL_PATH, None, bare_get, "/"))
            for figure, method, path, body, bare, bare_path in cases:
                best = {}
                for _ in range(args.rounds):
                    for side, port, p in (("relay", relay.port, path), ("baseline", bare.port, bare_path)):
                        samples = loadgen.latency(port, method, p, body, seconds=args.latency_seconds)
                        figures = (percentile_ms(samples, 0.5), percentile_ms(samples, 0.99))
                        best[side] = min(best.get(side, figures), figures)
                informational = "inbox" in figure  # 50 messages of work, not a transport stall
                row(figure, best["relay"][0], best["baseline"][0], "(info)" if informational else "< 1 ms",
                    informational or best["relay"][0] < 1.0)
                note("%s: p99 relay %.2f ms, baseline %.2f ms" % (figure.split(": ")[1].replace(" (ms)", ""),
                                                                  best["relay"][1], best["baseline"][1]))
    finally:
        relay.stop()
        bare_get.stop()
        bare_post.stop()


def percentile_ms(samples, fraction):
    return ms(loadgen.percentile(samples, fraction))


# ---------------------------------------------------------------------------
# fanout and streams: SSE figures
# ---------------------------------------------------------------------------

def sse_paths(prefix, count, relay):
    if relay:
        return ["/api/events?for=%s-%d&types=message.new" % (prefix, i) for i in range(count)]
    return ["/api/events"] * count


def bench_fanout(args, tmp):
    count, rate = 100, 200.0
    total = int(rate * args.fanout_seconds)
    warmup = int(rate * 0.5)
    relay = relay_server(os.path.join(tmp, "fanout-relay.db"))
    bare = baseline_server("sse", os.path.join(tmp, "fanout-baseline.db"))
    streams = {}
    try:
        register(relay.port, "bench-sender")
        register_many(relay.port, ["sub-%d" % i for i in range(count)])
        streams["relay"] = loadgen.Subscribers(relay.port, sse_paths("sub", count, True))
        streams["baseline"] = loadgen.Subscribers(bare.port, sse_paths("sub", count, False))
        best, index = {}, 0
        for _ in range(args.rounds):
            for side, server in (("relay", relay), ("baseline", bare)):
                posts, failures, seconds = loadgen.send_marked(server.port, rate, total, "bench-sender", "broadcast",
                                                               first_index=index)
                arrivals, ended = streams[side].collect(total, wait_seconds=15)
                latencies = [x for i, xs in arrivals.items() if i >= index + warmup for x in xs]
                expected = (total - warmup) * count
                figures = {"p50": percentile_ms(latencies, 0.5), "p99": percentile_ms(latencies, 0.99),
                           "max": ms(max(latencies)) if latencies else float("nan"),
                           "delivered": 100.0 * len(latencies) / expected, "ended": ended,
                           "rate": total / seconds, "post_p50": percentile_ms(posts, 0.5),
                           "post_p99": percentile_ms(posts, 0.99), "failures": len(failures)}
                if side not in best or figures["p99"] < best[side]["p99"]:
                    best[side] = figures
                index += total
        r, b = best["relay"], best["baseline"]
        row("fan-out p50 (ms, 100 subs, 200 msg/s)", r["p50"], b["p50"], "-", True)
        met = r["p99"] < 10.0 and r["p99"] < 2 * b["p99"] and r["delivered"] > 99.9
        row("fan-out p99 (ms, 100 subs, 200 msg/s)", r["p99"], b["p99"], "< 10 ms and < 2x", met)
        for side, f in (("relay", r), ("baseline", b)):
            note("fanout %s: max %.1f ms, delivered %.2f%%, %d streams ended, sent %.0f msg/s, POST p50 %.2f ms "
                 "p99 %.2f ms, %d failed POSTs" % (side, f["max"], f["delivered"], f["ended"], f["rate"],
                                                   f["post_p50"], f["post_p99"], f["failures"]))
    finally:
        for s in streams.values():
            s.close()
        relay.stop()
        bare.stop()
    if not args.quick and RELAY == os.path.join(ROOT, "agent_relay.py"):
        fanout_py_notes()


def fanout_py_notes():
    """bench/fanout.py's own figures (firehose streams, the relay in the sender's process), as notes."""
    script = os.path.join(HERE, "fanout.py")
    if not os.path.exists(script):
        return
    try:
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=180,
                             env=loadgen.clean_env()).stdout
    except subprocess.TimeoutExpired:
        return note("bench/fanout.py did not finish in 180 s")
    for line in out.splitlines():
        if line.startswith(("delivery p50", "delivery p99", "POST p99")):
            figure, relay, baseline, ratio = line.rsplit(None, 3)
            note("bench/fanout.py (firehose, relay in-process): %s relay %s, baseline %s, ratio %s"
                 % (figure.strip(), relay, baseline, ratio))


def bench_streams(args, tmp):
    count, broadcasts = 1000, 3
    figures = {}
    for side in ("relay", "baseline"):
        if side == "relay":
            server = relay_server(os.path.join(tmp, "streams-relay.db"))
        else:
            server = baseline_server("sse", os.path.join(tmp, "streams-baseline.db"))
        subscribers = None
        try:
            if side == "relay":
                register(server.port, "bench-sender")
                register_many(server.port, ["sub-%d" % i for i in range(count)])
            rss_idle = server.memory_kb()[0]
            subscribers = loadgen.Subscribers(server.port, sse_paths("sub", count, side == "relay"), timeout=60)
            slowest, received = [], 0
            for k in range(broadcasts):
                time.sleep(0.5)
                loadgen.send_marked(server.port, 1000.0, 1, "bench-sender", "broadcast", first_index=k)
                arrivals, ended = subscribers.collect(1, wait_seconds=5)
                got = arrivals.get(k, [])
                received = min(received, len(got)) if k else len(got)
                slowest.append(ms(max(got)) if got else float("inf"))
            rss, hwm = server.memory_kb()
            figures[side] = {"slowest": max(slowest), "received": received, "rss": rss / 1024.0,
                             "hwm": hwm / 1024.0, "idle": rss_idle / 1024.0, "connect": subscribers.connect_seconds,
                             "ended": ended}
        finally:
            if subscribers:
                subscribers.close()
            server.stop()
    r, b = figures["relay"], figures["baseline"]
    row("1,000 SSE: slowest delivery (ms)", r["slowest"], b["slowest"], "< 1000 ms, all",
        r["slowest"] < 1000 and r["received"] == count)
    row("1,000 SSE: server RSS (MB)", r["rss"], b["rss"], "< 200 MB", r["rss"] < 200)
    for side, f in (("relay", r), ("baseline", b)):
        note("streams %s: %d/%d received every broadcast (worst of %d), RSS idle %.0f MB, with streams %.0f MB "
             "(peak %.0f MB), all connected in %.2f s" % (side, f["received"], count, broadcasts, f["idle"],
                                                        f["rss"], f["hwm"], f["connect"]))


# ---------------------------------------------------------------------------
# scaling: 1,000 against 1,000,000 stored messages, and the query plans
# ---------------------------------------------------------------------------

class RecordingConnection:
    """Wraps the Store's sqlite3 connection and notes every statement."""

    def __init__(self, conn):
        self.conn = conn
        self.statements = []

    def execute(self, sql, params=()):
        self.statements.append((sql, params))
        return self.conn.execute(sql, params)

    def executemany(self, sql, seq):
        seq = list(seq)
        self.statements.append((sql, seq[0] if seq else ()))
        return self.conn.executemany(sql, seq)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def statements_of(db_path, method, path, body=None):
    """The SQL a request runs, by calling the relay's own route handler
    in-process: [(sql, params, plan lines, VM steps)] for each distinct
    statement. VM steps (SQLite's own instruction count, from a progress
    handler) measure the work a statement did, free of timing noise."""
    relay = agent_relay.Relay(agent_relay.Settings(db_path=db_path))
    relay.audiences()  # built once per change to the agents, not per request: as a running relay has it
    recorder = RecordingConnection(relay.store.conn)
    relay.store.conn = recorder
    try:
        url_path, _, query = path.partition("?")
        route, params = agent_relay.ROUTER.resolve(method, url_path)
        raw = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = agent_relay.Request(method, url_path, query, headers, raw, agent_relay.ANONYMOUS, params)
        status = agent_relay.execute(relay, route, request)[0]
        assert 200 <= status < 300, status
        found, seen = [], set()
        conn = recorder.conn
        for sql, params in recorder.statements:
            word = sql.split(None, 1)[0].upper()
            if word not in ("SELECT", "INSERT", "UPDATE", "DELETE") or sql in seen or sql.count("?") != len(params):
                continue
            seen.add(sql)
            plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            steps = None
            if word == "SELECT":
                counter = [0]

                def tick(counter=counter):
                    counter[0] += 1
                conn.set_progress_handler(tick, 100)
                conn.execute(sql, params).fetchall()
                conn.set_progress_handler(None, 0)
                steps = counter[0] * 100
            found.append((sql, params, plan, steps))
        return found
    finally:
        relay.store.conn = recorder.conn
        relay.store.close()


def is_scan(line):
    return line.startswith("SCAN") and "CONSTANT ROW" not in line


def annotate_scans(db_path, plan):
    """SCAN lines with the size of what they read (a scan of a six-row table is no problem)."""
    conn = sqlite3.connect(db_path)
    try:
        out = []
        for line in plan:
            if is_scan(line):
                table = line.split()[1]
                try:
                    rows = conn.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0]
                    line += "   <-- scan of %s rows" % format(rows, ",")
                except sqlite3.Error:
                    line += "   <-- scan"
            out.append(line)
        return out
    finally:
        conn.close()


def bench_scaling(args, tmp):
    sizes = {"small": 1000, "large": args.messages}
    timings = {}
    for name, count in sizes.items():
        path = os.path.join(tmp, "scaling-%s.db" % name)
        seconds = prefill.prefill(path, count)
        note("scaling: prefilled %s messages in %.1f s (%.0f MB)" % (format(count, ","), seconds,
                                                                    os.path.getsize(path) / 2 ** 20))
    peer_send = dict(SEND_BODY, to="bench-peer")
    for _ in range(args.rounds):
        for name in sizes:
            server = relay_server(os.path.join(tmp, "scaling-%s.db" % name))
            try:
                status, answer = loadgen.call(server.port, "GET", POLL_PATH)
                assert status == 200 and len(answer["messages"]) == 50, (name, status)
                poll = loadgen.latency(server.port, "GET", POLL_PATH, seconds=args.latency_seconds, max_requests=2000)
                send = loadgen.latency(server.port, "POST", "/api/messages", peer_send,
                                       seconds=args.latency_seconds, max_requests=2000)
            finally:
                server.stop()
            found = {"poll": percentile_ms(poll, 0.5), "send": percentile_ms(send, 0.5),
                     "poll99": percentile_ms(poll, 0.99), "send99": percentile_ms(send, 0.99)}
            previous = timings.get(name)
            timings[name] = {k: min(v, previous[k]) if previous else v for k, v in found.items()}
    small, large = timings["small"], timings["large"]
    big = format(args.messages, ",")
    row("inbox poll p50 (ms), %s / 1,000 msgs" % big, large["poll"], small["poll"], "<= 1.5x",
        large["poll"] <= 1.5 * small["poll"])
    row("send p50 (ms), %s / 1,000 msgs" % big, large["send"], small["send"], "<= 1.5x",
        large["send"] <= 1.5 * small["send"])
    note("scaling p99: poll %.2f / %.2f ms, send %.2f / %.2f ms (large / small)" % (
        large["poll99"], small["poll99"], large["send99"], small["send99"]))
    requests = (("inbox poll: GET " + POLL_PATH, "GET", POLL_PATH, None),
                ("send: POST /api/messages (direct)", "POST", "/api/messages", peer_send))
    for label, method, path, body in requests:
        try:
            statements = {name: statements_of(os.path.join(tmp, "scaling-%s.db" % name), method, path, body)
                          for name in sizes}
        except Exception as error:  # noqa: BLE001 - report, do not lose the other figures
            note("could not reproduce the %s statements: %r" % (label, error))
            continue
        small_steps = {sql: steps for sql, _, _, steps in statements["small"]}
        for sql, _, plan, steps in statements["large"]:
            plan = annotate_scans(os.path.join(tmp, "scaling-large.db"), plan)
            if steps is not None:
                plan.append("(SQLite VM steps: %s with %s messages, %s with 1,000)" % (
                    format(steps, ","), big, format(small_steps.get(sql, 0), ",")))
            PLANS.append((label, sql, plan))


def print_plans():
    if not PLANS:
        return
    print("\nQuery plans (EXPLAIN QUERY PLAN on the large database; SCAN = reads a whole table or index; "
          "VM steps = SQLite's count of the work done):")
    last = None
    for label, sql, plan in PLANS:
        if label != last:
            print("\n== %s" % label)
            last = label
        print("  %s" % shorten(sql))
        for line in plan:
            print("      " + line)


def shorten(sql, limit=400):
    sql = re.sub(r"\s+", " ", sql)
    sql = re.sub(r"SELECT m\.id, m\.sender.*?m\.expires_at", "SELECT <message columns>", sql)
    return sql if len(sql) <= limit else sql[:limit] + " ..."


# ---------------------------------------------------------------------------
# coldstart
# ---------------------------------------------------------------------------

def time_to_health(start):
    began = time.perf_counter()
    server = start()
    try:
        status, _ = loadgen.call(server.port, "GET", "/api/health")
        assert status == 200, status
        return time.perf_counter() - began
    finally:
        server.stop()


def module_server(folder, db_path):
    """`python3 -m agent_relay` from a folder holding the script and its compiled
    bytecode: how an installed relay (console script, daemon unit) starts."""
    env_flag = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        server = loadgen.Server([sys.executable, "-m", "agent_relay", "--port", "0", "--db-path", db_path],
                                cwd=folder)
    finally:
        if env_flag is not None:
            os.environ["PYTHONDONTWRITEBYTECODE"] = env_flag
    return server


def bench_coldstart(args, tmp):
    folder = os.path.join(tmp, "installed")
    os.makedirs(folder)
    shutil.copy(RELAY, os.path.join(folder, "agent_relay.py"))
    py_compile.compile(os.path.join(folder, "agent_relay.py"), doraise=True,
                       cfile=importlib.util.cache_from_source(os.path.join(folder, "agent_relay.py")))
    times = {"script": [], "module": [], "bare": [], "interpreter": []}
    for i in range(args.coldstarts):
        script_db, module_db = os.path.join(tmp, "cold-%d.db" % i), os.path.join(tmp, "cold-m%d.db" % i)
        times["script"].append(time_to_health(lambda: relay_server(script_db)))  # noqa: B023 - called at once
        times["module"].append(time_to_health(lambda: module_server(folder, module_db)))  # noqa: B023
        times["bare"].append(time_to_health(lambda: baseline_server("get")))
        began = time.perf_counter()  # the interpreter alone: how loaded the machine is right now
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=loadgen.clean_env())
        times["interpreter"].append(time.perf_counter() - began)
    script, module, bare = (ms(statistics.median(times[k])) for k in ("script", "module", "bare"))
    row("cold start to /api/health (ms, median)", script, bare, "< 200 ms", script < 200)
    row("cold start, python3 -m (cached bytecode) (ms)", module, bare, "(info)", True)
    note("coldstart: `python3 agent_relay.py` min %.0f max %.0f ms (compiles the whole file every start); "
         "`python3 -m agent_relay` with its .pyc min %.0f max %.0f ms; bare server min %.0f max %.0f ms; "
         "`python3 -c pass` median %.0f ms; %d starts each, a new database each time" % (
             ms(min(times["script"])), ms(max(times["script"])), ms(min(times["module"])),
             ms(max(times["module"])), ms(min(times["bare"])), ms(max(times["bare"])),
             ms(statistics.median(times["interpreter"])), args.coldstarts))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            memory = ", %.0f GB RAM" % (int(f.readline().split()[1]) / 2 ** 20)
    except OSError:
        pass
    wrk = "wrk " + subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1] \
        if loadgen.have_wrk() else "stdlib load generator (no wrk)"
    return ("%s, %d cores%s; %s %s; Python %s, SQLite %s; %s" % (
        cpu, os.cpu_count() or 0, memory, platform.system(), platform.release(), platform.python_version(),
        sqlite3.sqlite_version, wrk))


def fmt(value):
    return "%.2f" % value if abs(value) < 100 else "%.0f" % value


def table_lines():
    widths = (44, 10, 10, 7, 18, 6)
    head = ("figure", "relay", "baseline", "ratio", "target", "met")
    lines = ["  ".join(h.ljust(w) if i == 0 or i == 4 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for figure, relay, baseline, ratio, target, met, _ in ROWS:
        cells = (figure, fmt(relay), fmt(baseline), "%.2f" % ratio, target, "yes" if met else "NO")
        lines.append("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))))
    return lines


def markdown(name, stamp, host, options):
    relay = os.path.relpath(RELAY, ROOT) if RELAY.startswith(ROOT) else RELAY
    out = ["<!-- figures:%s: written by `python3 bench/run.py --record %s`; edit outside this block -->" % (name, name),
           "", "Run: %s, `python3 bench/run.py %s`, relay `%s`" % (stamp, options, relay), "",
           "Machine: %s" % host, "",
           "| figure | relay | baseline | ratio | target | met |", "|---|---:|---:|---:|---|---|"]
    for figure, relay, baseline, ratio, target, met, _ in ROWS:
        out.append("| %s | %s | %s | %.2f | %s | %s |" % (figure, fmt(relay), fmt(baseline), ratio, target,
                                                         "yes" if met else "**no**"))
    out += ["", "Details:", ""] + ["- " + n for n in NOTES]
    if PLANS:
        out += ["", "Query plans on the large database:", "", "```"]
        last = None
        for label, sql, plan in PLANS:
            if label != last:
                out.append("== " + label)
                last = label
            out.append("  " + shorten(sql))
            out += ["      " + line for line in plan]
        out.append("```")
    out.append("<!-- figures:%s: end -->" % name)
    return "\n".join(out)


def record(name, block):
    start, end = "<!-- figures:%s: written" % name, "<!-- figures:%s: end -->" % name
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, one round, 200,000 stored messages")
    parser.add_argument("--only", default=",".join(ALL), help="comma list of: " + ", ".join(ALL))
    parser.add_argument("--messages", type=int, help="stored messages for the scaling figure (1,000,000)")
    parser.add_argument("--rounds", type=int, help="alternating relay/baseline rounds per figure (2)")
    parser.add_argument("--no-wrk", action="store_true", help="use the stdlib load generator even with wrk")
    parser.add_argument("--record", nargs="?", const="main", metavar="NAME",
                        help="rewrite the figures block NAME (default: main) of bench/RESULTS.md")
    parser.add_argument("--relay", default=RELAY, help="the relay script to measure (default: ../agent_relay.py)")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(ALL))
    if unknown:
        parser.error("unknown figures: %s" % ", ".join(unknown))
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.messages = args.messages or (200000 if args.quick else 1000000)
    args.load_seconds = 3 if args.quick else 8
    args.latency_seconds = 1.5 if args.quick else 3.0
    args.fanout_seconds = 3.0 if args.quick else 5.0
    args.coldstarts = 3 if args.quick else 7
    if os.path.abspath(args.relay) != RELAY:
        use_relay(args.relay)
    if args.no_wrk:
        loadgen.have_wrk = lambda: False
    loadgen.raise_fd_limit()
    host = machine()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("Agent Relay benchmarks, %s\n%s\n" % (stamp, host), flush=True)
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="relay-bench-")
    try:
        # Cold starts first: after the scaling step's 521 MB prefill the disk is
        # still writing it back, and every start is 15-25% slower then (the
        # bare server's too), while `python3 -c pass` does not move.
        if "coldstart" in wanted:
            bench_coldstart(args, tmp)
        if {"send", "poll", "latency"} & set(wanted):
            bench_http(args, tmp, wanted)
        steps = (("fanout", bench_fanout), ("streams", bench_streams), ("scaling", bench_scaling))
        for name, step in steps:
            if name in wanted:
                step(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + "\n".join(table_lines()))
    print_plans()
    print("\n%d of %d targets met; %.0f s" % (sum(r[5] for r in ROWS), len(ROWS), time.monotonic() - began))
    if args.record:
        options = " ".join(argv if argv is not None else sys.argv[1:])
        record(args.record, markdown(args.record, stamp, host, options))
        print("recorded in %s" % os.path.relpath(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
