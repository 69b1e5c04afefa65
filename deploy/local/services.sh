#!/usr/bin/env bash
# Starts and stops the real services the tests need, on free loopback ports,
# with all state in one directory:
#   - redis-server (Debian package), no persistence
#   - tansu, a Kafka-protocol broker with SQLite storage (durable)
#
#   services.sh start DIR   # writes DIR/env (source it) and DIR/*.pid
#   services.sh stop DIR    # stops what `start DIR` started
set -euo pipefail

cmd=${1:?usage: services.sh start|stop DIR}
dir=${2:?usage: services.sh start|stop DIR}
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "services: $what did not come up within ${secs}s" >&2
  return 1
}

stop_pidfile() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_for redis 10 redis-cli -p "$redis_port" ping

    kafka_port=$(free_port)
    (cd "$dir" && exec "$TANSU" broker \
        --listener-url "tcp://127.0.0.1:$kafka_port" \
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
        --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
    echo $! >"$dir/tansu.pid"
    wait_for tansu 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$kafka_port"

    cat >"$dir/env" <<ENV
export SLUICE_TEST_REDIS=redis://127.0.0.1:$redis_port/0
export SLUICE_TEST_BROKERS=127.0.0.1:$kafka_port
ENV
    echo "services: redis on $redis_port, tansu (Kafka protocol, SQLite) on $kafka_port, state in $dir"
    ;;
  stop)
    [ -d "$dir" ] || exit 0
    stop_pidfile "$dir/tansu.pid"
    stop_pidfile "$dir/redis.pid"
    echo "services: stopped ($dir)"
    ;;
  *)
    echo "usage: services.sh start|stop DIR" >&2
    exit 2
    ;;
esac
