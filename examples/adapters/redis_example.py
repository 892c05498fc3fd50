"""Redis: one pooled client per app in a route (the tutorial's /cache, fixed)."""
import os
from typing import Annotated

import anyio
import httpx
import redis.asyncio
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.redis import Redis

resources = Resources()
cache = Redis(resources, os.environ.get("SR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
app = FastAPI(lifespan=resources.lifespan)

@app.post("/cache/{key}")
async def set_cache(
    key: str, value: str, r: Annotated[redis.asyncio.Redis, Use(cache.client)]
) -> dict[str, object]:
    await r.set(f"example:{key}", value, ex=60)  # aioredis is gone: redis.asyncio
    return {"msg": "cached", "stored": await r.getdel(f"example:{key}") == value.encode()}

async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.post("/cache/greeting", params={"value": "hi"})).json())

anyio.run(main)
