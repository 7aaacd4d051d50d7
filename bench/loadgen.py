#!/usr/bin/env python3
"""Load, latency and SSE clients for bench/run.py. Stdlib only.

- `Server`: a relay or baseline in its own process (its own interpreter
  lock), started from a command line that prints "listening on URL".
- `load()`: N keep-alive connections hammering one request for a fixed
  time. wrk when it is installed (a Lua script is written to a temp file
  for the method, body and the JSON summary), else `stdlib_load()`:
  processes of threads on raw sockets.
- `latency()`: one keep-alive connection, requests back to back;
  per-request times from a raw-socket client (wrk has no per-request
  samples for a single connection, and one client keeps both sides equal).
- `python3 bench/loadgen.py subscribe ...`: a child process holding many
  SSE streams on one epoll loop, noting when each message arrives (the
  sender puts its monotonic send time in the body; CLOCK_MONOTONIC is
  machine-wide on Linux, so the two processes share it).
"""

import json
import multiprocessing
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LISTENING = re.compile(r"listening on (http://[^\s]+)")


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def clean_env():
    """The environment without relay settings a developer may have exported."""
    names = ("AGENT_RELAY_", "PORT", "HOST", "DB_PATH", "STALE_", "OFFLINE_", "REAP_", "RETENTION_", "MAX_",
             "SSE_", "PAIR_", "DURABILITY", "TASK_", "CALLBACK_", "REQUEST_")
    return {k: v for k, v in os.environ.items() if not k.startswith(names)}


# ---------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------


class Server:
    """A server subprocess; `port` once it has printed its URL."""

    def __init__(self, argv, timeout=30.0, cwd=None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=clean_env(), preexec_fn=raise_fd_limit, cwd=cwd)
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        match = LISTENING.search(line)
        if not match:
            self.stop()
            raise RuntimeError("%s did not start: %r" % (" ".join(argv), line))
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    @property
    def pid(self):
        return self.proc.pid

    def memory_kb(self):
        """(VmRSS, VmHWM) of the process in KiB."""
        found = {}
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found[name] = int(value.split()[0])
        return found.get("VmRSS"), found.get("VmHWM")

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------
# One HTTP/1.1 exchange on a raw socket
# ---------------------------------------------------------------------------


