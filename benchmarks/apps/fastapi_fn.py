"""FastAPI's own answer: ``yield`` dependencies with ``Depends(..., scope="function")``.

The pool and the Redis client open in the lifespan; a route's connection is
released right after the endpoint returns, before the response is sent (the
same point as ``scoped``). The transaction is the endpoint's, as in ``plain``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request
from redis.asyncio import BlockingConnectionPool, Redis

from ._common import (
    CACHE_TTL,
    COUNT_LOGS,
    INSERT_ITEM,
    INSERT_LOG,
    POOL_SIZE,
    SELECT_USER,
    ItemIn,
    database_url,
    redis_url,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(database_url(), min_size=POOL_SIZE, max_size=POOL_SIZE)
    redis = Redis(
        connection_pool=BlockingConnectionPool.from_url(redis_url(), max_connections=POOL_SIZE)
    )
    app.state.pool = pool
    app.state.redis = redis
    try:
        yield
    finally:
        await redis.aclose(close_connection_pool=True)
        await pool.close()


app = FastAPI(lifespan=lifespan)


async def get_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        yield conn


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


Connection = Annotated[asyncpg.Connection, Depends(get_connection, scope="function")]
RedisClient = Annotated[Redis, Depends(get_redis, scope="function")]


@app.get("/users/{user_id}")
async def get_user(user_id: int, conn: Connection) -> dict[str, Any]:
    row = await conn.fetchrow(SELECT_USER, user_id)
    if row is None:
        raise HTTPException(status_code=404, detail="user not found")
    return dict(row)


@app.get("/combo")
async def combo(conn: Connection, redis: RedisClient) -> dict[str, Any]:
    await redis.set("last_access", "fastapi_fn")
    return {"logs": await conn.fetchval(COUNT_LOGS)}


@app.post("/cache/{key}")
async def cache(key: str, value: str, redis: RedisClient) -> dict[str, Any]:
    await redis.set(key, value, ex=CACHE_TTL)
    return {"msg": "cached"}


@app.post("/items", status_code=201)
async def create_item(item: ItemIn, conn: Connection) -> dict[str, Any]:
    async with conn.transaction():
        item_id = await conn.fetchval(INSERT_ITEM, item.name)
        await conn.execute(INSERT_LOG, item_id, f"created {item.name}")
    return {"id": item_id}
