"""The FastAPI integration: commit before respond, HTTP errors, streaming, misuse."""

# No "from __future__ import annotations": FastAPI must see the real
# annotations of routes declared inside test functions.

import typing
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from scoped_resources import Resource, Resources, Use
from scoped_resources.exceptions import ResourceMisuse, ScopeClosed

from .helpers import Journal, generator_resource

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """uvicorn and FastAPI's test stack run on asyncio."""
    return "asyncio"


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run *app*'s lifespan and give a client bound to it."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def journaled_app(journal: Journal) -> tuple[FastAPI, Resources]:
    resources = Resources()
    app = FastAPI(lifespan=resources.lifespan)

    @app.middleware("http")
    async def record_response_start(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        journal.add("response")
        return response

    return app, resources


def pool_and_connection(resources: Resources) -> tuple[Resource[str], Resource[str]]:
    """An app resource ``pool`` and a request resource ``conn`` that uses it."""

    @resources.app
    async def pool() -> AsyncIterator[str]:
        yield "pool"

    @resources.request
    async def conn(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
        yield f"{p}/conn"

    return pool, conn


class TestCommitBeforeRespond:
    """Request resources are released before the response is sent."""

    async def test_release_happens_before_the_response(self) -> None:
        """The commit is journaled before the response leaves the app."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(resources, journal, "tx")

        @app.get("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> dict[str, str]:
            journal.add("handler")
            return {"tx": t}

        async with serve(app) as client:
            response = await client.get("/")
        assert response.json() == {"tx": "tx"}
        assert journal.events == ["acquire tx", "handler", "release tx", "response"]

    async def test_a_failing_commit_answers_500_not_200(self) -> None:
        """When the release fails, the client gets a 5xx answer naming the failure."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(
            resources, journal, "tx", fail_release=RuntimeError("COMMIT refused")
        )

        @app.post("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> dict[str, str]:
            return {"stored": t}

        async with serve(app) as client:
            response = await client.post("/")
        assert response.status_code == 500
        assert "'tx'" in response.json()["detail"]

    async def test_a_release_that_lost_its_connection_answers_503(self) -> None:
        """A release failing on a lost connection is the service being unavailable: 503."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(
            resources, journal, "tx", fail_release=ConnectionResetError("server closed")
        )

        @app.post("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> dict[str, str]:
            return {"stored": t}

        async with serve(app) as client:
            response = await client.post("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "'tx'" in response.json()["detail"]

    async def test_an_http_error_rolls_back(self) -> None:
        """An HTTPException of status >= 400 reaches the release as the outcome."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(resources, journal, "tx")

        @app.get("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> None:
            raise HTTPException(409, "conflict")

        async with serve(app) as client:
            response = await client.get("/")
        assert response.status_code == 409
        assert "release tx after HTTPException" in journal.events

    async def test_a_redirect_raised_as_http_exception_commits(self) -> None:
        """An HTTPException below 400 is not a failure: the release sees success."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(resources, journal, "tx")

        @app.get("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> None:
            raise HTTPException(303, headers={"Location": "/elsewhere"})

        async with serve(app) as client:
            response = await client.get("/")
        assert response.status_code == 303
        assert "release tx" in journal.events

    async def test_an_unhandled_error_rolls_back_and_answers_500(self) -> None:
        """A handler crash is the outcome the release sees, and stays the error."""
        journal = Journal()
        app, resources = journaled_app(journal)
        tx = generator_resource(resources, journal, "tx")

        @app.get("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> None:
            raise ZeroDivisionError

        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.get("/")
        assert response.status_code == 500
        assert "release tx after ZeroDivisionError" in journal.events


class TestBusy:
    """An exhausted resource answers 503 with Retry-After, never hangs."""

    async def test_acquire_timeout_answers_503_with_retry_after(self) -> None:
        """ResourceBusy becomes 503 and says which resource."""
        resources = Resources()

        @resources.request(acquire_timeout=0.01)
        async def pool_slot() -> str:
            await anyio.sleep_forever()
            return "never"

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(slot: Annotated[str, Use(pool_slot)]) -> str:
            return slot

        async with serve(app) as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "'pool_slot'" in response.json()["detail"]


class TestSharing:
    """One instance per request, shared by every dependency of that request."""

    async def test_two_dependencies_share_the_request_instance(self) -> None:
        """A resource asked for by the route and by another resource is acquired once."""
        resources = Resources()
        made = 0

        @resources.request
        async def conn() -> AsyncIterator[int]:
            nonlocal made
            made += 1
            yield made

        @resources.request
        def repo(c: Annotated[int, Use(conn)]) -> str:
            return f"repo on {c}"

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(c: Annotated[int, Use(conn)], r: Annotated[str, Use(repo)]) -> list[Any]:
            return [c, r]

        async with serve(app) as client:
            first = (await client.get("/")).json()
            second = (await client.get("/")).json()
        assert first == [1, "repo on 1"]
        assert second == [2, "repo on 2"]

    async def test_the_tutorials_asynccontextmanager_dependency_works(self) -> None:
        """An @asynccontextmanager function is usable as a dependency through Use."""
        resources = Resources()
        closed: list[bool] = []

        @resources.request
        @asynccontextmanager
        async def client() -> AsyncIterator[str]:
            try:
                yield "client"
            finally:
                closed.append(True)

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(c: Annotated[str, Use(client)]) -> str:
            return c

        async with serve(app) as http:
            response = await http.get("/")
        assert response.json() == "client"
        assert closed == [True]

    async def test_request_resources_can_take_the_request(self) -> None:
        """A request resource may ask for the Request itself."""
        from fastapi import Request

        resources = Resources()

        @resources.request
        def caller(request: Request) -> str:
            return request.headers.get("x-user", "?")

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(user: Annotated[str, Use(caller)]) -> str:
            return user

        async with serve(app) as client:
            response = await client.get("/", headers={"x-user": "ada"})
        assert response.json() == "ada"


class TestAfterResponse:
    """release='after_response' holds a resource while the body streams."""

    async def test_a_stream_reads_from_a_held_resource(self) -> None:
        """The resource is released only after the last chunk was sent."""
        journal = Journal()
        resources = Resources()
        cursor = generator_resource(resources, journal, "cursor", release="after_response")
        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(c: Annotated[str, Use(cursor)]) -> StreamingResponse:
            async def body() -> AsyncIterator[bytes]:
                for i in range(3):
                    journal.add(f"chunk {i}")
                    yield f"{c}{i};".encode()

            return StreamingResponse(body())

        async with serve(app) as client:
            response = await client.get("/")
        assert response.text == "cursor0;cursor1;cursor2;"
        assert journal.events == [
            "acquire cursor",
            "chunk 0",
            "chunk 1",
            "chunk 2",
            "release cursor",
        ]

    async def test_a_background_task_may_use_an_after_response_resource(self) -> None:
        """Background tasks run before such a resource is released."""
        journal = Journal()
        resources = Resources()
        conn = generator_resource(resources, journal, "conn", release="after_response")
        app = FastAPI(lifespan=resources.lifespan)

        @app.post("/")
        async def endpoint(c: Annotated[str, Use(conn)], tasks: BackgroundTasks) -> str:
            tasks.add_task(journal.add, f"task uses {c}")
            return "queued"

        async with serve(app) as client:
            await client.post("/")
        assert journal.events == ["acquire conn", "task uses conn", "release conn"]

    async def test_a_background_task_given_a_released_resource_is_refused(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Passing a before-response resource to a background task fails the request."""
        journal = Journal()
        resources = Resources()
        conn = generator_resource(resources, journal, "conn")
        app = FastAPI(lifespan=resources.lifespan)
        ran: list[str] = []

        @app.post("/")
        async def endpoint(c: Annotated[str, Use(conn)], tasks: BackgroundTasks) -> str:
            tasks.add_task(ran.append, c)
            return "queued"

        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.post("/")
        assert response.status_code == 500
        assert ran == []
        assert journal.events == ["acquire conn", "release conn after ResourceMisuse"]


class TestStartupChecks:
    """Routes are checked when the app starts."""

    async def test_a_sync_route_asking_for_an_async_resource_fails_startup(self) -> None:
        """A sync def route cannot await the resource, so the app does not start."""
        resources = Resources()

        @resources.request
        async def conn() -> AsyncIterator[str]:
            yield "conn"

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        def endpoint(c: Annotated[str, Use(conn)]) -> str:
            return c

        with pytest.raises(ResourceMisuse, match="'conn'.*'endpoint'.*async def"):
            async with LifespanManager(app):
                pass

    async def test_a_route_of_an_included_router_is_checked_too(self) -> None:
        """A sync route that comes from include_router (with a prefix) fails startup as well."""
        resources = Resources()

        @resources.request
        async def conn() -> AsyncIterator[str]:
            yield "conn"

        router = APIRouter()

        @router.get("/")
        def nested(c: Annotated[str, Use(conn)]) -> str:
            return c

        app = FastAPI(lifespan=resources.lifespan)
        app.include_router(router, prefix="/v1")

        with pytest.raises(ResourceMisuse, match="'conn'.*'nested'.*async def"):
            async with LifespanManager(app):
                pass

    async def test_a_sync_dependency_asking_for_an_async_resource_fails_startup(self) -> None:
        """The check reaches the user's own sync dependencies too."""
        resources = Resources()

        @resources.request
        async def conn() -> AsyncIterator[str]:
            yield "conn"

        def repo(c: Annotated[str, Use(conn)]) -> str:
            return c

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(r: Annotated[str, Depends(repo)]) -> str:
            return r

        with pytest.raises(ResourceMisuse, match="'conn'.*'repo'"):
            async with LifespanManager(app):
                pass

    async def test_a_sync_route_may_use_a_sync_resource(self) -> None:
        """Plain sync resources are fine in sync routes."""
        resources = Resources()

        @resources.app
        def settings() -> dict[str, str]:
            return {"env": "test"}

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        def endpoint(s: Annotated[dict[str, str], Use(settings)]) -> dict[str, str]:
            return s

        async with serve(app) as client:
            assert (await client.get("/")).json() == {"env": "test"}

    async def test_without_the_lifespan_the_error_says_what_to_pass(self) -> None:
        """Forgetting lifespan=resources.lifespan is explained on the first request."""
        resources = Resources()

        @resources.app
        def settings() -> int:
            return 1

        app = FastAPI()

        @app.get("/")
        async def endpoint(s: Annotated[int, Use(settings)]) -> int:
            return s

        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with pytest.raises(ScopeClosed, match="lifespan=resources.lifespan"):
                await client.get("/")


class TestLifespan:
    """The lifespan opens app resources and can wrap the user's own."""

    async def test_a_user_lifespan_runs_inside_with_resources_open(self) -> None:
        """The wrapped lifespan can use resources, and its state reaches requests."""
        journal = Journal()
        resources = Resources()
        pool = generator_resource(resources, journal, "pool", scope="app")

        @asynccontextmanager
        async def mine(app: FastAPI) -> AsyncIterator[dict[str, str]]:
            async with resources.scope("warm-up") as scope:
                journal.add(f"warm {await scope.get(pool)}")
            yield {"greeting": "hello"}
            journal.add("mine done")

        app = FastAPI(lifespan=resources.wrap_lifespan(mine))

        @app.get("/")
        async def endpoint(request: Any = None) -> str:
            return "ok"

        @app.get("/state")
        async def state(p: Annotated[str, Use(pool)], request: Any = None) -> str:
            return p

        async with serve(app) as client:
            assert (await client.get("/state")).json() == "pool"
        assert journal.events == ["acquire pool", "warm pool", "mine done", "release pool"]


class TestNoPerRequestPlanning:
    """Nothing per request inspects signatures or walks the graph."""

    async def test_requests_do_not_inspect_signatures(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After start-up, signature inspection is never called again by the library."""
        resources = Resources()

        _, conn = pool_and_connection(resources)

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(c: Annotated[str, Use(conn)]) -> str:
            return c

        def forbidden(*args: Any, **kwargs: Any) -> Iterator[Any]:
            raise AssertionError("the plan was recompiled during a request")

        async with serve(app) as client:
            import inspect

            monkeypatch.setattr(inspect, "signature", forbidden)
            monkeypatch.setattr(typing, "get_type_hints", forbidden)
            for _ in range(3):
                assert (await client.get("/")).json() == "pool/conn"
            monkeypatch.undo()


class TestNoGarbage:
    """A served request leaves nothing for the cyclic garbage collector."""

    async def test_a_closed_request_leaves_no_reference_cycle(self) -> None:
        """After requests with request- and response-level resources, gc finds 0 objects.

        A cycle (the request refers to its scope, the scope to the request) would
        keep each request's whole ASGI scope alive until a collection, and make
        every request pay for collections.
        """
        import gc

        resources = Resources()

        pool, conn = pool_and_connection(resources)

        @resources.request(release="after_response")
        async def stream(p: Annotated[str, Use(pool)]) -> AsyncIterator[str]:
            yield f"{p}/stream"

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(
            c: Annotated[str, Use(conn)], s: Annotated[str, Use(stream)]
        ) -> list[str]:
            return [c, s]

        async with LifespanManager(app) as manager:

            async def call() -> int:
                sent: list[MutableMapping[str, Any]] = []

                async def receive() -> MutableMapping[str, Any]:
                    return {"type": "http.request", "body": b"", "more_body": False}

                async def send(message: MutableMapping[str, Any]) -> None:
                    sent.append(message)

                scope = {
                    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                    "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/",
                    "root_path": "", "query_string": b"", "headers": [],
                    "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                    "state": dict(manager._state),
                }
                await manager.app(scope, receive, send)
                return int(sent[0]["status"])

            assert await call() == 200  # warm: the first request fills caches
            gc.collect()
            gc.disable()
            try:
                statuses = [await call() for _ in range(20)]
                found = gc.collect()
            finally:
                gc.enable()
        assert statuses == [200] * 20
        assert found == 0, f"{found} objects of 20 requests were only freed by the cyclic gc"


class Client:
    """A per-command pool client whose pool has run dry."""

    async def get(self) -> str:
        from scoped_resources.exceptions import ResourceBusy

        raise ResourceBusy("redis.client", 0.2)


def busy_client(resources: Resources) -> Resource[Client]:
    """An app resource lending a :class:`Client` that raises ResourceBusy when used."""

    @resources.app
    def client() -> Client:
        return Client()

    return client


class TestBusyInsideTheEndpoint:
    """A ResourceBusy raised while the endpoint uses a resource is a 503 too."""

    async def test_busy_from_an_app_resource_in_the_endpoint_answers_503(self) -> None:
        """A per-command pool running dry inside the route answers 503, not 500."""

        resources = Resources()

        client = busy_client(resources)

        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(c: Annotated[Client, Use(client)]) -> str:
            return await c.get()

        async with serve(app) as http:
            response = await http.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"

    @pytest.mark.parametrize("order", ["request_first", "app_first"])
    async def test_busy_from_an_app_resource_beside_request_resources_answers_503(
        self, order: str
    ) -> None:
        """With a request scope in the route too, in either order, the answer is 503 once."""

        journal = Journal()
        resources = Resources()
        tx = generator_resource(resources, journal, "tx")

        client = busy_client(resources)

        app = FastAPI(lifespan=resources.lifespan)

        if order == "request_first":

            @app.get("/")
            async def endpoint(
                t: Annotated[str, Use(tx)], c: Annotated[Client, Use(client)]
            ) -> str:
                return await c.get()

        else:

            @app.get("/")
            async def endpoint_app_first(
                c: Annotated[Client, Use(client)], t: Annotated[str, Use(tx)]
            ) -> str:
                return await c.get()

        async with serve(app) as http:
            response = await http.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert journal.events == ["acquire tx", "release tx after ResourceBusy"]

    async def test_busy_in_the_endpoint_rolls_back_request_resources(self) -> None:
        """The request's transaction sees the ResourceBusy as its outcome."""
        from scoped_resources.exceptions import ResourceBusy

        journal = Journal()
        resources = Resources()
        tx = generator_resource(resources, journal, "tx")
        app = FastAPI(lifespan=resources.lifespan)

        @app.get("/")
        async def endpoint(t: Annotated[str, Use(tx)]) -> str:
            raise ResourceBusy("http.client", 1.0)

        async with serve(app) as http:
            response = await http.get("/")
        assert response.status_code == 503
        assert journal.events == ["acquire tx", "release tx after ResourceBusy"]
