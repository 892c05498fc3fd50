"""The HTTP contract of the service, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .conftest import PROBLEM, Running, scalar

pytestmark = pytest.mark.anyio


class TestProbes:
    async def test_healthz_answers_ok(self, service: Running) -> None:
        """/healthz answers 200 without touching any resource."""
        response = await service.client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    async def test_readyz_reports_every_pinged_resource(self, service: Running) -> None:
        """/readyz pings each resource with a ping hook and answers 200 when all are up."""
        response = await service.client.get("/readyz")
        assert response.status_code == 200, response.text
        checks = response.json()["checks"]
        assert checks["db.engine"] == "ok"
        assert checks["files.directory"] == "ok"
        if service.settings.redis_url:
            assert checks["redis"] == "ok"
        if service.settings.amqp_url:
            assert checks["rabbitmq"] == "ok"
            assert checks["outbox_relay"] == "ok"

    async def test_readyz_names_the_failing_resource(self, service: Running) -> None:
        """/readyz answers 503 naming the resource whose ping failed."""
        service.settings.files_dir.rmdir()
        response = await service.client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["detail"] == "not ready: files.directory"


class TestUsers:
    async def test_created_user_can_be_read_back(self, service: Running) -> None:
        """POST /users answers 201 and GET /users/{id} returns the same user."""
        created = await service.client.post("/users", json={"name": "Ann", "email": "ann@x.io"})
        assert created.status_code == 201
        user = created.json()
        assert user == {"id": user["id"], "name": "Ann", "email": "ann@x.io"}
        fetched = await service.client.get(f"/users/{user['id']}")
        assert fetched.status_code == 200
        assert fetched.json() == user

    async def test_missing_user_is_404_problem(self, service: Running) -> None:
        """A missing user is a 404 problem document, not a 200 with an error field."""
        response = await service.client.get("/users/987654321")
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["detail"] == "user 987654321 does not exist"

    async def test_duplicate_email_is_409(self, service: Running) -> None:
        """A second user with the same email is refused with 409."""
        body = {"name": "Bo", "email": "bo@x.io"}
        assert (await service.client.post("/users", json=body)).status_code == 201
        again = await service.client.post("/users", json=body)
        assert again.status_code == 409
        assert "already exists" in again.json()["detail"]

    async def test_sql_looking_input_is_stored_verbatim(self, service: Running) -> None:
        """Quotes and SQL in a name are data: stored as given, and the table survives."""
        name = "x'); DROP TABLE users; --"
        created = await service.client.post("/users", json={"name": name, "email": "q@x.io"})
        assert created.status_code == 201
        fetched = await service.client.get(f"/users/{created.json()['id']}")
        assert fetched.json()["name"] == name
        assert await scalar(service.settings, "SELECT count(*) FROM users") >= 1


class TestBadInput:
    @pytest.mark.parametrize(
        "path",
        [
            "/users/abc",
            "/users/0",
            "/users/-1",
            "/users/9223372036854775808",
            "/users/99999999999999999999999999",
            "/items/1e3/enriched",
        ],
    )
    async def test_bad_ids_are_422(self, service: Running, path: str) -> None:
        """Non-numeric, non-positive and beyond-int64 ids are refused before any query."""
        response = await service.client.get(path)
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["detail"]

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b'{"name": 1e999}', "valid string"),
            (b'{"name": NaN}', "valid string"),
            (b'{"name": "x", "extra": 1}', "Extra inputs"),
            (b'{"name": ""}', "at least 1"),
            (b'{"name": "' + b"x" * 101 + b'"}', "at most 100"),
            (b'{"name": "a\\u0000b"}', "NUL"),
            (b'{"name": "\\ud800"}', "unicode"),
            (b'{"name": ', "JSON"),
            (b"[]", "valid dictionary"),
        ],
    )
    async def test_invalid_item_bodies_are_422_with_a_reason(
        self, service: Running, body: bytes, reason: str
    ) -> None:
        """Each kind of bad JSON body is a 422 whose detail says what is wrong."""
        response = await service.client.post(
            "/items", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        assert reason.lower() in response.json()["detail"].lower()

    async def test_invalid_email_is_422(self, service: Running) -> None:
        """An email without a domain is refused."""
        response = await service.client.post("/users", json={"name": "C", "email": "nope"})
        assert response.status_code == 422
        assert "email" in response.json()["detail"]

    async def test_oversized_json_is_413(self, service: Running) -> None:
        """A JSON body over the limit is refused with 413 before it is parsed."""
        big = b'{"name": "' + b"x" * (service.settings.max_json_bytes + 1) + b'"}'
        response = await service.client.post(
            "/items", content=big, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM

    async def test_oversized_chunked_json_is_413(self, service: Running) -> None:
        """A chunked body (no Content-Length) is cut off at the limit with 413."""

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"name": "'
            for _ in range(service.settings.max_json_bytes // 1024 + 1):
                yield b"x" * 1024
            yield b'"}'

        response = await service.client.post(
            "/items", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413

    @pytest.mark.parametrize(
        "query", ["limit=0", "limit=101", "limit=abc", "offset=-1", "offset=99999999999999999999"]
    )
    async def test_out_of_range_paging_is_422(self, service: Running, query: str) -> None:
        """limit must be 1-100 and offset a non-negative int64."""
        response = await service.client.get(f"/items?{query}")
        assert response.status_code == 422

    async def test_unknown_route_is_404_problem(self, service: Running) -> None:
        """Even the router's own 404 is a problem document."""
        response = await service.client.get("/nope")
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM


