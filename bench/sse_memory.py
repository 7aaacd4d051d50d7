#!/usr/bin/env python3
"""SSE memory: event streams that never read must not grow the relay.

    python3 bench/sse_memory.py                        # 1,000 streams, 300 x 60 KB
    python3 bench/sse_memory.py --streams 200 --messages 60 --stop-above-mib 400

The relay runs as its own process with a temporary database. This process
opens --streams event streams that read their answer head and then nothing
more, and --readers streams that read everything, then sends --messages
messages of --kib KiB each. It prints the relay's RSS when idle (streams
open, nothing sent) and its peak RSS (VmHWM), whether every reading stream
got every message, and how many never-reading streams the relay cut.

A sampler reads the relay's RSS every 50 ms and kills the relay when it
passes --stop-above-mib, so a relay that runs away cannot take the machine
with it (the run then reports it, exit status 1). Exit status 0 when the
peak stays under --target-mib and every reader got every event.

tests/test_hostile.py runs this at a smaller size. Loopback only; every
loop is bounded by --seconds.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "agent_relay.py")
LISTENING = re.compile(r"listening on http://([^\s:]+):([0-9]+)")


def proc_status(pid):
    """/proc/<pid>/status as {field: first number} (kB for the Vm fields)."""
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.split() and value.split()[0].isdigit():
                fields[name] = int(value.split()[0])
    return fields


class Sampler(threading.Thread):
    """The relay's RSS every 50 ms; kills the relay past `stop_above_kib`."""

    def __init__(self, proc, stop_above_kib):
        super().__init__(daemon=True)
        self.proc = proc
        self.stop_above_kib = stop_above_kib
        self.peak_kib = 0
        self.killed = False
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.05):
            try:
                rss = proc_status(self.proc.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.peak_kib = max(self.peak_kib, rss)
            if rss > self.stop_above_kib:
                self.killed = True
                self.proc.kill()
                return

    def stop(self):
        self.stopping.set()
        self.join(5)


def open_stream(port, path, rcvbuf=None):
    """A socket with an event stream's answer head read; the body is left unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # keep the kernel's share small too
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path.encode(), port))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing of the body is read
        if not chunk:
            raise RuntimeError("the relay closed an event stream at once: %r" % head)
        head += chunk
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError("event stream refused: %r" % head[:200])
    return sock


class Reader(threading.Thread):
    """A stream that reads everything and collects the ids of message.new
    events; when the relay cuts it for falling behind, it resumes with
    Last-Event-ID, as real clients do."""

    def __init__(self, port, deadline):
        super().__init__(daemon=True)
        self.port = port
        self.deadline = deadline
        self.ids = []
        self.wanted = None
        self.resumed = 0
        self.last_id = None
        self.conn = None
        self._connect()

    def _connect(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Last-Event-ID": str(self.last_id)} if self.last_id is not None else {}
        self.conn.request("GET", "/api/events?types=message.new", headers=headers)
        self.response = self.conn.getresponse()

    def run(self):
        frame_id = data = None
        while time.monotonic() < self.deadline and (self.wanted is None or len(self.ids) < self.wanted):
            try:
                line = self.response.readline()
            except (OSError, ValueError, http.client.HTTPException):
                line = b""
            if line.startswith(b"id: "):
                frame_id = int(line[4:])
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
            elif line == b"\n":  # a whole frame: only now is it received (a cut may end one midway)
                if data is not None:
                    self.ids.append(data["id"])
                self.last_id = frame_id if frame_id is not None else self.last_id
                frame_id = data = None
            elif not line:
                self.conn.close()
                frame_id = data = None
                self.resumed += 1
                try:
                    self._connect()
                except OSError:
                    return

    def close(self):
        self.conn.close()


def call(conn, method, path, body=None):
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"} if body is not None else {})
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read() or b"null")


def run(streams=1000, messages=300, kib=60, readers=4, stop_above_mib=2048, seconds=240, folder=None):
    """One run; returns a dict of figures (see the module docstring)."""
    own = folder is None
    folder = folder or tempfile.mkdtemp(prefix="sse-memory-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PORT", "HOST", "DB_PATH"))}
    log = open(os.path.join(folder, "relay.log"), "w")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--port", "0", "--host", "127.0.0.1", "--db-path",
                             os.path.join(folder, "relay.db")], stdout=subprocess.PIPE, stderr=log,
                            stdin=subprocess.DEVNULL, env=env, text=True)
    deadline = time.monotonic() + seconds
    idle, readers_list, sampler, conn = [], [], None, None
    try:
        found = LISTENING.search(proc.stdout.readline())
        if not found:
            raise RuntimeError("the relay did not start")
        port = int(found.group(2))
        sampler = Sampler(proc, stop_above_mib * 1024)
        sampler.start()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert call(conn, "POST", "/api/agents", {"id": "sink"})[0] == 201
        for _ in range(streams):
            idle.append(open_stream(port, "/api/events?types=message.new", rcvbuf=4096))
        readers_list = [Reader(port, deadline) for _ in range(readers)]
        for reader in readers_list:
            reader.wanted = messages
            reader.start()
        time.sleep(0.5)
        idle_kib = proc_status(proc.pid)["VmRSS"]
        body = "x" * (kib * 1024)
        sent = 0
        started = time.monotonic()
        for _ in range(messages):
            if sampler.killed or time.monotonic() > deadline:
                break
            status, _ = call(conn, "POST", "/api/messages", {"from": "bench", "to": "sink", "body": body})
            if status != 201:
                raise RuntimeError("a send answered %d" % status)
            sent += 1
        send_seconds = time.monotonic() - started
        for reader in readers_list:
            reader.join(max(0.1, deadline - time.monotonic()))
        read_seconds = time.monotonic() - started
        open_after = None
        if not sampler.killed:
            time.sleep(0.5)
            conn.close()  # it may have idled past the keep-alive limit while the readers caught up
            open_after = call(conn, "GET", "/api/stats")[1]["sseClients"] - readers
        status = proc_status(proc.pid) if proc.poll() is None else {}
        peak_kib = max(sampler.peak_kib, status.get("VmHWM", 0))
        return {"streams": streams, "messages": sent, "kib": kib, "readers": readers,
                "idle_mib": idle_kib / 1024.0, "peak_mib": peak_kib / 1024.0, "killed": sampler.killed,
                "readers_complete": all(r.ids == sorted(set(r.ids)) and len(r.ids) == messages for r in readers_list),
                "reader_counts": [len(r.ids) for r in readers_list], "idle_streams_open_after": open_after,
                "reader_resumes": sum(r.resumed for r in readers_list),
                "send_seconds": send_seconds, "read_seconds": read_seconds}
    finally:
        if sampler is not None:
            sampler.stop()
        if conn is not None:
            conn.close()
        for sock in idle:
            sock.close()
        for reader in readers_list:
            reader.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        log.close()
        if own:
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="event streams that never read")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--kib", type=int, default=60, help="size of each message body")
    parser.add_argument("--readers", type=int, default=4, help="event streams that read everything")
    parser.add_argument("--target-mib", type=float, default=300, help="peak RSS the run must stay under")
    parser.add_argument("--stop-above-mib", type=float, default=2048, help="kill the relay past this RSS")
    parser.add_argument("--seconds", type=float, default=240, help="bound on the whole run")
    args = parser.parse_args()
    result = run(args.streams, args.messages, args.kib, args.readers, args.stop_above_mib, args.seconds)
    print("%d never-reading streams, %d readers, %d x %d KiB sent in %.1f s, all read after %.1f s" % (
        result["streams"], result["readers"], result["messages"], result["kib"], result["send_seconds"],
        result["read_seconds"]))
    print("relay RSS idle %.1f MiB, peak %.1f MiB (target < %.0f MiB)%s" % (
        result["idle_mib"], result["peak_mib"], args.target_mib,
        "; KILLED past %.0f MiB" % args.stop_above_mib if result["killed"] else ""))
    print("every reader got every event: %s %s (resumed %d times); never-reading streams still open: %s" % (
        result["readers_complete"], result["reader_counts"], result["reader_resumes"],
        result["idle_streams_open_after"]))
    ok = not result["killed"] and result["readers_complete"] and result["peak_mib"] < args.target_mib
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
