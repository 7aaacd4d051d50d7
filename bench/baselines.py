#!/usr/bin/env python3
"""The bare servers the relay is measured against (issue 10).

    python3 bench/baselines.py get  [--port 0]
    python3 bench/baselines.py post [--port 0] --db-path FILE
    python3 bench/baselines.py sse  [--port 0] --db-path FILE

Each is a stdlib ThreadingHTTPServer (HTTP/1.1 keep-alive, TCP_NODELAY, one
write per response, backlog 1024) and nothing else: no auth, validation,
events or receipts. It prints "listening on http://127.0.0.1:PORT" once it
answers, like the relay, and runs until SIGTERM.

  get   answers every GET with the same small JSON object;
  post  parses each POST body as JSON and inserts it into SQLite (WAL,
        synchronous=NORMAL like the relay, one commit per request);
  sse   `post`, plus GET /api/events holds a chunked text/event-stream and
        every POST is pushed to every open stream as one SSE frame.
"""

import argparse
import http.server
import json
import queue
import signal
import socket
import sqlite3
import sys
import threading

FIXED_JSON = b'{"status":"ok","version":"0.1.0","db":"ok"}'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        pass

    def answer(self, status, body, content_type=b"application/json"):
        self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            status, http.HTTPStatus(status).phrase.encode(), content_type, len(body), body))

    def do_GET(self):
        if self.server.mode == "sse" and self.path.startswith("/api/events"):
            return self.stream()
        self.answer(200, FIXED_JSON)

    def do_POST(self):
        if self.server.mode == "get":
            return self.answer(405, b'{"error":"GET only"}')
        message = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        message["id"] = self.server.insert(message)
        body = json.dumps(message, separators=(",", ":")).encode()
        self.server.publish(b"id: %d\nevent: message.new\ndata: %s\n\n" % (message["id"], body))
        self.answer(201, body)

    def stream(self):
        self.close_connection = True
        frames = self.server.subscribe()
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            while True:
                try:
                    frame = frames.get(timeout=15)
                except queue.Empty:
                    frame = b": keepalive\n\n"
                if frame is None:
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        except OSError:
            pass
        finally:
            self.server.unsubscribe(frames)


class BaselineServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, mode, port, db_path=None):
        super().__init__(("127.0.0.1", port), Handler)
        self.mode = mode
        self.lock = threading.Lock()
        self.streams = set()
        if mode != "get":
            self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                            "sender TEXT NOT NULL, target TEXT NOT NULL, body TEXT NOT NULL, data TEXT NOT NULL)")

    def insert(self, message):
        with self.lock:  # one writer; one transaction per request
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute("INSERT INTO messages (sender, target, body, data) VALUES (?, ?, ?, ?)", (
                message.get("from", ""), message.get("to", ""), message.get("body", ""), json.dumps(message)))
            self.db.execute("COMMIT")
            return cursor.lastrowid

    def subscribe(self):
        frames = queue.SimpleQueue()
        with self.lock:
            self.streams.add(frames)
        return frames

    def unsubscribe(self, frames):
        with self.lock:
            self.streams.discard(frames)

    def publish(self, frame):
        with self.lock:
            streams = list(self.streams)
        for frames in streams:
            frames.put(frame)


def main(argv=None):
    parser = argparse.ArgumentParser(description="A bare baseline server for bench/run.py.")
    parser.add_argument("mode", choices=("get", "post", "sse"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db-path")
    args = parser.parse_args(argv)
    if args.mode != "get" and not args.db_path:
        parser.error("%s needs --db-path" % args.mode)
    server = BaselineServer(args.mode, args.port, args.db_path)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
