"""The application: resources declared once, routes that ask for them.

``create_app(settings)`` builds a fresh app with its own ``Resources`` registry,
so tests (and several apps in one process) never share state; ``service.app:app``
is the app for the settings in the environment, made on first access.

Resources (app-scoped unless noted):

==================  ==================================================================
``db.engine``       the SQLAlchemy engine (``adapters.sqlalchemy``)
``schema``          runs the migrations (and sets SQLite up) once the engine is open
``db.connection``   (request) a read connection, returned to the pool before the response
``tx`` (request)    a write transaction on that connection, committed before the
                    response: a failing COMMIT is a 500, never a 201 for unstored data
``cache``           Redis (``REDIS_URL``) or an in-process TTL dict
``files.directory`` makes sure the upload directory exists; pinged for readiness
``files.uploads``   (request) atomic uploads, published only when the request succeeds
``http``            the shared ``httpx.AsyncClient`` for ``UPSTREAM_URL``
``wakeup``          how a route tells the outbox relay that an event is waiting
``outbox_relay``    publishes outbox rows to RabbitMQ (only with ``AMQP_URL``)
==================  ==================================================================
"""

import gc
import hmac
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import httpx
import redis.asyncio
import redis.exceptions
import sqlalchemy.exc
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoped_resources import Resource, Resources, Use
from scoped_resources.adapters.files import Files, Uploads
from scoped_resources.adapters.http import HTTP
from scoped_resources.adapters.rabbitmq import ChannelPool, RabbitMQ
from scoped_resources.adapters.redis import Redis
from scoped_resources.adapters.sqlalchemy import SQLAlchemy
from scoped_resources.fastapi import health_routes, outage_of
from scoped_resources.page import resource_page

from . import errors
from .cache import Cache, MemoryCache, RedisCache
from .database import (
    check_pool_budget,
    engine_options,
    make_data_dir,
    migrate,
    prepare_engine,
    write_connection,
)
from .outbox import ITEM_CREATED, OutboxRelay, add_event
from .schemas import Cached, CacheEntry, Combo, Item, ItemIn, StoredFileOut, User, UserIn
from .settings import Settings
from .signals import Wakeup
from .tables import items, logs, users
from .uploads import receive_file
from .validation import CACHE_KEY, INT64_MAX, ItemId, Text, check_file_name

__all__ = ["create_app"]

MAX_LIMIT = 100
DEFAULT_TTL = 3600
MAX_TTL = 30 * 24 * 3600
LAST_ACCESS_KEY = "combo:last_access"
UPSTREAM_MAX_BYTES = 1024 * 1024

