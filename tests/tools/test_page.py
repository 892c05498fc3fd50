"""The live resource page: what it shows under real PostgreSQL load, and who may see it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.postgres import Postgres
from scoped_resources.page import WAIT_SAMPLES, resource_page

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOKEN = "page-token-7f3a"
SECRET = "pw-s3cret-d41d"


def with_password(dsn: str, password: str) -> str:
    """*dsn* with *password* in its user-info (trust auth ignores it)."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}:{parts.port or 5432}"))


class Held:
    """Requests that hold a connection until the test lets them go."""

    def __init__(self, holders: int) -> None:
        self.holders = holders
        self.inside = 0
        self.all_inside = anyio.Event()
        self.go = anyio.Event()

    async def hold(self) -> None:
        self.inside += 1
        if self.inside == self.holders:
            self.all_inside.set()
        await self.go.wait()


def page_app(dsn: str, held: Held, **page: Any) -> tuple[FastAPI, Resources]:
    resources = Resources("paged", leak_after=None)
    pg = Postgres(resources, dsn, name="pg", min_size=1, max_size=2, acquire_timeout=20)

    @resources.request
    async def audit() -> AsyncIterator[None]:
        yield
        raise RuntimeError(f"audit could not be written to {dsn}")

    app = FastAPI(lifespan=resources.lifespan)
    app.include_router(resource_page(resources, gates=[pg.gate], **page))

    @app.get("/hold")
    async def hold(conn: Annotated[asyncpg.Connection, Use(pg.connection)]) -> int:
        await held.hold()
        return int(await conn.fetchval("SELECT 1"))

    @app.get("/quick")
    async def quick(conn: Annotated[asyncpg.Connection, Use(pg.connection)]) -> int:
        return int(await conn.fetchval("SELECT 2"))

    @app.get("/audited")
    async def audited(a: Annotated[None, Use(audit)]) -> str:
        return "done"

    return app, resources


