#!/usr/bin/env python3
"""A stand-in for the `codex` CLI in tests: `fake_codex.py app-server --listen
ws://127.0.0.1:PORT` serves a minimal Codex app-server over WebSocket and
appends every JSON-RPC message it receives to $FAKE_CODEX_LOG (one JSON a
line). `turn/start` answers a turn and notifies turn/started; the turn stays
active until a `turn/steer` arrives, after which turn/completed is sent.
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


def serve_client(conn, log_path):
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buffer += chunk
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    key = [line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
           if line.lower().startswith("sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
    lock = threading.Lock()
    turns = 0
    active = None
    while True:
        try:
            opcode, payload, buffer = read_frame(conn, buffer)
        except (ConnectionError, OSError):
            return
        if opcode == 0x8:
            return
        message = json.loads(payload.decode())
        with open(log_path, "a") as log:
            log.write(json.dumps(message) + "\n")
        method, request_id = message.get("method"), message.get("id")
        if request_id is None:
            continue
        if method == "initialize":
            send_text(conn, lock, {"id": request_id, "result": {"userAgent": "fake-codex/0.0"}})
        elif method in ("thread/start", "thread/resume"):
            thread = {"id": message.get("params", {}).get("threadId", "thr_fake")}
            send_text(conn, lock, {"id": request_id, "result": {"thread": thread}})
            if method == "thread/start":
                send_text(conn, lock, {"method": "thread/started", "params": {"thread": thread}})
        elif method == "turn/start":
            turns += 1
            active = "turn_%d" % turns
            send_text(conn, lock, {"id": request_id, "result": {"turn": {"id": active, "status": "inProgress"}}})
            send_text(conn, lock, {"method": "turn/started", "params": {"turn": {"id": active}}})
        elif method == "turn/steer":
            if message["params"].get("expectedTurnId") != active:
                send_text(conn, lock, {"id": request_id, "error": {"code": -32600, "message": "no such turn"}})
                continue
            send_text(conn, lock, {"id": request_id, "result": {"turnId": active}})
            send_text(conn, lock, {"method": "turn/completed", "params": {"turn": {"id": active}}})
            active = None
        else:
            send_text(conn, lock, {"id": request_id, "error": {"code": -32601, "message": "unknown"}})


def main(argv):
    if argv[:1] == ["--version"]:
        print("codex-cli 0.0.0-fake")
        return 0
    if argv[:1] != ["app-server"]:
        print("fake codex: only app-server is supported here", file=sys.stderr)
        return 2
    url = argv[argv.index("--listen") + 1]
    host, port = url[len("ws://"):].split(":")
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(8)
    log_path = os.environ["FAKE_CODEX_LOG"]
    parent = os.getppid()

    def exit_with_parent():  # never outlive the launcher, even one killed with SIGKILL
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_client, args=(conn, log_path), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
