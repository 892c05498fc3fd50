"""What every benchmark app shares: settings, SQL, payloads and the pool size."""

from __future__ import annotations

import os

from pydantic import BaseModel

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: The pool size of every app: PostgreSQL connections and Redis connections.
POOL_SIZE = 10

SELECT_USER = "SELECT id, name, email FROM bench.users WHERE id = $1"
COUNT_LOGS = "SELECT count(*) FROM bench.logs"
INSERT_ITEM = "INSERT INTO bench.items (name) VALUES ($1) RETURNING id"
INSERT_LOG = "INSERT INTO bench.logs (item_id, msg) VALUES ($1, $2)"
CACHE_TTL = 3600


def database_url() -> str:
    """The PostgreSQL DSN, from ``DATABASE_URL``."""
    return os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)


def redis_url() -> str:
    """The Redis URL, from ``REDIS_URL``."""
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


class ItemIn(BaseModel):
    """The body of ``POST /items``."""

    name: str
