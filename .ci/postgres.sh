# shellcheck shell=bash
# Start a throwaway PostgreSQL for the tests that need one (clinical_ml_tests/e2e/test_postgres_instance.py):
# Debian's server packages (installed when absent and when we may), a fresh cluster in a temporary folder,
# listening on 127.0.0.1 only, password authentication, one database. Exports what dagster_postgres.yaml
# reads: DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_USERNAME, DAGSTER_PG_PASSWORD, DAGSTER_PG_DB.
#
#   source .ci/postgres.sh          # in CI (.ci/run does this); the cluster stops when that shell exits
#   source .ci/postgres.sh && make test
#
# Sourced, never executed: it exports into the caller's shell. It never fails the caller: when PostgreSQL
# cannot be started it says why and leaves the variables unset, and the test skips with that reason.

clinical_ml_pg_start() {
    if [[ -n "${DAGSTER_PG_HOST:-}" ]]; then
        echo "postgres: using DAGSTER_PG_HOST=${DAGSTER_PG_HOST} from the environment"
        return 0
    fi
    local bindir
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -z "$bindir" ]]; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            echo "postgres: installing Debian's postgresql"
            (apt-get install -y -q postgresql >/dev/null 2>&1 ||
                { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; }) ||
                { echo "postgres: apt-get install postgresql failed; PostgreSQL tests will skip"; return 0; }
            bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
        else
            echo "postgres: no PostgreSQL server binaries and no root to install them; PostgreSQL tests will skip"
            return 0
        fi
    fi
    # The server refuses to run as root: run it as the Debian package's `postgres` user when we are root.
    local run_as=()
    if [[ "$(id -u)" == 0 ]]; then
        if ! id postgres >/dev/null 2>&1; then
            echo "postgres: running as root and no 'postgres' user; PostgreSQL tests will skip"
            return 0
        fi
        run_as=(runuser -u postgres --)
    fi
    local dir port password
    dir="$(mktemp -d "${TMPDIR:-/tmp}/clinical_ml_pg.XXXXXX")"
    chmod 700 "$dir"
    [[ ${#run_as[@]} -gt 0 ]] && chown postgres: "$dir"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    printf '%s\n' "$password" >"$dir/.pwfile"
    [[ ${#run_as[@]} -gt 0 ]] && chown postgres: "$dir/.pwfile"
    if ! "${run_as[@]}" "$bindir/initdb" -D "$dir/data" -U clinical_ml --pwfile="$dir/.pwfile" \
        --auth-host=scram-sha-256 --auth-local=peer -E UTF8 >"$dir/initdb.log" 2>&1; then
        echo "postgres: initdb failed (see $dir/initdb.log); PostgreSQL tests will skip"
        return 0
    fi
    rm -f "$dir/.pwfile"
    # Loopback only, socket in the cluster's folder; enough connections for concurrent runs and their steps.
    if ! "${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start \
        >/dev/null; then
        echo "postgres: the server did not start (see $dir/server.log); PostgreSQL tests will skip"
        return 0
    fi
    if ! PGPASSWORD="$password" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U clinical_ml clinical_ml_test; then
        echo "postgres: createdb failed; PostgreSQL tests will skip"
        "${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1
        return 0
    fi
    export DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_PORT="$port" DAGSTER_PG_USERNAME=clinical_ml
    export DAGSTER_PG_PASSWORD="$password" DAGSTER_PG_DB=clinical_ml_test
    CLINICAL_ML_PG_DIR="$dir"
    CLINICAL_ML_PG_STOP=("${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast stop)
    echo "postgres: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, database clinical_ml_test"
}

clinical_ml_pg_stop() {
    if [[ -n "${CLINICAL_ML_PG_DIR:-}" ]]; then
        "${CLINICAL_ML_PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$CLINICAL_ML_PG_DIR"
        unset CLINICAL_ML_PG_DIR DAGSTER_PG_HOST DAGSTER_PG_PORT DAGSTER_PG_USERNAME DAGSTER_PG_PASSWORD DAGSTER_PG_DB
    fi
}

clinical_ml_pg_start
# Stop the cluster when the sourcing shell exits, keeping any EXIT trap it already had.
trap "clinical_ml_pg_stop; $(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")" EXIT
