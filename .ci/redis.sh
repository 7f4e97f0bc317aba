# shellcheck shell=bash
# Start a throwaway Redis for the tests that need a Celery broker (clinical_ml_tests/e2e/test_celery.py):
# Debian's redis-server (installed by .ci/run when absent and when we may), listening on 127.0.0.1 only, on a
# free port, no persistence, its files in a temporary folder. Exports CLINICAL_ML_REDIS_URL
# (redis://127.0.0.1:<port>); the test uses database 0 as the Celery broker and database 1 as its result backend.
#
#   source .ci/redis.sh             # in CI (.ci/run does this); the server stops when that shell exits
#   source .ci/redis.sh && source .ci/postgres.sh && .venv/bin/pytest clinical_ml_tests/e2e/test_celery.py
#
# Sourced, never executed: it exports into the caller's shell. It never fails the caller: when Redis cannot be
# started it says why and leaves the variable unset, and the test skips with that reason.

clinical_ml_redis_start() {
    if [[ -n "${CLINICAL_ML_REDIS_URL:-}" ]]; then
        echo "redis: using CLINICAL_ML_REDIS_URL from the environment"
        return 0
    fi
    local server
    server="$(command -v redis-server || true)"
    if [[ -z "$server" ]]; then
        echo "redis: no redis-server (Debian package redis-server); the Celery test will skip"
        return 0
    fi
    local dir port
    dir="$(mktemp -d "${TMPDIR:-/tmp}/clinical_ml_redis.XXXXXX")"
    chmod 700 "$dir"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    # Loopback only, no snapshots or append-only file, its own folder for the pid file and log.
    if ! "$server" --bind 127.0.0.1 --port "$port" --protected-mode yes --save "" --appendonly no \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --daemonize yes >/dev/null 2>&1; then
        echo "redis: redis-server did not start (see $dir/redis.log); the Celery test will skip"
        return 0
    fi
    local i
    for i in $(seq 50); do
        [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]] && break
        sleep 0.1
    done
    if [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" != PONG ]]; then
        echo "redis: redis-server does not answer on 127.0.0.1:$port (see $dir/redis.log); the Celery test will skip"
        [[ -s "$dir/redis.pid" ]] && kill "$(cat "$dir/redis.pid")" 2>/dev/null
        return 0
    fi
    export CLINICAL_ML_REDIS_URL="redis://127.0.0.1:$port"
    CLINICAL_ML_REDIS_DIR="$dir"
    echo "redis: $("$server" --version | awk '{print $3}') on 127.0.0.1:$port"
}

clinical_ml_redis_stop() {
    if [[ -n "${CLINICAL_ML_REDIS_DIR:-}" ]]; then
        if [[ -s "$CLINICAL_ML_REDIS_DIR/redis.pid" ]]; then
            kill "$(cat "$CLINICAL_ML_REDIS_DIR/redis.pid")" 2>/dev/null || true
        fi
        rm -rf "$CLINICAL_ML_REDIS_DIR"
        unset CLINICAL_ML_REDIS_DIR CLINICAL_ML_REDIS_URL
    fi
}

clinical_ml_redis_start
# Stop the server when the sourcing shell exits, keeping any EXIT trap it already had.
trap "clinical_ml_redis_stop; $(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")" EXIT