def build_request(method, path, body=None, port=0):
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (method, path, port)
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return (head + "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)).encode() + data
    return (head + "\r\n").encode()


class Connection:
    """A keep-alive connection that sends one request in one write and reads
    one Content-Length response."""

    def __init__(self, port, timeout=30.0):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def exchange(self, request):
        """Send `request`, return (status, body)."""
        self.sock.sendall(request)
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = self.buffer[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        total = end + 4 + length
        while len(self.buffer) < total:
            self._fill()
        body, self.buffer = self.buffer[end + 4:total], self.buffer[total:]
        return int(head[9:12]), body

    def _fill(self):
        data = self.sock.recv(262144)
        if not data:
            raise OSError("connection closed by the server")
        self.buffer += data

    def close(self):
        self.sock.close()


def call(port, method, path, body=None):
    """One request on a fresh connection: (status, parsed JSON)."""
    conn = Connection(port)
    try:
        status, raw = conn.exchange(build_request(method, path, body, port))
        return status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------
# Throughput: wrk, or the stdlib fallback
# ---------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local codes = {}
  for code, n in pairs(statuses) do codes[#codes + 1] = string.format('"%%d": %%d', code, n) end
  io.write(string.format('WRKJSON {"requests": %%d, "seconds": %%f, "p50_us": %%f, "p99_us": %%f, '
    .. '"errors": %%d, "statuses": {%%s}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
      + summary.errors.status, table.concat(codes, ", ")))
end
"""


def _lua_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"' if text is not None else "nil"


def wrk_load(port, method, path, body, connections, seconds, threads=2):
    data = json.dumps(body) if body is not None else None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"method": _lua_string(method), "body": _lua_string(data)})
    try:
        out = subprocess.run(["wrk", "-t%d" % min(threads, connections), "-c%d" % connections,
                              "-d%ds" % max(1, round(seconds)), "--timeout", "10s", "-s", script.name,
                              "http://127.0.0.1:%d%s" % (port, path)],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        os.unlink(script.name)
    line = [x for x in out.splitlines() if x.startswith("WRKJSON ")]
    if not line:
        raise RuntimeError("wrk gave no summary:\n" + out)
    r = json.loads(line[0][8:])
    bad = sum(n for code, n in r["statuses"].items() if not 200 <= int(code) < 300)
    return {"rps": r["requests"] / r["seconds"], "requests": r["requests"], "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "errors": r["errors"] + bad, "tool": "wrk"}


def _load_worker(port, request, connections, stop_at, results):
    counts, samples, errors = [0], [], [0]

    def loop():
        conn = Connection(port)
        try:
            while time.monotonic() < stop_at:
                began = time.perf_counter()
                status, _ = conn.exchange(request)
                samples.append(time.perf_counter() - began)
                counts[0] += 1
                if not 200 <= status < 300:
                    errors[0] += 1
        except OSError:
            errors[0] += 1
        finally:
            conn.close()
    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((counts[0], errors[0], samples))


def stdlib_load(port, method, path, body, connections, seconds):
    """Processes of threads (one keep-alive connection each) on raw sockets."""
    request = build_request(method, path, body, port)
    procs = min(connections, max(1, os.cpu_count() or 1))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    began = time.monotonic()
    stop_at = began + seconds
    workers = [ctx.Process(target=_load_worker, args=(port, request, connections // procs + (i < connections % procs),
                                                     stop_at, results)) for i in range(procs)]
    for w in workers:
        w.start()
    gathered = [results.get(timeout=seconds + 30) for _ in workers]
    elapsed = time.monotonic() - began
    for w in workers:
        w.join()
    samples = [s for _, _, part in gathered for s in part]
    return {"rps": sum(c for c, _, _ in gathered) / elapsed, "requests": sum(c for c, _, _ in gathered),
            "p50_ms": percentile(samples, 0.5) * 1000, "p99_ms": percentile(samples, 0.99) * 1000,
            "errors": sum(e for _, e, _ in gathered), "tool": "stdlib"}


def have_wrk():
    return shutil.which("wrk") is not None


def load(port, method, path, body=None, connections=16, seconds=10.0, use_wrk=None):
    if use_wrk is None:
        use_wrk = have_wrk()
    if use_wrk:
        return wrk_load(port, method, path, body, connections, seconds)
    return stdlib_load(port, method, path, body, connections, seconds)


def latency(port, method, path, body=None, seconds=3.0, max_requests=5000, warmup=50):
    """Back-to-back requests on one keep-alive connection: per-request seconds."""
    request = build_request(method, path, body, port)
    conn = Connection(port)
    samples = []
    try:
        for _ in range(warmup):
            conn.exchange(request)
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at and len(samples) < max_requests:
            began = time.perf_counter()
            status, _ = conn.exchange(request)
            samples.append(time.perf_counter() - began)
            if not 200 <= status < 300:
                raise RuntimeError("%s %s answered %d" % (method, path, status))
    finally:
        conn.close()
    return samples


# ---------------------------------------------------------------------------
# SSE subscribers (a child process) and the timed sender
# ---------------------------------------------------------------------------

SENT_MARK = re.compile(rb'"body":"b(\d+) ([0-9.]+)"')


class Subscribers:
    """The parent's handle on `loadgen.py subscribe`: ready, then collect."""

    def __init__(self, port, paths, timeout=60.0):
        with tempfile.NamedTemporaryFile("w", suffix=".paths", delete=False) as f:
            f.write("\n".join(paths))
        self.paths_file = f.name
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "subscribe", str(port),
                                      self.paths_file, str(timeout)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError("subscribers did not connect: %r" % line)
        self.connect_seconds = float(line.split()[1])

    def collect(self, expect_per_stream, wait_seconds=10.0):
        """Tell the child to wait until every stream has `expect_per_stream`
        marked messages (or wait_seconds pass); returns {index: [latency s]}
        and the number of streams that ended early."""
        self.proc.stdin.write("collect %d %f\n" % (expect_per_stream, wait_seconds))
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return {int(k): v for k, v in result["arrivals"].items()}, result["ended"]

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.paths_file)


def run_subscribers(port, paths_file, timeout):
    """The child: open every stream, print "ready", note arrivals."""
    with open(paths_file) as f:
        paths = f.read().split("\n")
    selector = selectors.DefaultSelector()
    began = time.monotonic()
    streams = []
    for path in paths:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n"
                      % (path, port)).encode())
        sock.setblocking(False)
        state = {"sock": sock, "buffer": b"", "open": False, "ended": False, "count": 0}
        streams.append(state)
        selector.register(sock, selectors.EVENT_READ, state)
    arrivals = {}

    def pump(wait):
        """Read whatever arrived; returns a command line from stdin, if any."""
        command = None
        for key, _ in selector.select(wait):
            now = time.monotonic()
            state = key.data
            if state is None:
                command = sys.stdin.readline()
                continue
            try:
                data = state["sock"].recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                state["ended"] = True
                selector.unregister(state["sock"])
                continue
            buffer = state["buffer"] + data
            if not state["open"]:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    state["buffer"] = buffer
                    continue
                if not buffer.startswith(b"HTTP/1.1 200"):
                    raise SystemExit("subscribe failed: %r" % buffer[:200])
                state["open"] = True
                buffer = buffer[end + 4:]
            cut = buffer.rfind(b"\n\n")
            if cut >= 0:
                for match in SENT_MARK.finditer(buffer, 0, cut):
                    arrivals.setdefault(int(match.group(1)), []).append(now - float(match.group(2)))
                    state["count"] += 1
                buffer = buffer[cut + 2:]
            state["buffer"] = buffer
        return command

    deadline = time.monotonic() + timeout
    while not all(s["open"] or s["ended"] for s in streams):
        if time.monotonic() > deadline:
            raise SystemExit("streams did not open in time")
        pump(0.5)
    print("ready %.3f" % (time.monotonic() - began), flush=True)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    try:
        while True:
            command = pump(1.0)
            if command == "":
                return
            if command:
                _, expect, wait = command.split()
                stop_at = time.monotonic() + float(wait)
                while time.monotonic() < stop_at and not all(
                        s["count"] >= int(expect) or s["ended"] for s in streams):
                    pump(0.05)
                print(json.dumps({"arrivals": arrivals, "ended": sum(s["ended"] for s in streams)}), flush=True)
                arrivals.clear()
                for s in streams:
                    s["count"] = 0
    finally:
        for s in streams:
            s["sock"].close()


def send_marked(port, rate, count, sender, to, connections=4, first_index=0):
    """POST `count` messages at `rate` per second (open loop, spread over
    `connections` keep-alive connections); each body carries its index and
    monotonic send time. Returns (POST latencies in s, failures, seconds)."""
    latencies, failures = [], []
    start = time.monotonic() + 0.05

    def share(offset):
        conn = Connection(port)
        try:
            for i in range(offset, count, connections):
                pause = start + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent = time.monotonic()
                body = {"from": sender, "to": to, "body": "b%d %.6f" % (first_index + i, sent)}
                status, _ = conn.exchange(build_request("POST", "/api/messages", body, port))
                latencies.append(time.monotonic() - sent)
                if status != 201:
                    failures.append(status)
        finally:
            conn.close()
    threads = [threading.Thread(target=share, args=(k,)) for k in range(min(connections, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures, time.monotonic() - start


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "subscribe":
        raise_fd_limit()
        run_subscribers(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit("usage: loadgen.py subscribe PORT PATHS_FILE TIMEOUT (used by bench/run.py)")
