"""dishka, a dependency-injection container, with its FastAPI integration.

The pool and the Redis client are APP-scoped providers, closed with the container
at shutdown; a route's connection is a REQUEST-scoped provider (an async
generator around ``pool.acquire()``), released when dishka closes the request
container. The transaction is the endpoint's, as in ``plain``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from dishka import Provider, Scope, make_async_container, provide
from dishka.integrations.fastapi import DishkaRoute, FromDishka, setup_dishka
from fastapi import APIRouter, FastAPI, HTTPException
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


class Infrastructure(Provider):
    """The pool and client for the app, a pooled connection per request."""

    @provide(scope=Scope.APP)
    async def pool(self) -> AsyncIterator[asyncpg.Pool]:
        pool = await asyncpg.create_pool(database_url(), min_size=POOL_SIZE, max_size=POOL_SIZE)
        try:
            yield pool
        finally:
            await pool.close()

    @provide(scope=Scope.APP)
    async def redis(self) -> AsyncIterator[Redis]:
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(redis_url(), max_connections=POOL_SIZE)
        )
        try:
            yield redis
        finally:
            await redis.aclose(close_connection_pool=True)

    @provide(scope=Scope.REQUEST)
    async def connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        async with pool.acquire() as conn:
            yield conn


container = make_async_container(Infrastructure())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Open the app's pool and client at start-up, as every other app does.
    await container.get(asyncpg.Pool)
    await container.get(Redis)
    try:
        yield
    finally:
        await container.close()


app = FastAPI(lifespan=lifespan)
router = APIRouter(route_class=DishkaRoute)


@router.get("/users/{user_id}")
async def get_user(user_id: int, conn: FromDishka[asyncpg.Connection]) -> dict[str, Any]:
    row = await conn.fetchrow(SELECT_USER, user_id)
    if row is None:
        raise HTTPException(status_code=404, detail="user not found")
    return dict(row)


@router.get("/combo")
async def combo(conn: FromDishka[asyncpg.Connection], redis: FromDishka[Redis]) -> dict[str, Any]:
    await redis.set("last_access", "dishka")
    return {"logs": await conn.fetchval(COUNT_LOGS)}


@router.post("/cache/{key}")
async def cache(key: str, value: str, redis: FromDishka[Redis]) -> dict[str, Any]:
    await redis.set(key, value, ex=CACHE_TTL)
    return {"msg": "cached"}


@router.post("/items", status_code=201)
async def create_item(item: ItemIn, conn: FromDishka[asyncpg.Connection]) -> dict[str, Any]:
    async with conn.transaction():
        item_id = await conn.fetchval(INSERT_ITEM, item.name)
        await conn.execute(INSERT_LOG, item_id, f"created {item.name}")
    return {"id": item_id}


app.include_router(router)
setup_dishka(container, app)
