"""A stand-in Anthropic Messages API on loopback, for driving the real
Claude Code CLI with no network (`ANTHROPIC_BASE_URL` points here).

It answers `POST /v1/messages` as the real API does when asked to stream
(Server-Sent Events: message_start, content_block_*, message_delta,
message_stop) or not, records every request body, and plays a script: a
prompt containing a `RUN: <command>` line or a ```sh block (as the skills
have) gets one Bash tool call running that command; everything else gets a
short text answer."""

import http.server
import json
import re
import threading

RUN = re.compile(r"RUN: (.+)|```sh\n(.+?)\n```")


def _text_of(content):
    if isinstance(content, str):
        return content
    return "\n".join(block.get("text", "") for block in content or [] if isinstance(block, dict))


def _has_tool_result(messages):
    return any(isinstance(m.get("content"), list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in m["content"]) for m in messages)


class StandInAnthropic(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests = []  # (path, body) of every request
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name="stand-in-anthropic", daemon=True)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.shutdown()
        self.server_close()
        self.thread.join(5)

    def seen(self):
        """Every /v1/messages request body so far, as text (to search)."""
        with self.lock:
            return [json.dumps(body) for path, body in self.requests if path.startswith("/v1/messages")]

    def answer(self, body):
        """The content blocks and stop reason for one request."""
        messages = body.get("messages") or []
        match = RUN.search("\n".join(_text_of(m.get("content")) for m in messages if m.get("role") == "user"))
        if match and body.get("tools") and not _has_tool_result(messages):
            command = (match.group(1) or match.group(2)).strip()
            call = {"type": "tool_use", "id": "toolu_standin_%d" % len(self.requests), "name": "Bash",
                    "input": {"command": command, "description": "Run the requested command"}}
            return [call], "tool_use"
        return [{"type": "text", "text": "Done."}], "end_turn"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def do_GET(self):
        self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "not here"}})

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.requests.append((path, body))
        if path == "/v1/messages/count_tokens":
            return self._json(200, {"input_tokens": 100})
        if path != "/v1/messages":
            return self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})
        blocks, stop = self.server.answer(body)
        model = body.get("model", "claude-stand-in")
        usage = {"input_tokens": 100, "output_tokens": 10, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        if not body.get("stream"):
            return self._json(200, {"id": "msg_standin", "type": "message", "role": "assistant", "model": model,
                                    "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage})
        events = [("message_start", {"type": "message_start", "message": {
            "id": "msg_standin", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})]
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": {"type": "text", "text": ""}}))
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": dict(block, input={})}))
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                            "stop_sequence": None},
                                         "usage": {"output_tokens": 10}}))
        events.append(("message_stop", {"type": "message_stop"}))
        payload = "".join("event: %s\ndata: %s\n\n" % (name, json.dumps(data)) for name, data in events).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", "req_standin")
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, status, value):
        raw = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
