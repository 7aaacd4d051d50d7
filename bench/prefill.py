"""A relay database filled with realistic history, fast (for bench/run.py).

The schema comes from the relay itself (`agent_relay.Store` runs its
migrations); rows then go in with plain sqlite3 in one transaction, ids in
time order as the relay would have written them over the last 29 days.

Traffic model, the same at every size (only the message count changes):
AGENTS agents on 20 machines with 10 team tags, 5 capabilities and 4
topic channels (a fifth of the agents subscribe to one channel, the rest
to all). Messages: 94% direct to a random agent (read by it: a receipt
with deliveredAt and readAt), 2.5% tag:, 1% cap:, 0.5% machine:, 0.5%
label:, 0.5% channel:, 1% broadcast; 5% of the rest carry a channel; 10%
are replies; 1% of group messages are claimable (and claimed). Each
message has its message.new event row (short data).

Three agents are the benchmark's own: `bench-target` (registered a day
ago, tags team-0 and team-1, capability chat, machine host-00, every
channel) has read everything it can see except its last 50 direct
messages, so `GET /api/messages?for=bench-target&unread=true` answers
exactly 50; its last read happens through the relay's own code (see
settle()); `bench-sender` and `bench-peer` are used for sends.
"""

import json
import os
import random
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import agent_relay  # noqa: E402

AGENTS = 500
UNREAD = 50
DAY_MS = 86400 * 1000
TAGS = ["team-%d" % i for i in range(10)]
CAPS = ["chat", "review", "ops", "build", "test"]
MACHINES = ["host-%02d" % i for i in range(20)]
CHANNELS = ["alerts", "deploys", "general", "random"]
TARGET_MIX = (("agent", 0.94), ("tag", 0.025), ("cap", 0.01), ("machine", 0.005), ("label", 0.005),
              ("channel", 0.005), ("broadcast", 0.01))
WORDS = ("migration review deploy flaky test fixed auth token cache index query build lint "
         "merge branch rollback alert latency patch schema retry timeout").split()


def _agents(rng, now):
    agents = []
    for i in range(AGENTS):
        agents.append({
            "id": "agent-%03d" % i, "label": "worker %d" % i, "machine": MACHINES[i % len(MACHINES)],
            "project": "proj-%d" % (i % 7), "provider": ("claude", "codex", "script")[i % 3],
            "capabilities": rng.sample(CAPS, 1 + i % 2), "tags": rng.sample(TAGS, 1 + i % 2),
            "channels": [CHANNELS[i % len(CHANNELS)]] if i % 5 == 0 else [],
            "registered": now - rng.randint(3600 * 1000, 30 * DAY_MS)})
    agents.append({"id": "bench-target", "label": "bench target", "machine": "host-00", "project": "bench",
                   "provider": "claude", "capabilities": ["chat"], "tags": ["team-0", "team-1"], "channels": [],
                   "registered": now - DAY_MS})
    for name in ("bench-sender", "bench-peer"):
        agents.append({"id": name, "label": name, "machine": "host-19", "project": "bench", "provider": "script",
                       "capabilities": [], "tags": [], "channels": [], "registered": now - DAY_MS})
    return agents


def _agent_row(a, now):
    return (a["id"], a["label"], a["machine"], a["project"], a["provider"], json.dumps(a["capabilities"]),
            json.dumps(a["tags"]), json.dumps(a["channels"]), "open", "online", "{}", agent_relay.__version__,
            a["registered"], now)


def _audience(a):
    return agent_relay.Audience({"id": a["id"], "registeredAt": agent_relay.iso(a["registered"]),
                                 "_registered_ms": a["registered"], "channels": a["channels"], "tags": a["tags"],
                                 "capabilities": a["capabilities"], "label": a["label"], "machine": a["machine"]})


def _group_members(agents):
    """(kind, key) -> ids of agents in that group (recipients, approximately)."""
    members = {}
    for a in agents:
        for key in _audience(a).group_keys:
            members.setdefault(key, []).append(a["id"])
    for channel in CHANNELS:
        members[("channel", channel)] = [a["id"] for a in agents if not a["channels"] or channel in a["channels"]]
    return members


def _pick_kind(rng):
    roll = rng.random()
    for kind, share in TARGET_MIX:
        if roll < share:
            return kind
        roll -= share
    return "agent"


