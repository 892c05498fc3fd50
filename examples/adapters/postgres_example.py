"""PostgreSQL: a pooled connection in a transaction per request, committed before the response."""
import os
from typing import Annotated

import anyio
import asyncpg
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.postgres import Postgres

resources = Resources()
pg = Postgres(resources, os.environ.get("SR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
app = FastAPI(lifespan=resources.lifespan)

@app.get("/sum/{a}/{b}")
async def add(
    a: int, b: int, conn: Annotated[asyncpg.Connection, Use(pg.transaction)]
) -> dict[str, int]:
    return {"sum": await conn.fetchval("SELECT $1::int + $2::int", a, b)}

async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.get("/sum/40/2")).json())

anyio.run(main)
