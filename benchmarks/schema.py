"""The benchmark schema: ``python -m benchmarks.schema [--reset]`` creates and seeds it.

Schema ``bench``: ``users`` (10,000 rows), ``items`` (empty) and ``logs``
(1,000 rows). ``POST /items`` adds rows to ``items`` and ``logs``; ``--reset``
(the runner does it before every run) brings both back to the seeded state, so
that ``GET /combo`` counts the same number of rows in every run.
"""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from .apps._common import database_url

USERS = 10_000
LOGS = 1_000

_CREATE = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.users (id integer PRIMARY KEY, name text, email text);
CREATE TABLE IF NOT EXISTS bench.items (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench.logs (id bigserial PRIMARY KEY, item_id bigint, msg text);
"""

_SEED_USERS = """
INSERT INTO bench.users (id, name, email)
SELECT i, 'user ' || i, 'user' || i || '@example.com' FROM generate_series(1, $1) AS i
ON CONFLICT (id) DO NOTHING
"""

_SEED_LOGS = """
INSERT INTO bench.logs (item_id, msg)
SELECT NULL, 'seed ' || i FROM generate_series(1, $1) AS i
"""


async def setup(dsn: str | None = None, *, reset: bool = False) -> dict[str, int]:
    """Create the schema if missing and seed it; with *reset*, back to the seeded rows.

    Safe to run concurrently with itself (an advisory lock serializes it).
    Returns the row counts.
    """
    conn = await asyncpg.connect(dsn or database_url())
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7007007)")
            await conn.execute(_CREATE)
            users = await conn.fetchval("SELECT count(*) FROM bench.users")
            if users != USERS:
                await conn.execute("TRUNCATE bench.users")
                await conn.execute(_SEED_USERS, USERS)
            logs = await conn.fetchval("SELECT count(*) FROM bench.logs")
            if reset or logs == 0:
                await conn.execute("TRUNCATE bench.items, bench.logs RESTART IDENTITY")
                await conn.execute(_SEED_LOGS, LOGS)
        await conn.execute("ANALYZE bench.users, bench.items, bench.logs")
        counts: dict[str, int] = {}
        for table in ("users", "items", "logs"):
            counts[table] = await conn.fetchval(f"SELECT count(*) FROM bench.{table}")  # noqa: S608
        return counts
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="default: $DATABASE_URL or the local test db")
    parser.add_argument("--reset", action="store_true", help="remove rows added by POST /items")
    args = parser.parse_args()
    counts = asyncio.run(setup(args.dsn, reset=args.reset))
    print("bench schema ready:", ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