def _target(rng, kind, agents):
    if kind == "agent":
        return rng.choice(agents)["id"], "agent", None
    if kind == "broadcast":
        return "broadcast", "broadcast", ""
    key = rng.choice({"tag": TAGS, "cap": CAPS, "machine": MACHINES, "channel": CHANNELS,
                      "label": ["worker %d" % i for i in range(AGENTS)]}[kind])
    return "%s:%s" % (kind, key), kind, key.lower()


def prefill(path, messages, seed=10):
    """Create `path` with `messages` messages; returns seconds taken."""
    began = time.monotonic()
    agent_relay.Store(path).close()
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    agents = _agents(rng, now)
    target = agents[AGENTS]
    bench_audience = _audience(target)
    members = _group_members(agents)
    first_ms, last_ms = now - 29 * DAY_MS, now - 60 * 1000
    step = (last_ms - first_ms) / max(1, messages)
    background = messages - UNREAD
    message_rows, event_rows, receipt_rows = [], [], []
    for i in range(messages):
        message_id = i + 1
        created = int(first_ms + i * step)
        sender = rng.choice(agents)["id"]
        if i >= background - 1:  # the target's newest direct messages: one it reads in settle(), then 50 unread
            kind, to, key = "agent", target["id"], target["id"]
        else:
            kind = _pick_kind(rng)
            to, kind, key = _target(rng, kind, agents)
            if kind == "agent":
                key = to
        channel = key if kind == "channel" else (rng.choice(CHANNELS) if rng.random() < 0.05 else None)
        claimable = kind != "agent" and rng.random() < 0.01
        claimed_by = rng.choice(agents)["id"] if claimable else None
        reply_to = thread_id = None
        if i > 10 and rng.random() < 0.1:
            reply_to = rng.randint(max(1, message_id - 500), message_id - 1)
            thread_id = reply_to
        recipients = [key] if kind == "agent" else members.get((kind, key), [])
        body = " ".join(rng.choice(WORDS) for _ in range(16))
        message_rows.append((message_id, sender, to, kind, key, channel, channel.lower() if channel else None,
                             None, body, "message", int(claimable), claimed_by, created if claimable else None,
                             reply_to, thread_id or message_id, "{}", json.dumps(recipients), created))
        event_rows.append((message_id, "message.new", '{"id":%d}' % message_id, created))
        if kind == "agent":
            if i < background - 1:
                receipt_rows.append((message_id, key, created + 1000, created + 60000))
        elif key is not None and bench_audience.sees(sender, to, channel, claimable and claimed_by is None,
                                                     agent_relay.iso(created)):
            receipt_rows.append((message_id, target["id"], created + 1000, created + 60000))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.executemany("INSERT OR REPLACE INTO agents (%s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                     % agent_relay.AGENT_COLUMNS, [_agent_row(a, now) for a in agents])
    conn.executemany("INSERT INTO messages (id, sender, target, target_kind, target_key, channel, channel_key, "
                     "subject, body, kind, claimable, claimed_by, claimed_at, reply_to, thread_id, meta, "
                     "recipients, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", message_rows)
    conn.executemany("INSERT INTO events (id, type, data, created_at) VALUES (?,?,?,?)", event_rows)
    conn.executemany("INSERT OR IGNORE INTO receipts (message_id, agent_id, delivered_at, read_at) "
                     "VALUES (?,?,?,?)", receipt_rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    settle(path, background)
    return time.monotonic() - began


def settle(path, message_id):
    """bench-target marks its last read message read through the relay's own
    code (POST /api/messages/read, in-process), as a live agent would have:
    whatever the relay derives from reads (a read mark) is then in place."""
    relay = agent_relay.Relay(agent_relay.Settings(db_path=path))
    try:
        route, params = agent_relay.ROUTER.resolve("POST", "/api/messages/read")
        body = json.dumps({"agentId": "bench-target", "ids": [message_id]}).encode()
        request = agent_relay.Request("POST", "/api/messages/read", "", {"Content-Type": "application/json"}, body,
                                      agent_relay.ANONYMOUS, params)
        status, answer = agent_relay.execute(relay, route, request)[:2]
        assert status == 200 and answer == {"marked": 1}, (status, answer)
    finally:
        relay.store.close()


if __name__ == "__main__":
    print("%.1f s" % prefill(sys.argv[1], int(sys.argv[2])))
