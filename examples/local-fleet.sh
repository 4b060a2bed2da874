#!/usr/bin/env bash
# A development fleet on this host: an embedded etcd and N workers with the demo handler.
# Ctrl-C (or SIGTERM) stops the workers gracefully, then etcd. Until `fleet up` exists
# (issue #3) this is the one-command way to watch a fleet rebalance.
#   usage: examples/local-fleet.sh [WORKERS] [SEGMENTS]
set -u
workers=${1:-3}
segments=${2:-12}
port=${FLEET_ETCD_PORT:-2379}
endpoint="http://127.0.0.1:${port}"

fleet etcd --port "$port" &
etcd_pid=$!
for _ in $(seq 100); do
    curl -fs "${endpoint}/health" >/dev/null 2>&1 && break
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "${endpoint}/health" >/dev/null 2>&1 && break
    sleep 0.1
done

pids=()
for i in $(seq 0 $((workers - 1))); do
    fleet worker --etcd "$endpoint" --id "$(hostname)-$i" --segments "$segments" &
    pids+=($!)
done

stop() {
    trap - INT TERM
    kill -TERM "${pids[@]}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
    kill -TERM "$etcd_pid" 2>/dev/null
    wait "$etcd_pid" 2>/dev/null
    exit 0
}
trap stop INT TERM
sleep 3
fleet status --etcd "$endpoint"
wait