Handler = Callable[..., Coroutine[Any, Any, Any]]
CacheKey = Annotated[str, PathParam(pattern=CACHE_KEY, description="1-200 of [A-Za-z0-9._:-]")]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app (with its own resources) for *settings* (default: the environment)."""
    settings = settings or Settings()
    resources = Resources("service", request_timeout=settings.request_timeout)
    resources.provide(settings)

    # -- resources --------------------------------------------------------------

    sql = SQLAlchemy(resources, settings.database_url, name="db", **engine_options(settings))

    @resources.app(name="schema", timeout=60)
    async def schema(engine: Annotated[AsyncEngine, Use(sql.engine)]) -> AsyncEngine:
        await anyio.to_thread.run_sync(make_data_dir, settings)
        prepare_engine(engine)
        await check_pool_budget(engine, settings)
        await migrate(engine)
        return engine

    @resources.request(name="tx")
    async def tx(
        conn: Annotated[AsyncConnection, Use(sql.connection)],
    ) -> AsyncIterator[AsyncConnection]:
        await write_connection(conn)
        async with conn.begin():
            yield conn

    db = sql.connection

    cache: Resource[Cache]
    if settings.redis_url:
        redis_res = Redis(resources, settings.redis_url, name="redis")

        @resources.app(name="cache")
        def redis_cache(client: Annotated[redis.asyncio.Redis, Use(redis_res.client)]) -> Cache:
            return RedisCache(client, settings.cache_prefix)

        cache = redis_cache
    else:

        @resources.app(name="cache")
        def memory_cache() -> Cache:
            return MemoryCache()

        cache = memory_cache

    # files.directory makes sure the upload directory exists and pings it for readiness.
    files = Files(
        resources, settings.files_dir, name="files", max_upload_bytes=settings.max_upload_bytes
    )
    http = HTTP(
        resources,
        name="http",
        base_url=settings.upstream_url,
        timeout=httpx.Timeout(settings.upstream_timeout),
        follow_redirects=False,
    )

    @resources.app(name="wakeup")
    def wakeup() -> Wakeup:
        return Wakeup()

    if settings.amqp_url and settings.outbox_relay:
        # Reconnect every second (aio-pika's default is 5 s): events flow again soon
        # after the broker returns.
        broker = RabbitMQ(
            resources, settings.amqp_url, name="rabbitmq", channels=4, reconnect_interval=1.0
        )

        async def ping_relay(relay: OutboxRelay) -> None:
            if not relay.running:
                raise RuntimeError("the outbox relay task has stopped")

        @resources.app(name="outbox_relay", ping=ping_relay)
        async def outbox_relay(
            engine: Annotated[AsyncEngine, Use(schema)],
            channels: Annotated[ChannelPool, Use(broker.channels)],
            wake: Annotated[Wakeup, Use(wakeup)],
            settings: Settings,
        ) -> AsyncIterator[OutboxRelay]:
            relay = OutboxRelay(
                engine,
                channels,
                wake,
                exchange=settings.events_exchange,
                poll_seconds=settings.outbox_poll_seconds,
                linger_seconds=settings.outbox_linger_seconds,
            )
            async with relay:
                yield relay

    # -- the app ----------------------------------------------------------------

    lifespan = resources.wrap_lifespan(_frozen_heap) if settings.gc_freeze else resources.lifespan
    app = FastAPI(
        title="scoped-resources reference service",
        version="1.0.0",
        description="Users, items, a cache, files and an upstream API, on scoped-resources.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.resources = resources
    errors.install(app)
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _unavailable("database"))
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _unavailable("database"))
    app.add_exception_handler(sqlalchemy.exc.InterfaceError, _unavailable("database"))
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, _database_error)
    # A connection lost mid-request (asyncpg: "unexpected connection_lost() call").
    app.add_exception_handler(ConnectionError, _unavailable("database"))
    app.add_exception_handler(redis.exceptions.ConnectionError, _unavailable("cache"))
    app.add_exception_handler(redis.exceptions.TimeoutError, _unavailable("cache"))
    app.add_middleware(
        errors.BodyLimit,
        limit=settings.max_json_bytes,
        upload_limit=settings.max_upload_bytes + 64 * 1024,
    )
    mutating = [Depends(_bearer_check(settings))] if settings.api_token else []
    problems: dict[int | str, dict[str, Any]] = {
        code: errors.problem_schema() for code in (400, 401, 404, 409, 413, 415, 422, 503)
    }

    # -- probes -----------------------------------------------------------------

    app.include_router(
        health_routes(resources, ping_timeout=settings.ready_timeout), tags=["probes"]
    )
    if settings.resource_page_token is not None:
        app.include_router(
            resource_page(
                resources,
                token=settings.resource_page_token.get_secret_value(),
                loopback_only=settings.resource_page_loopback_only,
                ping_timeout=settings.ready_timeout,
                gates=[sql.gate],
            )
        )

    # -- users ------------------------------------------------------------------

    @app.get("/users/{uid}", tags=["users"], responses=problems)
    async def get_user(uid: ItemId, conn: Annotated[AsyncConnection, Use(db)]) -> User:
        """One user by id."""
        row = (await conn.execute(select(users).where(users.c.id == uid))).first()
        if row is None:
            raise HTTPException(404, f"user {uid} does not exist")
        return User(id=row.id, name=row.name, email=row.email)

    @app.post("/users", status_code=201, tags=["users"], responses=problems, dependencies=mutating)
    async def create_user(body: UserIn, conn: Annotated[AsyncConnection, Use(tx)]) -> User:
        """Create a user; the email must be unused (409 otherwise)."""
        try:
            result = await conn.execute(
                users.insert().values(name=body.name, email=body.email).returning(users.c.id)
            )
        except sqlalchemy.exc.IntegrityError:
            raise HTTPException(409, "a user with this email already exists") from None
        return User(id=result.scalar_one(), name=body.name, email=body.email)

    # -- items ------------------------------------------------------------------

    @app.get("/items", tags=["items"], responses=problems)
    async def list_items(
        conn: Annotated[AsyncConnection, Use(db)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
        offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
    ) -> list[Item]:
        """Items in id order, *limit* (at most 100) at a time."""
        rows = await conn.execute(select(items).order_by(items.c.id).limit(limit).offset(offset))
        return [Item(id=r.id, name=r.name, created_at=_aware(r.created_at)) for r in rows]

    @app.post("/items", status_code=201, tags=["items"], responses=problems, dependencies=mutating)
    async def create_item(
        body: ItemIn,
        conn: Annotated[AsyncConnection, Use(tx)],
        wake: Annotated[Wakeup, Use(wakeup)],
        background: BackgroundTasks,
    ) -> Item:
        """Create an item and its log row (and event) in one transaction: all or nothing."""
        now = datetime.now(UTC)
        result = await conn.execute(
            items.insert().values(name=body.name, created_at=now).returning(items.c.id)
        )
        item_id = result.scalar_one()
        await conn.execute(
            logs.insert().values(item_id=item_id, message=f"created item {item_id}", created_at=now)
        )
        if settings.amqp_url:
            await add_event(
                conn,
                ITEM_CREATED,
                {"id": item_id, "name": body.name, "created_at": now.isoformat()},
            )
            background.add_task(wake.set)  # runs after the commit
        return Item(id=item_id, name=body.name, created_at=now)

    @app.get("/items/{item_id}/enriched", tags=["items"], responses=_upstream_problems(problems))
    async def enriched_item(
        item_id: ItemId,
        conn: Annotated[AsyncConnection, Use(db)],
        client: Annotated[httpx.AsyncClient, Use(http.client)],
    ) -> dict[str, Any]:
        """The item merged with ``GET {UPSTREAM_URL}/items/{id}`` (the item's fields win)."""
        row = (await conn.execute(select(items).where(items.c.id == item_id))).first()
        if row is None:
            raise HTTPException(404, f"item {item_id} does not exist")
        if settings.upstream_url is None:
            raise HTTPException(503, "no upstream is configured (set UPSTREAM_URL)")
        extra = await _fetch_upstream(http, client, f"/items/{item_id}")
        item = Item(id=row.id, name=row.name, created_at=_aware(row.created_at))
        return {**extra, **item.model_dump(mode="json")}

    # -- cache ------------------------------------------------------------------

    @app.post("/cache/{key}", tags=["cache"], responses=problems, dependencies=mutating)
    async def set_cache(
        key: CacheKey,
        value: Annotated[Text, Query(max_length=4096)],
        store: Annotated[Cache, Use(cache)],
        ttl: Annotated[int, Query(ge=1, le=MAX_TTL, description="seconds")] = DEFAULT_TTL,
    ) -> Cached:
        """Store *value* under *key* for *ttl* seconds (default one hour)."""
        await store.set(key, value, ttl)
        return Cached(msg="cached")

    @app.get("/cache/{key}", tags=["cache"], responses=problems)
    async def get_cache(key: CacheKey, store: Annotated[Cache, Use(cache)]) -> CacheEntry:
        """The value under *key*; 404 when missing or expired."""
        value = await store.get(key)
        if value is None:
            raise HTTPException(404, f"no cached value for {key!r}")
        return CacheEntry(key=key, value=value)

    @app.get("/combo", tags=["cache"], responses=problems)
    async def combo(
        conn: Annotated[AsyncConnection, Use(db)], store: Annotated[Cache, Use(cache)]
    ) -> Combo:
        """The number of log rows; records this access time in the cache."""
        count = (await conn.execute(select(func.count()).select_from(logs))).scalar_one()
        previous = await store.get(LAST_ACCESS_KEY)
        now = datetime.now(UTC)
        await store.set(LAST_ACCESS_KEY, now.isoformat(), DEFAULT_TTL * 24)
        return Combo(logs=count, last_access=now, previous_access=_parse_time(previous))

    # -- files ------------------------------------------------------------------

    @app.post(
        "/files",
        status_code=201,
        tags=["files"],
        responses=problems,
        dependencies=mutating,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    }
                },
            }
        },
    )
    async def upload_file(
        request: Request, uploads: Annotated[Uploads, Use(files.uploads)]
    ) -> StoredFileOut:
        """Stream the ``file`` part to disk; 413 past the size limit, nothing left behind."""
        stored = await receive_file(request, uploads)
        return StoredFileOut(name=stored.name, size=stored.size, sha256=stored.sha256)

    @app.get(
        "/files/{name}",
        tags=["files"],
        responses={**problems, 200: {"content": {"application/octet-stream": {}}}},
        response_class=FileResponse,
    )
    async def download_file(name: Annotated[str, PathParam(max_length=128)]) -> FileResponse:
        """Stream a stored file back."""
        path = files.resolve(check_file_name(name))
        if not await anyio.Path(path).is_file():
            raise HTTPException(404, f"no file named {name!r}")
        return FileResponse(path, media_type="application/octet-stream", filename=name)

    return app


