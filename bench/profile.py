#!/usr/bin/env python3
"""Profile the relay process under one of bench/run.py's loads, with py-spy.

    pip install py-spy          # an investigation tool, not a dependency
    python3 bench/profile.py send|poll|health|fanout|scaling [--seconds 6] [--gil] [--native] [--out FILE]

Starts `agent_relay.py` in its own process exactly as bench/run.py does,
drives the load, samples the relay with `py-spy record --format raw`
(collapsed stacks) and prints the functions with the most samples,
inclusive and self. `--out` keeps the collapsed stacks (flamegraph.pl or
speedscope read them). `--gil` samples only the thread holding the GIL:
where the interpreter's one core goes.
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
import prefill  # noqa: E402
import run  # noqa: E402


def drive(kind, server, seconds, tmp):
    if kind == "send":
        loadgen.load(server.port, "POST", "/api/messages", dict(run.SEND_BODY, to="bench-peer"), 16, seconds)
    elif kind == "poll":
        loadgen.load(server.port, "GET", run.POLL_PATH, None, 16, seconds)
    elif kind == "health":  # the fixed cost of any request
        loadgen.load(server.port, "GET", "/api/health", None, 16, seconds)
    elif kind == "scaling":
        loadgen.latency(server.port, "GET", run.POLL_PATH, seconds=seconds, max_requests=10 ** 6)
    elif kind == "fanout":
        subscribers = loadgen.Subscribers(server.port, run.sse_paths("sub", 100, True))
        try:
            loadgen.send_marked(server.port, 200.0, int(200 * seconds), "bench-sender", "broadcast")
            subscribers.collect(int(200 * seconds), wait_seconds=10)
        finally:
            subscribers.close()


def summarize(raw_path, top):
    inclusive, own = collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            total += count
            frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                      for frame in stack.split(";") if frame]
            for frame in set(frames):
                inclusive[frame] += count
            own[frames[-1]] += count
    print("%d samples" % total)
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print("\n-- top %d by %s samples" % (top, title))
        for frame, count in counter.most_common(top):
            print("%5.1f%%  %s" % (100.0 * count / max(1, total), frame))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("send", "poll", "health", "fanout", "scaling"))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--messages", type=int, default=1000000, help="stored messages for `scaling`")
    parser.add_argument("--gil", action="store_true")
    parser.add_argument("--native", action="store_true", help="include C frames (SQLite, locks, syscalls)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not shutil.which("py-spy"):
        sys.exit("needs py-spy: pip install py-spy")
    tmp = tempfile.mkdtemp(prefix="relay-profile-")
    try:
        db = os.path.join(tmp, "relay.db")
        if args.kind == "scaling":
            prefill.prefill(db, args.messages)
        server = run.relay_server(db)
        try:
            if args.kind in ("send", "poll"):
                run.prepare_relay(server.port)
            elif args.kind == "fanout":
                run.register(server.port, "bench-sender")
                run.register_many(server.port, ["sub-%d" % i for i in range(100)])
            out = args.out or os.path.join(tmp, "stacks.txt")
            spy = ["py-spy", "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw",
                   "--duration", str(int(args.seconds)), "--output", out]
            spy.append("--native" if args.native else "--nonblocking")  # native frames need the process paused
            if args.gil:
                spy.append("--gil")
            sampler = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            load = threading.Thread(target=drive, args=(args.kind, server, args.seconds, tmp))
            load.start()
            load.join()
            sampler.wait(timeout=60)
        finally:
            server.stop()
        summarize(out, args.top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
