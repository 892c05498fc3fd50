"""RabbitMQ: a channel leased per request from a bounded pool, publisher confirms on."""
import os
from typing import Annotated

import aio_pika
import anyio
import httpx
from aio_pika.abc import AbstractChannel as Channel
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.rabbitmq import RabbitMQ

resources = Resources()
mq = RabbitMQ(resources, os.environ.get("SR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
app = FastAPI(lifespan=resources.lifespan)

@app.post("/orders")
async def order(channel: Annotated[Channel, Use(mq.channel)]) -> dict[str, str]:
    queue = await channel.declare_queue(exclusive=True)  # temporary, server-named
    await channel.default_exchange.publish(aio_pika.Message(b"order-1"), routing_key=queue.name)
    return {"confirmed_and_received": (await queue.get(timeout=5, no_ack=True)).body.decode()}

async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.post("/orders")).json())

anyio.run(main)