# -- helpers ----------------------------------------------------------------------


def _bearer_check(settings: Settings) -> Handler:
    assert settings.api_token is not None
    expected = settings.api_token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, description="API_TOKEN")

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # compare_digest: the time taken does not depend on how much of the token matched.
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401,
                "this endpoint needs 'Authorization: Bearer <API_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def _unavailable(what: str) -> Handler:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        errors.logger.warning("%s unavailable: %s", what, exc)
        return errors.problem(503, f"the {what} is unavailable; retry later", {"Retry-After": "1"})

    return handler


@asynccontextmanager
async def _frozen_heap(app: FastAPI) -> AsyncIterator[None]:
    """Once every app resource is open: collect, then freeze what start-up made (``GC_FREEZE``).

    A full collection otherwise walks every object start-up made (the imports, the
    app, the pools) with the event loop stopped: ~80 ms here, and the first burst
    of requests after start-up triggers one, so those requests miss their
    deadlines by that much. Frozen objects are still freed by reference counting;
    only the cycle collector skips them. Unfrozen at shutdown.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 when the driver lost its connection (an outage); 500 for anything else."""
    if outage_of(exc) is not None:
        unavailable: JSONResponse = await _unavailable("database")(request, exc)
        return unavailable
    errors.logger.error("database error", exc_info=exc)
    return errors.problem(500, "the request failed in the database")


def _upstream_problems(problems: dict[int | str, dict[str, Any]]) -> dict[int | str, Any]:
    return {**problems, 502: errors.problem_schema(), 504: errors.problem_schema()}


def _finite(text_value: str) -> float:
    value = float(text_value)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


async def _fetch_upstream(http: HTTP, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        async with http.stream(client, "GET", url) as response:
            if response.status_code >= 400:
                raise HTTPException(502, f"the upstream answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > UPSTREAM_MAX_BYTES:
                    raise HTTPException(502, "the upstream's answer is too large")
    except httpx.TimeoutException:
        raise HTTPException(504, "the upstream did not answer in time") from None
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"the upstream is unreachable ({type(exc).__name__})") from None
    try:
        data = json.loads(body, parse_float=_finite, parse_constant=_no_constants)
    except ValueError:
        raise HTTPException(502, "the upstream's answer is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(502, "the upstream's answer is not a JSON object")
    return data


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn service.app:app``: the app is made (and the environment read) on first use.
    if name == "app":
        made = create_app()
        globals()["app"] = made
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
