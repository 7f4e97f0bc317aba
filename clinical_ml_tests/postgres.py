"""A fresh PostgreSQL database for a test, on the server `.ci/postgres.sh` starts (``DAGSTER_PG_*``).

The test skips cleanly without one, and fails in CI when the variables are set but the server cannot be
reached (a skipped database test there would hide a broken setup)."""

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_VARS = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USERNAME",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
)


def pg_connect(dbname: str):
    """A psycopg2 connection to ``dbname`` on the configured server."""
    import psycopg2

    return psycopg2.connect(
        host=os.environ["DAGSTER_PG_HOST"],
        port=int(os.environ["DAGSTER_PG_PORT"]),
        user=os.environ["DAGSTER_PG_USERNAME"],
        password=os.environ["DAGSTER_PG_PASSWORD"],
        dbname=dbname,
        connect_timeout=5,
    )


@contextmanager
def fresh_database(tag: str, *, else_the_configured_one: bool) -> Iterator[str]:
    """The name of a database created for the test (``<DAGSTER_PG_DB>_<tag><random>``, dropped afterwards).
    Where databases may not be created: the configured database with ``else_the_configured_one``, else skip."""
    import psycopg2

    missing = [v for v in PG_VARS if not os.environ.get(v)]
    if missing:
        pytest.skip(
            f"no PostgreSQL configured ({', '.join(missing)} unset): CI starts one with .ci/postgres.sh; "
            "locally run `source .ci/postgres.sh` first"
        )
    base = os.environ["DAGSTER_PG_DB"]
    try:
        admin = pg_connect(base)
    except psycopg2.OperationalError as exc:
        if os.environ.get("CI"):
            raise AssertionError("DAGSTER_PG_* are set but PostgreSQL is not reachable") from exc
        pytest.skip(
            f"PostgreSQL at {os.environ['DAGSTER_PG_HOST']}:{os.environ['DAGSTER_PG_PORT']} unreachable"
        )
    admin.autocommit = True
    name = f"{base}_{tag}{secrets.token_hex(4)}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    except psycopg2.Error as exc:
        if not else_the_configured_one:
            admin.close()
            pytest.skip(f"may not create a database for this test: {exc.pgcode}")
        name = base
    try:
        yield name
    finally:
        if name != base:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
