"""The tutorial's style: a new asyncpg connection and a new Redis client per request.

Correct, and slow: every request pays a PostgreSQL connection set-up (and a
Redis one). It shows what the pooled apps are worth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException
from redis.asyncio import Redis

from ._common import (
    CACHE_TTL,
    COUNT_LOGS,
    INSERT_ITEM,
    INSERT_LOG,
    SELECT_USER,
    ItemIn,
    database_url,
    redis_url,
)

app = FastAPI()


async def get_connection() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url())
    try:
        yield conn
    finally:
        await conn.close()


async def get_redis() -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url())
    try:
        yield redis
    finally:
        await redis.aclose()


Connection = Annotated[asyncpg.Connection, Depends(get_connection)]
RedisClient = Annotated[Redis, Depends(get_redis)]


@app.get("/users/{user_id}")
async def get_user(user_id: int, conn: Connection) -> dict[str, Any]:
    row = await conn.fetchrow(SELECT_USER, user_id)
    if row is None:
        raise HTTPException(status_code=404, detail="user not found")
    return dict(row)


@app.get("/combo")
async def combo(conn: Connection, redis: RedisClient) -> dict[str, Any]:
    await redis.set("last_access", "naive")
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
