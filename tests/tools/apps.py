"""Small apps for the tools' tests: one sound, one per kind of graph problem."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI

from scoped_resources import Resources, Use


class Settings:
    """A plain value the sound app provides."""

    url = "memory://"


def _sound() -> FastAPI:
    resources = Resources("small")
    resources.provide(Settings())

    @resources.app
    async def client(settings: Settings) -> AsyncIterator[str]:
        yield settings.url

    @resources.request
    async def session(c: Annotated[str, Use(client)]) -> AsyncIterator[str]:
        yield f"session on {c}"

    @resources.request(release="after_response")
    async def audit() -> AsyncIterator[list[str]]:
        yield []

    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/things")
    async def things(s: Annotated[str, Use(session)]) -> str:
        return s

    @app.post("/things")
    async def add(s: Annotated[str, Use(session)], log: Annotated[list[str], Use(audit)]) -> str:
        return s

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    return app


def _missing() -> FastAPI:
    resources = Resources("missing")

    class Config:
        pass

    @resources.app
    async def engine(config: Config) -> int:
        return 1

    return FastAPI(lifespan=resources.lifespan)


def _foreign() -> FastAPI:
    resources = Resources("mine")
    other = Resources("theirs")

    @other.app
    async def their_pool() -> int:
        return 1

    @resources.request
    async def my_conn(pool: Annotated[int, Use(their_pool)]) -> int:
        return pool

    return FastAPI(lifespan=resources.lifespan)


def _foreign_route() -> FastAPI:
    resources = Resources("mine")
    other = Resources("theirs")

    @resources.app
    async def own() -> int:
        return 1

    @other.request
    async def stray() -> int:
        return 2

    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/mixed")
    async def mixed(a: Annotated[int, Use(own)], b: Annotated[int, Use(stray)]) -> int:
        return a + b

    return app


def _scope() -> FastAPI:
    resources = Resources("scoped")

    @resources.request
    async def conn() -> AsyncIterator[int]:
        yield 1

    @resources.app
    async def cache(c: Annotated[int, Use(conn)]) -> int:
        return c

    return FastAPI(lifespan=resources.lifespan)


def _unshareable() -> FastAPI:
    resources = Resources("shared")

    @resources.app(async_only=False)
    async def holder() -> int:
        return 1

    holder.shareable = False  # what a driver's connection type declares
    return FastAPI(lifespan=resources.lifespan)


def _sync_route() -> FastAPI:
    resources = Resources("syncy")

    @resources.request(async_only=True)
    async def conn() -> AsyncIterator[int]:
        yield 1

    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/sync")
    def handler(c: Annotated[int, Use(conn)]) -> int:
        return c

    return app


def _many() -> FastAPI:
    resources = Resources("many")

    class Config:
        pass

    @resources.request
    async def conn() -> AsyncIterator[int]:
        yield 1

    @resources.app
    async def cache(c: Annotated[int, Use(conn)]) -> int:
        return c

    @resources.app
    async def engine(config: Config) -> int:
        return 1

    @resources.app
    async def broker(config: Config) -> int:
        return 1

    return FastAPI(lifespan=resources.lifespan)


sound = _sound()
missing = _missing()
foreign = _foreign()
foreign_route = _foreign_route()
scope = _scope()
unshareable = _unshareable()
sync_route = _sync_route()
many = _many()


def _included() -> FastAPI:
    from fastapi import APIRouter

    resources = Resources("included")

    @resources.request(async_only=True)
    async def conn() -> AsyncIterator[int]:
        yield 1

    router = APIRouter()

    @router.get("/sync")
    def handler(c: Annotated[int, Use(conn)]) -> int:
        return c

    app = FastAPI(lifespan=resources.lifespan)
    app.include_router(router, prefix="/v1")
    return app


included = _included()
bare = FastAPI()