@asynccontextmanager
async def client_for(
    app: FastAPI, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
            yield client, manager


def row(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The page's row for resource *name*."""
    return next(r for r in data["resources"] if r["name"] == name)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


class TestUnderLoad:
    """The JSON and the HTML show the leases held and the acquires waiting on a real pool."""

    async def test_held_leases_and_waiters_are_shown(self, pg_dsn: str) -> None:
        """Two requests hold the pool's two connections, two more wait: the page shows both."""
        held = Held(2)
        app, _ = page_app(
            with_password(pg_dsn, SECRET),
            held,
            token=TOKEN,
            ping_timeout=0.5,
            cache_ttl=0,
            slow_after=0.0,
        )
        async with client_for(app) as (client, _), anyio.create_task_group() as tg:
            answers: list[int] = []

            async def get(path: str) -> None:
                answers.append((await client.get(path)).status_code)

            for _ in range(4):
                tg.start_soon(get, "/hold")
            with anyio.fail_after(20):
                await held.all_inside.wait()
                while True:  # the two late requests queue at the pool's gate
                    data = (await client.get("/resources/data.json", headers=AUTH)).json()
                    if row(data, "pg.connection")["waiters"] == 2:
                        break
                    await anyio.lowlevel.checkpoint()
            conn_row = row(data, "pg.connection")
            assert conn_row["leases_in_use"] == 2
            gate = data["gates"][0]
            assert (gate["name"], gate["capacity"], gate["in_use"], gate["waiting"]) == (
                "pg.connection",
                2,
                2,
                2,
            )
            assert conn_row["scope"] == "request"
            assert row(data, "pg.pool")["owners_open"] == 1
            # The pool's ping needs a connection too: an exhausted pool is not ready.
            assert row(data, "pg.pool")["readiness"] == "TimeoutError: no answer in time"
            assert data["ready"] is False
            assert [(lease["resource"], lease["route"]) for lease in data["leases"]] == [
                ("pg.connection", "GET /hold"),
                ("pg.connection", "GET /hold"),
            ]
            assert all(lease["age_s"] >= 0 for lease in data["leases"])
            assert all(lease["slow"] for lease in data["leases"])  # slow_after=0
            page = await client.get("/resources", headers=AUTH)
            assert page.status_code == 200
            assert '<td data-key="leases_in_use">2</td>' in page.text
            assert '<td data-key="waiters">2</td>' in page.text
            assert page.text.count("<td>GET /hold</td>") == 2
            held.holders = 4
            held.go.set()
        assert answers == [200, 200, 200, 200]
        async with client_for(app) as (client, _):
            for _ in range(3):
                assert (await client.get("/quick")).status_code == 200
            data = (await client.get("/resources/data.json", headers=AUTH)).json()
        conn_row = row(data, "pg.connection")
        assert conn_row["leases_in_use"] == 0
        assert conn_row["waiters"] == 0
        assert conn_row["acquires"] == 7
        assert conn_row["wait_samples"] == 7
        assert conn_row["wait_p50_ms"] is not None
        assert conn_row["wait_p99_ms"] >= conn_row["wait_p50_ms"]
        assert data["leases"] == []
        assert row(data, "pg.pool")["readiness"] == "ok"
        assert data["ready"] is True

    async def test_release_failures_are_listed_with_route_and_no_secret(self, pg_dsn: str) -> None:
        """A failed release appears with its route; neither page shows the DSN password."""
        dsn = with_password(pg_dsn, SECRET)
        app, _ = page_app(dsn, Held(1), token=TOKEN)
        async with client_for(app) as (client, _):
            assert (await client.get("/audited")).status_code == 500
            data = await client.get("/resources/data.json", headers=AUTH)
            page = await client.get("/resources", headers=AUTH)
        failures = data.json()["release_failures"]
        assert [(f["resource"], f["outcome"], f["route"]) for f in failures] == [
            ("audit", "failed", "GET /audited")
        ]
        assert row(data.json(), "audit")["release_failures"] == 1
        assert "<td>audit</td><td>failed</td><td>GET /audited</td>" in page.text
        for text in (data.text, page.text):
            assert SECRET not in text

    async def test_a_failing_ping_is_shown_redacted(self, pg_dsn: str) -> None:
        """A ping error that quotes a DSN reaches the page with its password masked."""
        resources = Resources("pings")
        dsn = with_password(pg_dsn, SECRET)

        async def ping(value: object) -> None:
            raise ConnectionError(f"cannot reach {dsn}")

        @resources.app(ping=ping)
        async def upstream() -> str:
            return "up"

        app = FastAPI(lifespan=resources.lifespan)
        app.include_router(resource_page(resources, token=TOKEN))
        async with client_for(app) as (client, _):
            data = (await client.get("/resources/data.json", headers=AUTH)).json()
        assert data["ready"] is False
        assert row(data, "upstream")["readiness"].startswith("ConnectionError: cannot reach")
        assert ":***@" in row(data, "upstream")["readiness"]
        assert SECRET not in str(data)


class TestAccess:
    """Without the token the page answers 401; off loopback (when so configured) 403."""

    @pytest.fixture
    def app(self) -> FastAPI:
        resources = Resources("guarded")

        @resources.app
        async def thing() -> int:
            return 1

        app = FastAPI(lifespan=resources.lifespan)
        app.include_router(resource_page(resources, token=TOKEN, loopback_only=True))
        return app

    @pytest.mark.parametrize("path", ["/resources", "/resources/data.json"])
    async def test_no_or_wrong_token_is_401(self, app: FastAPI, path: str) -> None:
        """A missing or wrong token gets 401 with a Bearer challenge and no data."""
        async with client_for(app) as (client, _):
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                answer = await client.get(path, headers=headers)
                assert answer.status_code == 401
                assert answer.headers["www-authenticate"] == "Bearer"
                assert "thing" not in answer.text

    async def test_token_in_header_or_query_is_accepted(self, app: FastAPI) -> None:
        """The token works as a Bearer header and as ``?token=`` (for a browser)."""
        async with client_for(app) as (client, _):
            assert (await client.get("/resources", headers=AUTH)).status_code == 200
            answer = await client.get("/resources/data.json", params={"token": TOKEN})
            assert answer.status_code == 200
            assert answer.headers["cache-control"] == "no-store"
            assert row(answer.json(), "thing")["owners_open"] == 1

    @pytest.mark.parametrize("path", ["/resources", "/resources/data.json", "/resources/page.js"])
    async def test_non_loopback_client_is_403_even_with_the_token(
        self, app: FastAPI, path: str
    ) -> None:
        """A client on 10.0.0.7 is refused although it sends the right token."""
        async with client_for(app, host="10.0.0.7") as (client, _):
            answer = await client.get(path, headers=AUTH)
            assert answer.status_code == 403

    async def test_non_loopback_client_with_token_when_not_loopback_only(self) -> None:
        """With loopback_only=False a remote client with the token is served."""
        resources = Resources("remote")
        app = FastAPI(lifespan=resources.lifespan)
        app.include_router(resource_page(resources, token=TOKEN, loopback_only=False))
        async with client_for(app, host="10.0.0.7") as (client, _):
            assert (await client.get("/resources/data.json", headers=AUTH)).status_code == 200
            assert (await client.get("/resources/data.json")).status_code == 401

    async def test_assets_are_served_by_the_package(self, app: FastAPI) -> None:
        """The script and the style sheet come from the package, with no token needed."""
        async with client_for(app) as (client, _):
            script = await client.get("/resources/page.js")
            style = await client.get("/resources/page.css")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "data.json" not in script.text or "fetch(" in script.text
        assert style.status_code == 200
        assert "http" not in style.text  # nothing fetched from elsewhere

    def test_page_without_token_or_loopback_is_refused(self) -> None:
        """A page open to anyone cannot be made."""
        with pytest.raises(ValueError, match="token or loopback_only"):
            resource_page(Resources(), token=None, loopback_only=False)
        with pytest.raises(ValueError, match="empty"):
            resource_page(Resources(), token="")

    async def test_registry_without_a_page_records_nothing(self) -> None:
        """Only a page adds an observer: a registry without one keeps none."""
        resources = Resources("plain")
        assert resources.observers == []
        resource_page(resources)
        assert len(resources.observers) == 1


def test_wait_samples_are_bounded() -> None:
    """The percentile reservoir keeps a fixed number of samples per resource."""
    from scoped_resources.page import PageObserver

    observer = PageObserver()
    resources = Resources("bounded")

    @resources.request
    async def thing() -> int:
        return 1

    for _ in range(WAIT_SAMPLES * 3):
        observer.acquire_started(thing)
        observer.acquired(thing, 0.001)
    assert len(observer.stats["thing"].waits) == WAIT_SAMPLES
    assert observer.stats["thing"].acquires == WAIT_SAMPLES * 3
