#!/usr/bin/env bash
# How much CPU an idle `mlflow server` takes, with MLflow 3's job runner (the default) and
# without it (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, as cluster.yaml starts it):
#
#   bash benchmarks/mlflow_server_idle.sh        # about 2 minutes; prints one line per setting
#
# Each server gets a fresh SQLite store on a free loopback port; once /health answers and 5 s
# more have passed, 30 s of /proc/stat give the cores busy (the machine should be otherwise
# idle). The server and every process it started are stopped by process group.
set -euo pipefail
cd "$(dirname "$0")/.."
MLFLOW=${MLFLOW:-.venv/bin/mlflow}

busy_cores() {  # cores busy over $1 seconds, from /proc/stat
  local a b
  a=$(head -1 /proc/stat); sleep "$1"; b=$(head -1 /proc/stat)
  python3 - "$a" "$b" <<'EOF'
import os, sys
a, b = ([int(x) for x in line.split()[1:]] for line in sys.argv[1:])
total, idle = sum(b) - sum(a), (b[3] + b[4]) - (a[3] + a[4])
print(f"{os.cpu_count() * (1 - idle / total):.3f}")
EOF
}

measure() {  # $1: "default" or an env assignment
  local dir port pid
  dir=$(mktemp -d)
  port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  local assign=()  # no assignment for the default
  [ "$1" = default ] || assign=("$1")
  env "${assign[@]}" setsid "$MLFLOW" server --backend-store-uri "sqlite:///$dir/mlflow.db" \
    --artifacts-destination "$dir/artifacts" --host 127.0.0.1 --port "$port" --workers 1 \
    >"$dir/server.log" 2>&1 &
  pid=$!
  disown "$pid"  # no job-control notice when the group is killed below
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.5
  done
  sleep 5
  local procs; procs=$(pgrep -g "$pid" | wc -l)
  echo "$1: $(busy_cores 30) cores busy while idle, $procs processes"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 20); do pgrep -g "$pid" >/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -rf "$dir"
}

measure default
measure MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