class TestItems:
    async def test_create_item_writes_item_and_log_together(self, service: Running) -> None:
        """POST /items answers 201 and stores the item and one log row for it."""
        response = await service.client.post("/items", json={"name": "lamp"})
        assert response.status_code == 201
        item = response.json()
        assert item["name"] == "lamp"
        count = await scalar(
            service.settings, "SELECT count(*) FROM logs WHERE item_id = :i", i=item["id"]
        )
        assert count == 1

    async def test_list_is_paged_in_id_order(self, service: Running) -> None:
        """GET /items returns items in id order, limit at a time from offset."""
        ids = [
            (await service.client.post("/items", json={"name": f"n{i}"})).json()["id"]
            for i in range(5)
        ]
        everything = (await service.client.get("/items?limit=100")).json()
        all_ids = [item["id"] for item in everything]
        start = all_ids.index(ids[0])
        page = (await service.client.get(f"/items?limit=2&offset={start + 1}")).json()
        assert [item["id"] for item in page] == ids[1:3]

    async def test_failed_commit_is_5xx_and_stores_nothing(
        self, service: Running, commit_fails_for_poison: None
    ) -> None:
        """When the COMMIT fails, the answer is 5xx and neither item nor log row exist."""
        items_before = await scalar(service.settings, "SELECT count(*) FROM items")
        logs_before = await scalar(service.settings, "SELECT count(*) FROM logs")
        response = await service.client.post("/items", json={"name": "poison"})
        assert response.status_code >= 500
        assert response.headers["content-type"] == PROBLEM
        assert await scalar(service.settings, "SELECT count(*) FROM items") == items_before
        assert await scalar(service.settings, "SELECT count(*) FROM logs") == logs_before
        # the service still works afterwards
        assert (await service.client.post("/items", json={"name": "fine"})).status_code == 201


class TestCache:
    async def test_cached_value_can_be_read(self, service: Running) -> None:
        """POST /cache/{key} answers {"msg": "cached"} and GET returns the value."""
        stored = await service.client.post("/cache/greeting", params={"value": "hi"})
        assert stored.status_code == 200
        assert stored.json() == {"msg": "cached"}
        fetched = await service.client.get("/cache/greeting")
        assert fetched.json() == {"key": "greeting", "value": "hi"}

    async def test_missing_key_is_404(self, service: Running) -> None:
        """An unknown key is a 404 problem."""
        response = await service.client.get("/cache/never-set")
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM

    async def test_value_expires_after_its_ttl(self, service: Running) -> None:
        """A value stored with ttl=1 is gone a little after one second."""
        await service.client.post("/cache/short", params={"value": "v", "ttl": 1})
        assert (await service.client.get("/cache/short")).status_code == 200
        await anyio_sleep(1.2)  # waiting for time itself to pass, not for another task
        assert (await service.client.get("/cache/short")).status_code == 404

    @pytest.mark.parametrize("query", ["ttl=0", "ttl=99999999", "ttl=x", ""])
    async def test_bad_cache_writes_are_422(self, service: Running, query: str) -> None:
        """ttl must be 1 s to 30 days and value is required."""
        response = await service.client.post(f"/cache/k?{query}")
        assert response.status_code == 422

    async def test_combo_counts_logs_and_records_the_access(self, service: Running) -> None:
        """GET /combo returns the log count and stores the access time in the cache."""
        await service.client.post("/items", json={"name": "for-combo"})
        logs = await scalar(service.settings, "SELECT count(*) FROM logs")
        first = (await service.client.get("/combo")).json()
        assert first["logs"] == logs
        cached = (await service.client.get("/cache/combo:last_access")).json()["value"]
        second = (await service.client.get("/combo")).json()
        assert second["previous_access"] == first["last_access"]
        assert cached.startswith(first["last_access"][:19])


async def anyio_sleep(seconds: float) -> None:
    """Sleep on the running loop."""
    import anyio

    await anyio.sleep(seconds)
