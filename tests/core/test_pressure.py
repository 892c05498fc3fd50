"""Under pressure: abandoned requests stop, deadlines bound requests, readiness, leaks, metrics."""

# No "from __future__ import annotations": FastAPI must see the real annotations.

import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import BaseModel

from scoped_resources import Resources, Use
from scoped_resources.fastapi import health_routes, run_to_completion
from scoped_resources.metrics import Observer

from .helpers import Journal, generator_resource

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Cancelling abandoned requests uses asyncio tasks, as uvicorn runs them."""
    return "asyncio"


class Exchange:
    """Drives one HTTP request through an ASGI app by hand, disconnect included."""

    def __init__(self, method: str, path: str, body: bytes = b"") -> None:
        headers = [(b"content-length", str(len(body)).encode())] if body else []
        if body:
            headers.append((b"content-type", b"application/json"))
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        self.body = body
        self.body_sent = False
        self.gone = anyio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(dict(message))

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None


async def run(app: FastAPI, exchange: Exchange, state: dict[str, Any]) -> None:
    await app({**exchange.scope, "state": dict(state)}, exchange.receive, exchange.send)


def slow_app(journal: Journal, resources: Resources, started: anyio.Event) -> FastAPI:
    tx = generator_resource(resources, journal, "tx")
    app = FastAPI(lifespan=resources.lifespan)

    @app.get("/slow")
    async def slow(t: Annotated[str, Use(tx)]) -> str:
        started.set()
        await anyio.sleep_forever()
        return t

    class Item(BaseModel):
        name: str

    @app.post("/slow")
    async def slow_post(item: Item, t: Annotated[str, Use(tx)]) -> str:
        started.set()
        await anyio.sleep_forever()
        return item.name

    finish = anyio.Event()
    app.state.finish = finish

    @app.get("/finishable")
    async def finishable(t: Annotated[str, Use(tx)]) -> str:
        started.set()
        await finish.wait()
        journal.add("finished anyway")
        return t

    @app.get("/important")
    @run_to_completion
    async def important(t: Annotated[str, Use(tx)]) -> str:
        started.set()
        await finish.wait()
        journal.add("finished anyway")
        return t

    return app


class TestAbandonedRequests:
    """A client that disconnects stops its request and frees its resources at once."""

    @pytest.mark.parametrize(("method", "body"), [("GET", b""), ("POST", b'{"name": "x"}')])
    async def test_a_disconnect_cancels_the_handler_and_rolls_back(
        self, method: str, body: bytes
    ) -> None:
        """The handler is cancelled and the transaction sees the cancellation."""
        journal, resources, started = Journal(), Resources(), anyio.Event()
        app = slow_app(journal, resources, started)
        exchange = await disconnect_during(app, Exchange(method, "/slow", body), started)
        assert journal.events == ["acquire tx", "release tx after CancelledError"]
        assert exchange.status == 499

    async def test_run_to_completion_keeps_working_after_a_disconnect(self) -> None:
        """A route marked run_to_completion finishes and commits."""
        journal, resources, started = Journal(), Resources(), anyio.Event()
        app = slow_app(journal, resources, started)
        exchange = await disconnect_during(app, Exchange("GET", "/important"), started, hold=0.2)
        assert journal.events == ["acquire tx", "finished anyway", "release tx"]
        assert exchange.status == 200

    async def test_disconnect_cancellation_can_be_turned_off(self) -> None:
        """With cancel_on_disconnect=False the handler is left alone."""
        journal, started = Journal(), anyio.Event()
        resources = Resources(cancel_on_disconnect=False)
        app = slow_app(journal, resources, started)
        await disconnect_during(app, Exchange("GET", "/finishable"), started, hold=0.2)
        assert journal.events[-2:] == ["finished anyway", "release tx"]

    async def test_fast_requests_are_not_watched(self) -> None:
        """Before watch_disconnect_after no watcher runs, so a fast request pays no task."""
        journal, started = Journal(), anyio.Event()
        resources = Resources(watch_disconnect_after=60)
        app = slow_app(journal, resources, started)
        await disconnect_during(app, Exchange("GET", "/finishable"), started, hold=0.2)
        assert journal.events[-2:] == ["finished anyway", "release tx"]


async def disconnect_during(
    app: FastAPI, exchange: Exchange, started: anyio.Event, *, hold: float | None = None
) -> Exchange:
    """Run *exchange*; once its handler started, the client goes away.

    With *hold*, the handler is let finish that many seconds later: longer than the
    default 50 ms watch delay, so only a request that is not watched survives.
    """
    async with LifespanManager(app) as manager:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, app, exchange, manager._state)
                await started.wait()
                exchange.gone.set()
                if hold is not None:
                    await anyio.sleep(hold)
                    app.state.finish.set()
    return exchange


class TestRequestDeadline:
    """request_timeout bounds a whole request."""

    async def test_a_request_past_its_deadline_answers_503_and_rolls_back(self) -> None:
        """The handler is cancelled at the deadline; the client gets 503 with Retry-After."""
        journal, started = Journal(), anyio.Event()
        resources = Resources(request_timeout=0.05)
        app = slow_app(journal, resources, started)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                with anyio.fail_after(5):
                    response = await client.get("/slow")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "0.05 s deadline" in response.json()["detail"]
        assert journal.events == ["acquire tx", "release tx after CancelledError"]


class TestReadiness:
    """Readiness pings resources concurrently, caches the answer, and fails when draining."""

    def app_with(self, resources: Resources) -> FastAPI:
        app = FastAPI(lifespan=resources.lifespan)
        app.include_router(health_routes(resources, ping_timeout=0.5, cache_ttl=60))
        return app

    async def test_ready_when_every_ping_answers(self) -> None:
        """200 when every resource answers; liveness needs nothing."""
        resources = Resources()
        pings: list[str] = []

        async def ping(value: str) -> None:
            pings.append(value)

        resources.app(name="db", ping=ping)(lambda: "db")
        app = self.app_with(resources)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/healthz")).json() == {"status": "ok"}
                ready = (await client.get("/readyz")).json()
                assert ready == {"status": "ready", "checks": {"db": "ok"}}
        assert pings == ["db"]

    async def test_a_failing_ping_answers_503_naming_the_resource(self) -> None:
        """503 problem+json lists the failing resources and why."""
        resources = Resources()

        async def broken(value: str) -> None:
            raise ConnectionError("connection refused")

        resources.app(name="cache", ping=broken)(lambda: "cache")
        app = self.app_with(resources)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "not ready: cache"
        assert response.json()["checks"] == {"cache": "ConnectionError: connection refused"}

    async def test_a_burst_of_probes_pings_once(self) -> None:
        """Twenty concurrent probes share one ping round."""
        resources = Resources()
        calls = 0

        async def ping(value: str) -> None:
            nonlocal calls
            calls += 1
            await anyio.sleep(0.01)

        resources.app(name="db", ping=ping)(lambda: "db")
        app = self.app_with(resources)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            client = httpx.AsyncClient(transport=transport, base_url="http://t")
            async with client, anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(client.get, "/readyz")
        assert calls == 1

    async def test_not_ready_while_starting_or_draining(self) -> None:
        """Without an open app scope, or once it is draining, readiness is 503."""
        resources = Resources()
        resources.app(name="db")(lambda: "db")
        app = self.app_with(resources)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            starting = await client.get("/readyz")
        assert starting.status_code == 503
        assert "starting" in starting.json()["detail"]
        async with resources.open() as app_scope:
            app_scope._drained = anyio.Event()  # what shutdown sets while it drains
            scope = {"state": {resources.state_key: app_scope}}
            draining = await _get(app, "/readyz", scope)
        assert draining["status"] == 503


async def _get(app: FastAPI, path: str, extra: dict[str, Any]) -> dict[str, Any]:
    exchange = Exchange("GET", path)
    exchange.gone.set()
    await app({**exchange.scope, **extra}, exchange.receive, exchange.send)
    return {"status": exchange.status}


class TestLeakReports:
    """A lease held too long is reported with its resource, route and acquisition site."""

    async def test_a_long_held_lease_is_reported_with_where_it_was_acquired(self) -> None:
        """In debug mode the report shows the stack that acquired it."""
        resources = Resources(debug=True, leak_after=None)
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope, app_scope.child("job") as scope:
            await scope.get(conn)
            (report,) = app_scope.report_leaks(after=0)
            assert app_scope.report_leaks(after=0) == []  # reported once
        assert "'conn' has been held for" in report
        assert "scope 'job'" in report
        assert "test_a_long_held_lease_is_reported" in report

    async def test_the_watchdog_logs_leaks_by_itself(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With leak_after set, the app scope reports without being asked."""
        caplog.set_level(logging.WARNING, "scoped_resources")
        resources = Resources(leak_after=0.02)
        journal = Journal()
        conn = generator_resource(resources, journal, "conn")
        async with resources.open() as app_scope, app_scope.child("slow job") as scope:
            await scope.get(conn)
            with anyio.fail_after(5):
                while "'conn' has been held" not in caplog.text:
                    await anyio.sleep(0.01)
        assert "scope 'slow job'" in caplog.text

    async def test_a_request_lease_report_names_the_route(self) -> None:
        """Leases of a request name the route that holds them."""
        journal, resources, started = Journal(), Resources(leak_after=None), anyio.Event()
        app = slow_app(journal, resources, started)
        reports: list[str] = []
        async with LifespanManager(app) as manager:
            exchange = Exchange("GET", "/slow")
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run, app, exchange, manager._state)
                    await started.wait()
                    app_scope = manager._state[resources.state_key]
                    reports = app_scope.report_leaks(after=0)
                    exchange.gone.set()
        assert any("(GET /slow)" in report for report in reports)


