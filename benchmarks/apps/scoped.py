"""This library with its adapters: the same contract as ``plain``, declared once.

The pool and the Redis client are app resources opened in the lifespan; a route
asks for a pooled connection (``pg.connection``) or a connection inside a
transaction committed before the response (``pg.transaction``).
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, HTTPException
from redis.asyncio import Redis as RedisClient

from scoped_resources import Resources, Use
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.adapters.redis import Redis as RedisAdapter

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

resources = Resources("bench")
pg = Postgres(resources, database_url(), min_size=POOL_SIZE, max_size=POOL_SIZE)
redis_adapter = RedisAdapter(resources, redis_url(), max_connections=POOL_SIZE)

app = FastAPI(lifespan=resources.lifespan)

Connection = Annotated[asyncpg.Connection, Use(pg.connection)]
Transaction = Annotated[asyncpg.Connection, Use(pg.transaction)]
Redis = Annotated[RedisClient, Use(redis_adapter.client)]


@app.get("/users/{user_id}")
async def get_user(user_id: int, conn: Connection) -> dict[str, Any]:
    row = await conn.fetchrow(SELECT_USER, user_id)
    if row is None:
        raise HTTPException(status_code=404, detail="user not found")
    return dict(row)


@app.get("/combo")
async def combo(conn: Connection, redis: Redis) -> dict[str, Any]:
    await redis.set("last_access", "scoped")
    return {"logs": await conn.fetchval(COUNT_LOGS)}


@app.post("/cache/{key}")
async def cache(key: str, value: str, redis: Redis) -> dict[str, Any]:
    await redis.set(key, value, ex=CACHE_TTL)
    return {"msg": "cached"}


@app.post("/items", status_code=201)
async def create_item(item: ItemIn, conn: Transaction) -> dict[str, Any]:
    item_id = await conn.fetchval(INSERT_ITEM, item.name)
    await conn.execute(INSERT_LOG, item_id, f"created {item.name}")
    return {"id": item_id}
