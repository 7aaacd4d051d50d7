#!/usr/bin/env python3
"""A stand-in for the `codex` CLI in fast unit tests (tests/test_real_codex.py
drives the real one). `fake_codex.py app-server --listen ws://127.0.0.1:PORT
--ws-auth capability-token --ws-token-file PATH` serves a minimal Codex
app-server over WebSocket, refusing a handshake without `Authorization:
Bearer <token>`, and appends every JSON-RPC message it receives to
$FAKE_CODEX_LOG (one JSON a line, with `conn`: the connection's number). The
shapes follow the real 0.171.0 app-server: `thread/started` and
`thread/status/changed` go to every connection, `turn/started` and
`turn/completed` only to the connections subscribed to the thread (the one
that started it, or resumed it); `thread/resume` of a thread that has had no
turn fails with "no rollout found for thread id"; `thread/turns/list` lists
the newest turn. A turn stays in progress until a `turn/steer` arrives, which
completes it. Pings are answered with pongs.

`fake_codex.py --remote URL --remote-auth-token-env VAR` plays the TUI: it
connects with the token from $VAR, starts a thread, and (with
FAKE_CODEX_TUI_TURN=1) a turn of its own, then waits until stdin closes.
`fake_codex.py --version` prints a version. Standard library only."""

import base64
import hashlib
import json
import os
import socket
import sys
import threading
import time

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_frame(conn, buffer):
    def need(count):
        nonlocal buffer
        while len(buffer) < count:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError
            buffer += chunk
        data, buffer = buffer[:count], buffer[count:]
        return data
    first, second = need(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(need(2), "big")
    elif length == 127:
        length = int.from_bytes(need(8), "big")
    mask = need(4) if second & 0x80 else None
    payload = need(length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload, buffer


def send_text(conn, lock, value):
    data = json.dumps(value).encode()
    header = bytes([0x81]) + (bytes([len(data)]) if len(data) < 126 else bytes([126]) + len(data).to_bytes(2, "big"))
    with lock:
        conn.sendall(header + data)


class Server:
    def __init__(self, log_path, token):
        self.log_path = log_path
        self.token = token
        self.lock = threading.Lock()
        self.clients = {}  # conn number -> (socket, send lock)
        self.subscribers = {}  # thread id -> set of conn numbers
        self.turns = {}  # thread id -> list of {"id", "status"}
        self.count = 0

    def send(self, number, value):
        conn, lock = self.clients[number]
        try:
            send_text(conn, lock, value)
        except OSError:
            pass

    def broadcast(self, value, only=None):
        for number in list(self.clients):
            if only is None or number in only:
                self.send(number, value)

    def status(self, thread_id, active):
        status = {"type": "active", "activeFlags": []} if active else {"type": "idle"}
        self.broadcast({"method": "thread/status/changed", "params": {"threadId": thread_id, "status": status}})

    def start_turn(self, number, request_id, thread_id):
        turns = self.turns[thread_id]
        turn = {"id": "turn_%d" % (sum(len(t) for t in self.turns.values()) + 1), "status": "inProgress",
                "items": []}
        turns.append(turn)
        self.send(number, {"id": request_id, "result": {"turn": dict(turn)}})
        self.status(thread_id, True)
        self.broadcast({"method": "turn/started", "params": {"threadId": thread_id, "turn": dict(turn)}},
                       only=self.subscribers[thread_id])

    def handle(self, number, message):
        method, request_id = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if request_id is None:
            return
        if method == "initialize":
            self.send(number, {"id": request_id, "result": {"userAgent": "fake-codex/0.0"}})
        elif method == "thread/start":
            thread_id = "thr_fake" if "thr_fake" not in self.turns else "thr_fake_%d" % (len(self.turns) + 1)
            self.turns[thread_id], self.subscribers[thread_id] = [], {number}
            self.send(number, {"id": request_id, "result": {"thread": {"id": thread_id}}})
            self.broadcast({"method": "thread/started", "params": {"thread": {"id": thread_id}}})
        elif method == "thread/resume":
            thread_id = params.get("threadId")
            if not self.turns.get(thread_id):
                self.send(number, {"id": request_id, "error": {
                    "code": -32600, "message": "no rollout found for thread id %s" % thread_id}})
                return
            self.subscribers[thread_id].add(number)
            self.send(number, {"id": request_id, "result": {"thread": {"id": thread_id}}})
        elif method == "thread/turns/list":
            turns = self.turns.get(params.get("threadId"))
            if not turns:
                self.send(number, {"id": request_id, "error": {"code": -32600, "message": "not materialized yet"}})
                return
            self.send(number, {"id": request_id, "result": {"data": [dict(turns[-1])], "nextCursor": None}})
        elif method == "turn/start":
            self.start_turn(number, request_id, params["threadId"])
        elif method == "turn/steer":
            thread_id = params["threadId"]
            active = [t for t in self.turns.get(thread_id, []) if t["status"] == "inProgress"]
            if not active or params.get("expectedTurnId") != active[0]["id"]:
                self.send(number, {"id": request_id, "error": {"code": -32600, "message": "no such turn"}})
                return
            active[0]["status"] = "completed"
            self.send(number, {"id": request_id, "result": {"turnId": active[0]["id"]}})
            self.status(thread_id, False)
            self.broadcast({"method": "turn/completed", "params": {"threadId": thread_id, "turn": dict(active[0])}},
                           only=self.subscribers[thread_id])
        else:
            self.send(number, {"id": request_id, "error": {"code": -32601, "message": "unknown"}})

    def serve_client(self, conn):
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        headers = dict((line.split(":", 1)[0].strip().lower(), line.split(":", 1)[1].strip())
                       for line in head.decode().split("\r\n")[1:] if ":" in line)
        if self.token and headers.get("authorization") != "Bearer %s" % self.token:
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 30\r\n\r\nmissing websocket bearer token")
            conn.close()
            return
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest()).decode()
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
        with self.lock:
            self.count += 1
            number = self.count
            self.clients[number] = (conn, threading.Lock())
        try:
            while True:
                try:
                    opcode, payload, buffer = read_frame(conn, buffer)
                except (ConnectionError, OSError):
                    return
                if opcode == 0x8:
                    return
                if opcode == 0x9:
                    with self.clients[number][1]:
                        conn.sendall(bytes([0x8A, len(payload)]) + payload)
                    continue
                if opcode != 0x1:
                    continue
                message = json.loads(payload.decode())
                with self.lock:
                    with open(self.log_path, "a") as log:
                        log.write(json.dumps(dict(message, conn=number)) + "\n")
                    self.handle(number, message)
        finally:
            with self.lock:
                self.clients.pop(number, None)


def exit_with_parent():
    """Never outlive the launcher, even one killed with SIGKILL."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def tui(url, token):
    """Play the Codex TUI attached with --remote: a thread (and maybe a turn) of its own."""
    host, port = url[len("ws://"):].split(":")
    conn = socket.create_connection((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    conn.sendall(("GET / HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n"
                  % (host, port, key, token)).encode())
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += conn.recv(65536)
    buffer = buffer.partition(b"\r\n\r\n")[2]
    lock = threading.Lock()

    def call(request_id, method, params):
        nonlocal buffer
        data = json.dumps({"id": request_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126 else
                                  bytes([0x80 | 126]) + len(data).to_bytes(2, "big"))
        with lock:
            conn.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            opcode, payload, buffer = read_frame(conn, buffer)
            answer = json.loads(payload.decode()) if opcode == 0x1 else {}
            if answer.get("id") == request_id:
                return answer["result"]
    call(1, "initialize", {"clientInfo": {"name": "codex-tui", "version": "0.0"}})
    thread_id = call(2, "thread/start", {})["thread"]["id"]
    if os.environ.get("FAKE_CODEX_TUI_TURN") == "1":
        call(3, "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": "the user's prompt"}]})

    def drain(pending):
        try:
            while True:
                _, _, pending = read_frame(conn, pending)
        except (ConnectionError, OSError):
            pass
    threading.Thread(target=drain, args=(buffer,), daemon=True).start()
    sys.stdin.read()  # the TUI runs until its user leaves
    return 0


def main(argv):
    if argv[:1] == ["--version"]:
        print("codex-cli 0.0.0-fake")
        return 0
    exit_with_parent()
    if argv[:1] == ["--remote"]:
        return tui(argv[1], os.environ[argv[argv.index("--remote-auth-token-env") + 1]])
    if argv[:1] != ["app-server"]:
        print("fake codex: only app-server and --remote are supported here", file=sys.stderr)
        return 2
    url = argv[argv.index("--listen") + 1]
    host, port = url[len("ws://"):].split(":")
    token = None
    if "--ws-token-file" in argv:
        with open(argv[argv.index("--ws-token-file") + 1]) as f:
            token = f.read().strip()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(8)
    state = Server(os.environ["FAKE_CODEX_LOG"], token)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=state.serve_client, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
