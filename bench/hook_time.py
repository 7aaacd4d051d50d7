#!/usr/bin/env python3
"""How long a Claude Code hook takes, beside `python3 -c pass` (issue 22).

    python3 bench/hook_time.py [--rounds 20] [--relay PATH]

Claude Code runs a hook on every prompt (UserPromptSubmit), every tool call
(PreToolUse) and every stop, through a shell, and waits for it. This starts
a real relay on a free loopback port with a temporary database, registers a
session with the real SessionStart hook, then times, in interleaved rounds:

  baseline     sh -c 'python3 -c pass'           (the floor: an interpreter)
  bare         sh -c 'python3 -S -c pass'        (the same without site-packages,
               whose .pth files some installs fill; the hooks run with -S)
  script form  sh -c 'python3 agent_relay.py hook EVENT'   (compiles the file)
  module form  the command hooks/hooks.json gives Claude Code (python3 -S,
               imports agent_relay, so Python reuses its __pycache__ .pyc)

for the user-prompt-submit and pre-tool-use hooks, and prints the median
wall time of each in ms and its ratio to the baseline (target: the module
form under 2x). PYTHONDONTWRITEBYTECODE is removed from the hooks'
environment, as it is in Claude Code's: with it set Python writes no
bytecode cache and the module form compiles like the script form.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = ("user-prompt-submit", "pre-tool-use")


def hook_command(root, event):
    with open(os.path.join(root, "hooks", "hooks.json"), encoding="utf-8") as f:
        hooks = json.load(f)["hooks"]
    for groups in hooks.values():
        for group in groups:
            for hook in group["hooks"]:
                if hook["command"].endswith(" hook " + event):
                    return hook["command"]
    raise SystemExit("hooks/hooks.json has no %s hook" % event)


def timed(command, env, stdin_text):
    started = time.perf_counter()
    done = subprocess.run(["/bin/sh", "-c", command], input=stdin_text, env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise SystemExit("%s failed: %s" % (command, done.stderr))
    return elapsed


def start_relay(script, folder):
    proc = subprocess.Popen([sys.executable, script, "--port", "0", "--db-path", os.path.join(folder, "relay.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder)
    line = proc.stdout.readline()
    if " listening on " not in line:
        proc.kill()
        raise SystemExit("the relay did not start: %s%s" % (line, proc.stderr.read()))
    return proc, line.split(" listening on ")[1].split()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--relay", default=os.path.join(ROOT, "agent_relay.py"), help="the agent_relay.py to time")
    args = parser.parse_args(argv)
    script = os.path.abspath(args.relay)
    root = os.path.dirname(script)
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_relay(script, folder)
        try:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AGENT_RELAY_", "CLAUDE_")) and k != "PYTHONDONTWRITEBYTECODE"}
            env.update({"AGENT_RELAY_URL": url, "XDG_CONFIG_HOME": os.path.join(folder, "config"),
                        "CLAUDE_PLUGIN_ROOT": root, "CLAUDE_ENV_FILE": os.path.join(folder, "claude.env")})
            session = {"session_id": "bench-1", "cwd": folder, "transcript_path": os.path.join(folder, "t.jsonl")}
            payloads = {"session-start": dict(session, hook_event_name="SessionStart", source="startup"),
                        "user-prompt-submit": dict(session, hook_event_name="UserPromptSubmit", prompt="hi"),
                        "pre-tool-use": dict(session, hook_event_name="PreToolUse", tool_name="Read",
                                             tool_input={"file_path": "README.md"})}
            timed(hook_command(root, "session-start"), env, json.dumps(payloads["session-start"]))
            forms = {"baseline": lambda event: "python3 -c pass",
                     "bare": lambda event: "python3 -S -c pass",
                     "script": lambda event: 'python3 "%s" hook %s' % (script, event),
                     "module": lambda event: hook_command(root, event)}
            times = {(event, form): [] for event in EVENTS for form in forms}
            for event in EVENTS:  # once untimed: writes the bytecode cache, warms the disk cache
                for command in forms.values():
                    timed(command(event), env, json.dumps(payloads[event]))
            for _ in range(args.rounds):
                for event in EVENTS:
                    for form, command in forms.items():
                        times[(event, form)].append(timed(command(event), env, json.dumps(payloads[event])))
        finally:
            proc.terminate()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
    print("| hook | python3 -c pass | python3 -S -c pass | script form | module form | module / pass | script / pass |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for event in EVENTS:
        base, bare, script_ms, module_ms = (statistics.median(times[(event, form)]) for form in forms)
        print("| %s | %.0f ms | %.0f ms | %.0f ms | %.0f ms | %.2fx | %.2fx |" % (
            event, base, bare, script_ms, module_ms, module_ms / base, script_ms / base))
    print("(medians of %d interleaved rounds; target: module form under 2x python3 -c pass)" % args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
