"""SQLAlchemy: an AsyncSession per request, committed before the response."""
import os
from typing import Annotated

import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import text

from scoped_resources import Resources, Use
from scoped_resources.adapters.sqlalchemy import SQLAlchemy

resources = Resources()
dsn = os.environ.get("SR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
db = SQLAlchemy(resources, dsn.replace("postgresql://", "postgresql+asyncpg://"))
app = FastAPI(lifespan=resources.lifespan)
@app.get("/sum/{a}/{b}")
async def add(
    a: int, b: int, session: Annotated[AsyncSession, Use(db.session)]
) -> dict[str, int]:
    result = await session.execute(text("SELECT CAST(:a AS int) + :b"), {"a": a, "b": b})
    return {"sum": result.scalar_one()}
async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.get("/sum/40/2")).json())

anyio.run(main)
