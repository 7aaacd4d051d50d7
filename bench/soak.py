#!/usr/bin/env python3
"""Soak: mixed traffic against one relay for a long time; does it stay flat?

    python3 bench/soak.py                                  # 10 minutes, a report line a minute
    python3 bench/soak.py --minutes 2 --report-seconds 20  # a short run
    python3 bench/soak.py --durability full                # the cost of synchronous=FULL

The relay runs as its own process (`python3 agent_relay.py --port 0` with a
temporary database) with short intervals: the reaper every second, agents
stale after 5 s and pruned 5 s later, task leases of 3 s. This process plays
every kind of client at once, each thread on its own keep-alive connection:

  senders      direct, capability, channel, broadcast and claimable messages
               (--rate messages per second in all), replies to threads
  pollers      agents reading their unread inbox, long-polling it
               (unread=true&wait=2) when it is empty, marking what they got
               read (--poll since: with a since cursor instead)
  heartbeats   every agent of the team, every 2 s
  subscribers  event streams (?for=<agent>) that hang up every 15 s and
               resume with Last-Event-ID
  claimers     claim claimable messages and tasks; most tasks go
               in_progress then done, some are left for their lease to
               expire (released, then failed after TASK_MAX_ATTEMPTS)
  alerter      an integration posting alarms with dedupe keys (repeats and
               resolves) whose callbacks go to a local receiver that refuses
               one in ten
  visitors     agents that register, work briefly and go silent, so the
               reaper marks them offline and prunes them
  sampler      the relay's RSS, threads and open files every 2 s (/proc)

Each window (--report-seconds, a minute by default) prints the requests,
unexpected answers, latency percentiles of the short requests (long-polls
and streams excluded), and the relay's RSS, threads and file descriptors.
After the warm-up (--warmup-minutes) every window must stay within 10% of
the first window after it in RSS, threads and fds (a leak only grows), and
the p99 latency of the last third of the windows (their median) within 10%
of the first third's: a drift shows there, while a one-minute spike of a
noisy neighbour on a shared machine does not decide (counts may also move
by 2 and p99 by 2 ms, so that noise on small numbers does not decide
either). Exit status: 0 flat, 1 not flat, 2 unexpected answers or a relay
that did not stop cleanly.

Stdlib only, loopback only, every loop bounded by the run's deadline.
"""

import argparse
import collections
import http.client
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "agent_relay.py")
sys.path.insert(0, ROOT)
from conftest import StubServer  # noqa: E402 - the tests' stand-in server, from the repository root

LISTENING = re.compile(r"listening on (http://[^\s]+)")
OPS_TOKEN = "soak-ops-token-0001"
EXPECTED_REFUSALS = {409, 410}  # lost claim races, stale claims after a lease expired, expired messages


# ---------------------------------------------------------------------------
# The relay process and its numbers
# ---------------------------------------------------------------------------


class Relay:
    def __init__(self, folder, durability, receiver_url):
        integrations = [{"name": "ops", "token": OPS_TOKEN, "scopes": ["tasks:create", "tasks:read"],
                         "targets": ["cap:ops"], "callbackUrl": receiver_url, "callbackSecret": "soak-secret"}]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PORT", "HOST", "DB_PATH"))}
        env.update({"REAP_INTERVAL_MS": "1000", "STALE_TTL_MS": "5000", "OFFLINE_PRUNE_MS": "5000",
                    "TASK_LEASE_SECONDS": "3", "TASK_MAX_ATTEMPTS": "2", "CALLBACK_RETRY_BASE_MS": "200",
                    "PAIR_INVITE_TTL_MS": "5000", "SSE_KEEPALIVE_MS": "5000", "DURABILITY": durability,
                    "AGENT_RELAY_INTEGRATIONS": json.dumps(integrations),
                    "AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE": "100000"})
        self.log = open(os.path.join(folder, "relay.log"), "w")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--port", "0", "--host", "127.0.0.1",
                                      "--db-path", os.path.join(folder, "soak.db")],
                                     stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, env=env,
                                     text=True)
        line = self.proc.stdout.readline()
        found = LISTENING.search(line)
        if not found:
            self.proc.kill()
            raise SystemExit("the relay did not start: %r" % line)
        self.url = found.group(1)
        host, _, port = self.url.split("://")[1].rpartition(":")
        self.host, self.port = host, int(port)

    def usage(self):
        """(RSS MiB, threads, open file descriptors) of the relay process."""
        fields = {}
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                name, _, value = line.partition(":")
                fields[name] = value.split()
        return (int(fields["VmRSS"][0]) / 1024.0, int(fields["Threads"][0]),
                len(os.listdir("/proc/%d/fd" % self.proc.pid)))

    def stop(self):
        """SIGTERM (graceful); the exit status, or None if it had to be killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = None
        self.proc.stdout.close()
        self.log.close()
        return status


class Receiver:
    """The integration's callback endpoint: answers 200, or 503 one time in ten."""

    def __init__(self):
        self.count = collections.Counter()
        rng = random.Random(7)
        lock = threading.Lock()
        receiver = self

        def respond(handler, body):
            with lock:
                status = 503 if rng.random() < 0.1 else 200
                receiver.count[status] += 1
            return status, [], b""

        self.http = StubServer(respond)
        self.url = self.http.url + "/hook"

    def close(self):
        self.http.close()


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


