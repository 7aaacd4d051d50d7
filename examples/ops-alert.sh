#!/usr/bin/env bash
# An alarm's life on Agent Relay, with curl: a monitor posts an alarm, the
# same alarm again (deduped), an agent claims it and reports progress, and
# the monitor resolves it when the alarm clears. See examples/README.md.
#
#   AGENT_RELAY_URL       the relay (default http://127.0.0.1:4850)
#   OPS_TOKEN             the monitor's integration token (needs tasks:create;
#                         tasks:read to show the history at the end)
#   AGENT_RELAY_TOKEN     the relay's token for the agent to register with (the
#                         admin or the join token), if the relay has one; the
#                         agent then acts with the agent token it is given
#   OPS_AGENT             the agent's id (default ops-bot)
#
# Needs curl and python3 (to read fields out of the JSON answers).
set -euo pipefail

RELAY="${AGENT_RELAY_URL:-http://127.0.0.1:4850}"
RELAY="${RELAY%/}"
: "${OPS_TOKEN:?set OPS_TOKEN to the integration token of the ops-monitor integration}"
AGENT="${OPS_AGENT:-ops-bot}"
KEY="prod-api:5xx-rate"

# call WHO METHOD PATH [JSON]: WHO is "monitor" (the integration token) or
# "agent" (its agent token once registered, else AGENT_RELAY_TOKEN, or no
# token on a local relay without one).
# Prints the answer; fails loudly on an HTTP error.
call() {
  local who="$1" method="$2" path="$3" body="${4:-}" token=""
  if [ "$who" = monitor ]; then token="$OPS_TOKEN"; else token="${AGENT_TOKEN:-${AGENT_RELAY_TOKEN:-}}"; fi
  local args=(--silent --show-error --request "$method" --write-out '\n%{http_code}')
  [ -n "$token" ] && args+=(--header "Authorization: Bearer $token")
  [ -n "$body" ] && args+=(--header "Content-Type: application/json" --data "$body")
  local answer status
  answer="$(curl "${args[@]}" "$RELAY$path")"
  status="${answer##*$'\n'}"
  answer="${answer%$'\n'*}"
  if [ "$status" -ge 400 ]; then
    echo "$method $path -> HTTP $status: $answer" >&2
    exit 1
  fi
  printf '%s\n' "$answer"
}

# field JSON PATH: a value out of a JSON answer, e.g. field "$answer" task.id
field() {
  python3 -c 'import functools, json, sys
print(functools.reduce(lambda value, key: value[key], sys.argv[2].split("."), json.loads(sys.argv[1])))' "$1" "$2"
}

echo "== the agent registers: it can take ops work"
answer="$(call agent POST /api/agents "{\"id\": \"$AGENT\", \"capabilities\": [\"ops\"], \"label\": \"ops bot\"}")"
# The first registration answers the agent's own token, once: it acts with it from here on.
AGENT_TOKEN="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("agentToken") or "")' "$answer")"

alarm='{"type": "alarm", "severity": "critical", "dedupeKey": "'"$KEY"'",
        "title": "prod-api 5xx rate high", "body": "5xx at 12% for 5 minutes on prod-api",
        "meta": {"dashboard": "https://grafana.example/d/prod-api"}}'

echo "== the monitor posts the alarm"
answer="$(call monitor POST /api/integrations/events "$alarm")"
task_id="$(field "$answer" task.id)"
echo "   $(field "$answer" action): task $task_id for $(field "$answer" task.target)"

echo "== the alarm fires again: the same task, no new message"
answer="$(call monitor POST /api/integrations/events "$alarm")"
echo "   $(field "$answer" action): occurrenceCount $(field "$answer" task.occurrenceCount)"

echo "== the agent sees it in its inbox"
inbox="$(call agent GET "/api/messages?for=$AGENT&unread=true")"
python3 -c '
import json, sys
for m in json.loads(sys.argv[1])["messages"]:
    if m["kind"] == "task":
        print("   [msg:%d] task %d from %s: %s" % (m["id"], m["taskId"], m["from"], m["subject"]))
' "$inbox"

echo "== the agent claims it (a 5 minute lease)"
answer="$(call agent POST "/api/tasks/$task_id/claim" "{\"agentId\": \"$AGENT\", \"leaseSeconds\": 300}")"
claim_token="$(field "$answer" claimToken)"
echo "   claimed by $(field "$answer" claimedBy) until $(field "$answer" leaseExpiresAt)"

echo "== the agent reports progress (each update renews the lease)"
answer="$(call agent PATCH "/api/tasks/$task_id/status" "{\"claimToken\": \"$claim_token\", \"status\": \"in_progress\",
  \"progress\": {\"step\": \"rolling back deploy 4512\"}, \"note\": \"bad deploy at 14:02\"}")"
echo "   $(field "$answer" status): $(field "$answer" progress.step)"

echo "== the alarm clears: the monitor resolves it"
answer="$(call monitor POST /api/integrations/events "{\"type\": \"alarm\", \"title\": \"prod-api 5xx rate high\",
  \"dedupeKey\": \"$KEY\", \"status\": \"resolved\"}")"
echo "   $(field "$answer" action): task $task_id is $(field "$answer" task.status)"

echo "== the task's history"
history="$(call monitor GET "/api/tasks/$task_id/events")"
python3 -c '
import json, sys
for e in json.loads(sys.argv[1])["events"]:
    print("   %s %-10s by %s" % (e["createdAt"], e["type"], e["actor"]))
' "$history"