class Recorder(Observer):
    """Records every event it is told about."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def acquire_started(self, resource: Any) -> None:
        self.events.append(f"wait {resource.name}")

    def acquired(self, resource: Any, seconds: float) -> None:
        self.events.append(f"acquired {resource.name}")

    def acquire_failed(self, resource: Any, seconds: float, busy: bool) -> None:
        self.events.append(f"failed {resource.name} busy={busy}")

    def released(self, resource: Any, seconds: float, outcome: str) -> None:
        self.events.append(f"released {resource.name} {outcome}")

    def terminated(self, resource: Any) -> None:
        self.events.append(f"terminated {resource.name}")


class TestObservers:
    """Observers see every acquire and release; Prometheus and OpenTelemetry get metrics."""

    def declare(self, resources: Resources) -> Any:
        journal = Journal()
        generator_resource(resources, journal, "pool", scope="app")
        conn = generator_resource(resources, journal, "conn")

        @resources.request(acquire_timeout=0.01)
        async def exhausted() -> str:
            await anyio.sleep_forever()
            return "never"

        @resources.request(release_timeout=0.01, terminate=lambda value: None)
        async def stuck() -> AsyncIterator[str]:
            yield "stuck"
            await anyio.sleep_forever()

        return conn, exhausted, stuck

    async def exercise(self, resources: Resources) -> None:
        from scoped_resources.exceptions import ReleaseFailed, ResourceBusy

        conn, exhausted, stuck = self.declare(resources)
        async with resources.open() as app_scope:
            with pytest.raises(ReleaseFailed):
                async with app_scope.child() as scope:
                    await scope.get(conn)
                    with pytest.raises(ResourceBusy):
                        await scope.get(exhausted)
                    await scope.get(stuck)

    async def test_an_observer_sees_the_lifecycle_in_order(self) -> None:
        """Waits, acquisitions, failures, releases and terminations arrive in order."""
        recorder = Recorder()
        await self.exercise(Resources(observers=[recorder]))
        assert recorder.events == [
            "wait pool",
            "acquired pool",
            "wait conn",
            "acquired conn",
            "wait exhausted",
            "failed exhausted busy=True",
            "wait stuck",
            "acquired stuck",
            "released stuck timeout",
            "terminated stuck",
            "released conn ok",
            "released pool ok",
        ]

    async def test_prometheus_metrics_count_per_resource(self) -> None:
        """Gauges return to zero; timeouts, failures and terminations are counted."""
        from prometheus_client import CollectorRegistry

        from scoped_resources.metrics import PrometheusMetrics

        registry = CollectorRegistry()
        await self.exercise(Resources(observers=[PrometheusMetrics(registry)]))

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(f"scoped_resources_{name}", labels)

        assert value("leases_in_use", resource="conn") == 0
        assert value("owners_open", resource="pool") == 0
        assert value("waiters", resource="exhausted") == 0
        assert value("acquire_timeouts_total", resource="exhausted") == 1
        assert value("release_failures_total", resource="stuck", outcome="timeout") == 1
        assert value("terminations_total", resource="stuck") == 1
        assert value("acquire_seconds_count", resource="conn") == 1

    async def test_opentelemetry_gets_metrics_and_spans(self) -> None:
        """Each acquire and release is a span; counters and histograms are recorded."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from scoped_resources.metrics import OpenTelemetryMetrics

        reader = InMemoryMetricReader()
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        observer = OpenTelemetryMetrics(MeterProvider(metric_readers=[reader]), tracer_provider)
        await self.exercise(Resources(observers=[observer]))
        names = [span.name for span in exporter.get_finished_spans()]
        assert names[:2] == ["acquire pool", "acquire conn"]
        assert "release stuck" in names
        data = reader.get_metrics_data()
        assert data is not None
        metrics = {
            metric.name
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        assert {
            "scoped_resources.acquire.timeouts",
            "scoped_resources.release.failures",
            "scoped_resources.terminations",
            "scoped_resources.leases.in_use",
        } <= metrics


class TestSweeper:
    """The per-app sweeper keeps watching even when one request's check fails."""

    async def test_a_failing_check_is_logged_and_the_next_request_is_watched(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One broken tick drops that watch only; a later disconnect still cancels."""
        import scoped_resources.fastapi as integration

        real_body_done = integration._body_done
        calls = 0

        def broken_once(request: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("broken check")
            return real_body_done(request)

        monkeypatch.setattr(integration, "_body_done", broken_once)
        journal, resources = Journal(), Resources()
        first_started = anyio.Event()
        app = slow_app(journal, resources, first_started)
        async with LifespanManager(app) as manager:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    first = Exchange("GET", "/finishable")
                    tg.start_soon(run, app, first, manager._state)
                    await first_started.wait()
                    first.gone.set()
                    await anyio.sleep(0.2)  # its watch broke: it is not cancelled
                    app.state.finish.set()
            second = Exchange("GET", "/slow")
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run, app, second, manager._state)
                    await anyio.sleep(0.01)
                    second.gone.set()
        assert "watching a request failed" in caplog.text
        assert second.status == 499