class Stats:
    """Per-window latency samples, request and error counts, resource samples."""

    def __init__(self, window_seconds):
        self.window_seconds = window_seconds
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.windows = collections.defaultdict(lambda: {"latencies": [], "requests": 0, "errors": [],
                                                        "usage": [], "events": 0,
                                                        "routes": collections.defaultdict(list)})

    def window(self):
        return int((time.monotonic() - self.started) // self.window_seconds)

    def request(self, route, seconds, timed=True):
        with self.lock:
            slot = self.windows[self.window()]
            slot["requests"] += 1
            if timed:
                slot["latencies"].append(seconds)
                slot["routes"][route].append(seconds)

    def error(self, text):
        with self.lock:
            self.windows[self.window()]["errors"].append(text)

    def events(self, count):
        with self.lock:
            self.windows[self.window()]["events"] += count

    def usage(self, sample):
        with self.lock:
            self.windows[self.window()]["usage"].append(sample)


def route_of(method, path):
    """`GET /api/messages?for=a&unread=true` -> `GET /api/messages?unread`, ids as :id."""
    bare, _, query = path.partition("?")
    bare = re.sub(r"/(\d+|soak-agent-\d+|visitor-\d+)(?=/|$)", "/:id", bare)
    flags = sorted(k for k in ("unread", "wait", "since", "status") if re.search(r"(^|&)%s=" % k, query))
    return "%s %s%s" % (method, bare, "?" + ",".join(flags) if flags else "")


def percentile(values, fraction):
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * (len(ordered) - 1) + 0.5))]


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class Client:
    """One keep-alive connection that times each call and reconnects after an error."""

    def __init__(self, relay, stats, token=None):
        self.relay, self.stats, self.token = relay, stats, token
        self.conn = None

    def call(self, method, path, body=None, timed=True, timeout=10):
        """The decoded answer of a 2xx, None for an expected refusal (409/410); logs anything else."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.relay.host, self.relay.port, timeout=timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            answer = self.conn.getresponse()
            raw = answer.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            self.stats.error("%s %s: %s" % (method, path.split("?")[0], error))
            return None
        self.stats.request(route_of(method, path), time.perf_counter() - started, timed)
        if answer.will_close:
            self.close()
        if 200 <= answer.status < 300:
            return json.loads(raw) if raw else {}
        if answer.status not in EXPECTED_REFUSALS:
            self.stats.error("%s %s: %d %s" % (method, re.sub(r"/\d+", "/:id", path.split("?")[0]), answer.status,
                                                raw[:160].decode("utf-8", "replace")))
        return None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Traffic:
    AGENTS = ["soak-agent-%d" % i for i in range(8)]
    CHANNELS = ("builds", "alerts", "chat")

    def __init__(self, relay, stats, args, deadline):
        self.relay, self.stats, self.args = relay, stats, args
        self.deadline = deadline
        self.stopping = threading.Event()
        self.claimable = collections.deque(maxlen=200)
        self.threads = []

    def running(self):
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def pace(self, per_second, rng):
        """Sleep about 1/per_second (exponential gaps: Poisson traffic)."""
        self.stopping.wait(min(5.0, rng.expovariate(per_second)))

    def start(self):
        setup = Client(self.relay, self.stats)
        for number, agent_id in enumerate(self.AGENTS):
            setup.call("POST", "/api/agents", {"id": agent_id, "capabilities": ["ops", "review"] if number % 2 else
                                               ["ops"], "tags": ["soak"], "channels": [] if number % 3 else
                                               [self.CHANNELS[number % 3]], "label": "soak %d" % number})
        setup.close()
        a = self.args
        plan = ([(self.sender, i) for i in range(a.senders)] + [(self.poller, i) for i in range(a.pollers)]
                + [(self.subscriber, i) for i in range(a.subscribers)] + [(self.claimer, i) for i in range(a.claimers)]
                + [(self.alerter, 0), (self.visitor, 0), (self.heartbeats, 0), (self.sampler, 0)])
        for number, (target, index) in enumerate(plan):
            thread = threading.Thread(target=target, args=(index, random.Random(number)), daemon=True,
                                      name="%s-%d" % (target.__name__, index))
            self.threads.append(thread)
            thread.start()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)

    # -- the clients --------------------------------------------------------

    def sender(self, index, rng):
        client = Client(self.relay, self.stats)
        sender = self.AGENTS[index % len(self.AGENTS)]
        last = None
        while self.running():
            kind = rng.random()
            body = {"from": sender, "body": "soak %d from %s: %s" % (rng.randrange(10 ** 6), sender, "x" *
                                                                     rng.randrange(20, 400))}
            if kind < 0.45:
                body["to"] = rng.choice(self.AGENTS)
            elif kind < 0.65:
                body.update(to="cap:review", subject="please look")
            elif kind < 0.8:
                body.update(to="channel:%s" % rng.choice(self.CHANNELS))
            elif kind < 0.83:
                body.update(to="broadcast")
            else:
                body.update(to="cap:ops", claimable=True)
            if last is not None and rng.random() < 0.2:
                body["replyTo"] = last
            answer = client.call("POST", "/api/messages", body)
            if answer:
                last = answer["id"]
                if answer["claimable"]:
                    self.claimable.append(answer["id"])
            self.pace(self.args.rate / float(self.args.senders), rng)
        client.close()

    def poller(self, index, rng):
        """--poll unread: what the provider hooks do on every prompt (the unread
        inbox), then, with nothing waiting, a long-poll (untimed: it waits on
        purpose), then mark what came read up to its last id.
        --poll since: the same with a cursor (`since`), marking the ids read."""
        client = Client(self.relay, self.stats)
        agent_id = self.AGENTS[index % len(self.AGENTS)]
        cursor = 0
        while self.running():
            query = "unread=true" if self.args.poll == "unread" else "since=%d" % cursor
            answer = client.call("GET", "/api/messages?for=%s&%s&limit=100" % (agent_id, query))
            if answer is not None and not answer["messages"]:
                answer = client.call("GET", "/api/messages?for=%s&%s&wait=2&limit=100" % (agent_id, query),
                                     timed=False)
            if answer and answer["messages"]:
                cursor = answer["messages"][-1]["id"]
                marked = {"upTo": cursor} if self.args.poll == "unread" else {
                    "ids": [m["id"] for m in answer["messages"]]}
                client.call("POST", "/api/messages/read", dict(marked, agentId=agent_id))
            self.stopping.wait(0.25)
        client.close()

    def heartbeats(self, index, rng):
        """Every agent of the team stays alive (the visitors do not)."""
        client = Client(self.relay, self.stats)
        while self.running():
            for agent_id in self.AGENTS:
                client.call("POST", "/api/agents/%s/heartbeat" % agent_id, {"status": rng.choice(
                    ["online", "busy", "idle", "online"])})
            self.stopping.wait(2)
        client.close()

    def subscriber(self, index, rng):
        agent_id = self.AGENTS[index % len(self.AGENTS)]
        last_id = None
        while self.running():
            last_id = self._follow(agent_id, last_id, time.monotonic() + 15)

    def _follow(self, agent_id, last_id, until):
        """Read one stream until `until`; returns the last event id seen."""
        try:
            sock = socket.create_connection((self.relay.host, self.relay.port), timeout=1)
        except OSError as error:
            self.stats.error("stream connect: %s" % error)
            self.stopping.wait(0.5)
            return last_id
        try:
            resume = "Last-Event-ID: %d\r\n" % last_id if last_id is not None else ""
            sock.sendall(("GET /api/events?for=%s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (agent_id, resume))
                         .encode())
            reader = sock.makefile("rb")
            status = reader.readline()
            if b" 200 " not in status:
                self.stats.error("stream: %r" % status)
                return last_id
            while self.running() and time.monotonic() < until:
                try:
                    line = reader.readline()
                except socket.timeout:
                    continue
                if not line:
                    self.stats.error("stream ended by the relay")
                    break
                if line.startswith(b"id: "):
                    last_id = int(line[4:])
                elif line.startswith(b"event: "):
                    self.stats.events(1)
                    if line.startswith(b"event: stream.reset"):
                        self.stats.error("stream.reset on resume")
        except OSError as error:
            self.stats.error("stream: %s" % error)
        finally:
            sock.close()
        return last_id

    def claimer(self, index, rng):
        client = Client(self.relay, self.stats)
        agent_id = self.AGENTS[(index * 3 + 1) % len(self.AGENTS)]
        while self.running():
            if self.claimable and rng.random() < 0.5:
                client.call("POST", "/api/messages/%d/claim" % rng.choice(list(self.claimable)), {"agentId": agent_id})
            else:
                answer = client.call("GET", "/api/tasks?status=open&limit=5")
                if answer and answer["tasks"]:
                    task = rng.choice(answer["tasks"])
                    claimed = client.call("POST", "/api/tasks/%d/claim" % task["id"], {"agentId": agent_id,
                                                                                     "leaseSeconds": 3})
                    if claimed and rng.random() < 0.85:  # the rest are abandoned: their lease runs out
                        token = claimed["claimToken"]
                        client.call("PATCH", "/api/tasks/%d/status" % task["id"], {
                            "claimToken": token, "status": "in_progress", "progress": {"step": 1}})
                        client.call("PATCH", "/api/tasks/%d/status" % task["id"], {
                            "claimToken": token, "status": rng.choice(["done", "done", "failed"]),
                            "result": {"ok": True}})
            self.pace(4, rng)
        client.close()

    def alerter(self, index, rng):
        client = Client(self.relay, self.stats, token=OPS_TOKEN)
        while self.running():
            key = "check-%d" % rng.randrange(40)
            status = "resolved" if rng.random() < 0.2 else "firing"
            client.call("POST", "/api/integrations/events", {"type": "alarm", "title": "%s failing" % key,
                                                             "severity": "warning", "dedupeKey": key,
                                                             "status": status})
            self.pace(6, rng)
        client.close()

    def visitor(self, index, rng):
        """Agents that come, talk, and vanish (the reaper takes them offline, then prunes them)."""
        client = Client(self.relay, self.stats)
        number = 0
        while self.running():
            number += 1
            agent_id = "visitor-%d" % number
            client.call("POST", "/api/agents", {"id": agent_id, "capabilities": ["review"], "tags": ["visitor"]})
            client.call("POST", "/api/messages", {"from": agent_id, "to": rng.choice(self.AGENTS), "body": "hello"})
            client.call("GET", "/api/agents?tag=visitor")
            client.call("GET", "/api/stats")
            self.pace(1, rng)
        client.close()

    def sampler(self, index, rng):
        while self.running():
            try:
                self.stats.usage(self.relay.usage())
            except OSError:
                self.stats.error("the relay process is gone")
                return
            self.stopping.wait(2)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def summarize(stats, windows):
    rows = []
    for number in range(windows):
        slot = stats.windows.get(number)
        if slot is None:
            continue
        usage = slot["usage"] or [(0.0, 0, 0)]
        latencies = slot["latencies"]
        rows.append({"window": number, "requests": slot["requests"], "errors": len(slot["errors"]),
                     "p50": percentile(latencies, 0.50) * 1000, "p99": percentile(latencies, 0.99) * 1000,
                     "max": max(latencies or [0]) * 1000, "rss": max(u[0] for u in usage),
                     "threads": max(u[1] for u in usage), "fds": max(u[2] for u in usage), "events": slot["events"]})
    return rows


HEADER = "%-6s %7s %6s %6s %7s %7s %8s %8s %7s %5s %7s" % (
    "end", "reqs", "req/s", "errors", "p50 ms", "p99 ms", "max ms", "RSS MiB", "threads", "fds", "events")


def print_rows(rows, window_seconds, warmup_windows):
    for row in rows:
        end = (row["window"] + 1) * window_seconds
        print("%2d:%02d  %7d %6.1f %6d %7.2f %7.2f %8.1f %8.1f %7d %5d %7d%s" % (
            end // 60, end % 60, row["requests"], row["requests"] / float(window_seconds), row["errors"], row["p50"],
            row["p99"], row["max"], row["rss"], row["threads"], row["fds"], row["events"],
            "  (warm-up)" if row["window"] < warmup_windows else ""), flush=True)


def print_routes(stats, first, last):
    """p99 per route: the first window after the warm-up against the last one."""
    if last - 1 <= first:
        return
    before, after = stats.windows[first]["routes"], stats.windows[last - 1]["routes"]
    print("p99 by route (ms), window %d -> window %d:" % (first + 1, last))
    for route in sorted(after, key=lambda r: -percentile(after[r], 0.99))[:10]:
        print("  %8.2f -> %8.2f  %6d calls  %s" % (percentile(before.get(route, []), 0.99) * 1000,
                                                  percentile(after[route], 0.99) * 1000, len(after[route]), route))


def flatness(rows, warmup_windows):
    """(flat?, one line per metric) over the windows after the warm-up."""
    measured = [r for r in rows if r["window"] >= warmup_windows]
    if len(measured) < 2:
        return True, ["too few windows after the warm-up to judge (use a longer run or shorter windows)"]
    first = measured[0]
    flat, lines = True, []
    for name, unit, slack in (("rss", "MiB", 0.0), ("threads", "", 2), ("fds", "", 2)):
        values = [r[name] for r in measured]
        limit = max(first[name] * 1.10, first[name] + slack)
        ok = max(values) <= limit
        flat = flat and ok
        lines.append("%-7s %s  first %.1f%s, max %.1f%s (%+.1f%%), limit %.1f%s" % (
            name, "ok  " if ok else "HIGH", first[name], unit, max(values), unit,
            (max(values) / first[name] - 1) * 100 if first[name] else 0.0, limit, unit))
    values = [r["p99"] for r in measured]
    third = max(1, len(values) // 3)
    early, late = statistics.median(values[:third]), statistics.median(values[-third:])
    limit = max(early * 1.10, early + 2.0)
    flat = flat and late <= limit
    lines.append("p99     %s  median of the first %d windows %.1fms, of the last %d %.1fms (%+.1f%%), limit %.1fms; "
                 "highest window %.1fms" % ("ok  " if late <= limit else "HIGH", third, early, third, late,
                                           (late / early - 1) * 100 if early else 0.0, limit, max(values)))
    return flat, lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--report-seconds", type=int, default=60, help="one report line per window (default 60)")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="windows not judged (default 1)")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second from the senders (default 20)")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--pollers", type=int, default=6, help="agents polling their inbox, 4 times a second each")
    parser.add_argument("--subscribers", type=int, default=6)
    parser.add_argument("--claimers", type=int, default=2)
    parser.add_argument("--poll", choices=("unread", "since"), default="unread",
                        help="how pollers read their inbox: unread=true as the hooks do (default), or a since cursor")
    parser.add_argument("--durability", choices=("normal", "full"), default="normal")
    parser.add_argument("--keep", action="store_true", help="keep the database and log folder")
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="agent-relay-soak-")
    receiver = Receiver()
    relay = Relay(folder, args.durability, receiver.url)
    seconds = args.minutes * 60
    windows = max(1, int(round(seconds / args.report_seconds)))
    warmup_windows = int(round(args.warmup_minutes * 60 / args.report_seconds))
    print("Agent Relay soak: %.1f min, a window every %d s, warm-up %.1f min, DURABILITY=%s, --poll %s, "
          "relay pid %d, %s" % (args.minutes, args.report_seconds, args.warmup_minutes, args.durability, args.poll,
                                relay.proc.pid, folder), flush=True)
    print(HEADER, flush=True)
    stats = Stats(args.report_seconds)
    traffic = Traffic(relay, stats, args, time.monotonic() + windows * args.report_seconds)
    traffic.start()
    printed = 0
    try:
        while printed < windows:
            time.sleep(0.5)
            done = min(windows, stats.window())
            if done > printed:
                print_rows(summarize(stats, done)[printed:], args.report_seconds, warmup_windows)
                printed = done
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        traffic.stop()
        status = relay.stop()
        receiver.close()

    rows = summarize(stats, printed)
    flat, lines = flatness(rows, warmup_windows)
    errors = [e for n in range(printed) for e in stats.windows[n]["errors"]]
    print("callbacks: %d delivered, %d refused by the receiver (and retried)" % (receiver.count[200],
                                                                               receiver.count[503]))
    print("\n".join(lines))
    print_routes(stats, warmup_windows, printed)
    if errors:
        print("%d unexpected answers, the most common:" % len(errors))
        for text, count in collections.Counter(errors).most_common(10):
            print("  %5d  %s" % (count, text))
    print("relay exit status on SIGTERM: %s" % status)
    verdict = "FLAT" if flat else "NOT FLAT"
    print("verdict: %s after warm-up (within 10%%), %d unexpected answers" % (verdict, len(errors)))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    if errors or status != 0:
        return 2
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
