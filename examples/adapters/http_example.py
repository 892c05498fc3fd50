"""HTTP: one shared httpx client per app; the upstream here is a tiny local ASGI app."""
from typing import Annotated

import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.http import HTTP

upstream = FastAPI()
upstream.get("/time")(lambda: {"now": "12:00"})

resources = Resources()
api = HTTP(resources, base_url="http://upstream", transport=httpx.ASGITransport(upstream))
app = FastAPI(lifespan=resources.lifespan)

@app.get("/clock")
async def clock(client: Annotated[httpx.AsyncClient, Use(api.client)]) -> dict[str, str]:
    return {"upstream_says": (await client.get("/time")).json()["now"]}

async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.get("/clock")).json())

anyio.run(main)
