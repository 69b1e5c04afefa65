#!/usr/bin/env bash
# Starts and stops the real services the tests need, on free loopback ports,
# with all state in one directory:
#   - redis-server (Debian package), no persistence
#   - tansu, a Kafka-protocol broker with SQLite storage (durable)
#   - two PostgreSQL 15 clusters (the SQL shard tests), user `sluice`, trust
#     auth on 127.0.0.1; their data lives under /tmp (the postgres user must
#     be able to reach it when this runs as root). DIR/pgctl N stop|start
#     stops or starts cluster N (the shard-outage test uses it).
#
#   services.sh start DIR   # writes DIR/env (source it) and DIR/*.pid
#   services.sh stop DIR    # stops what `start DIR` started
#
# DIR/ctl stops and starts one service while the others run (the fault
# scenario of `sluice-load faults` uses it):
#   DIR/ctl redis stop|start   # stop saves a snapshot that start loads
#   DIR/ctl kafka stop|start   # tansu's SQLite storage survives a restart
#   DIR/ctl kafka alive        # exit status 0 while tansu runs
#   DIR/ctl pg N stop|start    # the same as DIR/pgctl N
set -euo pipefail

cmd=${1:?usage: services.sh start|stop DIR}
dir=${2:?usage: services.sh start|stop DIR}
TANSU=${TANSU:-$HOME/.cargo/bin/tansu}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PG_CLUSTERS=${PG_CLUSTERS:-2}

# PostgreSQL refuses to run as root: run its tools as `postgres` then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

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
    kafka_port=$(free_port)
    # Redis keeps no snapshot or log while it runs (`--save ''`); `ctl redis
    # stop` saves one on the way down, so a restart keeps the jobs.
    cat >"$dir/ctl" <<CTL
#!/usr/bin/env bash
# ctl redis|kafka stop|start, ctl kafka alive, ctl pg N stop|start (written by services.sh)
set -euo pipefail
wait_for() { for _ in \$(seq 1 300); do if "\$@" >/dev/null 2>&1; then return 0; fi; sleep 0.1; done; echo "ctl: \$1 did not answer" >&2; return 1; }
case "\$1 \${2:-}" in
  "redis start")
    redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no \\
      --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_for redis-cli -p $redis_port ping ;;
  "redis stop")
    redis-cli -p $redis_port shutdown save >/dev/null 2>&1 || true
    while [ -f "$dir/redis.pid" ] && kill -0 "\$(cat "$dir/redis.pid")" 2>/dev/null; do sleep 0.1; done ;;
  "kafka start")
    (cd "$dir" && exec "$TANSU" broker \\
        --listener-url "tcp://127.0.0.1:$kafka_port" \\
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \\
        --storage-engine sqlite://tansu.db >>tansu.log 2>&1) &
    echo \$! >"$dir/tansu.pid"
    wait_for bash -c "exec 3<>/dev/tcp/127.0.0.1/$kafka_port" ;;
  "kafka alive") kill -0 "\$(cat "$dir/tansu.pid")" 2>/dev/null ;;
  "kafka stop")
    pid=\$(cat "$dir/tansu.pid"); kill "\$pid" 2>/dev/null || true
    for _ in \$(seq 1 50); do kill -0 "\$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "\$pid" 2>/dev/null || true ;;
  "pg "*) exec "$dir/pgctl" "\$2" "\$3" ;;
  *) echo "usage: ctl redis|kafka stop|start, ctl pg N stop|start" >&2; exit 2 ;;
esac
CTL
    chmod +x "$dir/ctl"
    "$dir/ctl" redis start
    "$dir/ctl" kafka start

    pg_base=$(mktemp -d /tmp/sluice-pg.XXXXXX)
    echo "$pg_base" >"$dir/pg.base"
    [ "$(id -u)" = 0 ] && chown postgres "$pg_base"
    pg_urls=""
    for i in $(seq 0 $((PG_CLUSTERS - 1))); do
      port=$(free_port)
      as_pg "$PGBIN/initdb" -D "$pg_base/pg$i" -U sluice -A trust -E UTF8 --no-sync >"$pg_base/initdb$i.log" 2>&1
      cat >>"$pg_base/pg$i/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$pg_base'
fsync = off
max_connections = 100
CONF
      as_pg "$PGBIN/pg_ctl" -D "$pg_base/pg$i" -l "$pg_base/pg$i.log" -w -t 30 start >/dev/null
      pg_urls="$pg_urls${pg_urls:+,}postgres://sluice@127.0.0.1:$port"
    done
    cat >"$dir/pgctl" <<CTL
#!/usr/bin/env bash
# pgctl N stop|start: stop (fast) or start PostgreSQL cluster N.
set -euo pipefail
as_pg() { if [ "\$(id -u)" = 0 ]; then runuser -u postgres -- "\$@"; else "\$@"; fi; }
case "\$2" in
  stop) as_pg "$PGBIN/pg_ctl" -D "$pg_base/pg\$1" -m fast -w stop >/dev/null ;;
  start) as_pg "$PGBIN/pg_ctl" -D "$pg_base/pg\$1" -l "$pg_base/pg\$1.log" -w -t 30 start >/dev/null ;;
  *) echo "usage: pgctl N stop|start" >&2; exit 2 ;;
esac
CTL
    chmod +x "$dir/pgctl"

    cat >"$dir/env" <<ENV
export SLUICE_TEST_REDIS=redis://127.0.0.1:$redis_port/0
export SLUICE_TEST_BROKERS=127.0.0.1:$kafka_port
# PostgreSQL clusters (no database in the URL: tests create their own).
export SLUICE_TEST_PG=$pg_urls
export SLUICE_TEST_PGCTL=$dir/pgctl
ENV
    echo "services: redis on $redis_port, tansu (Kafka protocol, SQLite) on $kafka_port, PostgreSQL at $pg_urls, state in $dir"
    ;;
  stop)
    [ -d "$dir" ] || exit 0
    stop_pidfile "$dir/tansu.pid"
    stop_pidfile "$dir/redis.pid"
    if [ -f "$dir/pg.base" ]; then
      pg_base=$(cat "$dir/pg.base")
      for d in "$pg_base"/pg*/; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
      done
      rm -rf "$pg_base" "$dir/pg.base"
    fi
    echo "services: stopped ($dir)"
    ;;
  *)
    echo "usage: services.sh start|stop DIR" >&2
    exit 2
    ;;
esac
