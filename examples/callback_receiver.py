#!/usr/bin/env python3
"""A tiny callback receiver for Agent Relay integrations (standard library only).

The relay POSTs every lifecycle event of an integration's tasks to its
`callbackUrl`, signed the Standard Webhooks way. This server checks each
signature with the shared secret, prints one line per event and answers
204; a request with a bad or missing signature, or a timestamp more than
five minutes off, gets 401 (and the relay retries it later).

    python3 examples/callback_receiver.py --port 5999 --secret whsec_...

The secret may also come from AGENT_RELAY_CALLBACK_SECRET. It must be the
integration's `callbackSecret`: `whsec_<base64>` is used as its decoded
bytes, any other string as its UTF-8 bytes.
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import http.server
import json
import os
import sys
import time

TOLERANCE_SECONDS = 300  # Standard Webhooks: refuse replays of old deliveries


def secret_key(secret):
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):], validate=True)
    return secret.encode("utf-8")


def verify(key, headers, body):
    """None when the delivery is authentic, else why not."""
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (webhook_id and timestamp and signatures):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        age = abs(time.time() - int(timestamp))
    except ValueError:
        return "webhook-timestamp is not a number"
    if age > TOLERANCE_SECONDS:
        return "webhook-timestamp is %d s off" % age
    signed = ("%s.%s." % (webhook_id, timestamp)).encode("utf-8") + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
    # The header may carry several space-separated signatures (secret rotation).
    if any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        return None
    return "signature does not match"


def make_handler(key):
    class CallbackHandler(http.server.BaseHTTPRequestHandler):
        server_version = "callback-receiver"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            problem = verify(key, self.headers, body)
            if problem:
                print("REJECTED %s: %s" % (self.headers.get("webhook-id"), problem), flush=True)
                return self.answer(401)
            event = json.loads(body.decode("utf-8"))
            task = event["task"]
            who = " by %s" % task["claimedBy"] if task.get("claimedBy") else ""
            print("[%s] task %s %s%s: %s (x%d, %s)" % (
                self.headers.get("X-Agent-Relay-Event"), task["id"], task["status"], who, task["title"],
                task["occurrenceCount"], self.headers["webhook-id"]), flush=True)
            self.answer(204)

        def answer(self, status):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):
            pass  # one line per event is printed above

    return CallbackHandler


def main(argv=None):
    parser = argparse.ArgumentParser(description="Receive and verify Agent Relay task callbacks.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5999, help="port to listen on (default 5999)")
    parser.add_argument("--secret", default=os.environ.get("AGENT_RELAY_CALLBACK_SECRET"),
                        help="the integration's callbackSecret (env AGENT_RELAY_CALLBACK_SECRET)")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("give --secret (the integration's callbackSecret)")
    try:
        key = secret_key(args.secret)
    except binascii.Error:
        parser.error("a whsec_ secret must be base64 after whsec_")
    server = http.server.ThreadingHTTPServer((args.host, args.port), make_handler(key))
    print("callback receiver listening on http://%s:%d/" % (args.host, server.server_address[1]), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
