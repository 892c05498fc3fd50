"""Hostile input: a schemathesis run and a list of hostile payloads; zero 5xx."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from scoped_resources.testing import TempPostgres
from tests.service.upstream import FakeUpstream

from ._harness import Service, dirty_lines, fetchval, report, running_service

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.anyio]

EXAMPLES_PER_OPERATION = 25
UPLOAD_LIMIT = 4096

_DEEP = "[" * 100_000 + "]" * 100_000
_BIG = "x" * 60_000

#: (method, path, keyword arguments for httpx): each must be answered below 500.
HOSTILE: list[tuple[str, str, dict[str, Any]]] = [
    # bodies that are not what they claim
    ("POST", "/items", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("POST", "/items", {"content": b"", "headers": {"content-type": "application/json"}}),
    (
        "POST",
        "/items",
        {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": _DEEP.encode(), "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'{"name": 1e999}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'{"name": NaN}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'{"name": "\\ud800"}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'{"name": "a\\u0000b"}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'{"name": "a", "name": "b"}', "headers": {"content-type": "application/json"}},
    ),
    (
        "POST",
        "/items",
        {"content": b'"just a string"', "headers": {"content-type": "application/json"}},
    ),
    ("POST", "/items", {"content": b"[1, 2, 3]", "headers": {"content-type": "application/json"}}),
    ("POST", "/items", {"content": b"null", "headers": {"content-type": "application/json"}}),
    (
        "POST",
        "/items",
        {"content": b"name=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
    ),
    (
        "POST",
        "/items",
        {
            "content": b'{"name":"x"}',
            "headers": {"content-type": "application/json; charset=utf-32"},
        },
    ),
    ("POST", "/items", {"content": b'{"name":"x"}', "headers": {"content-type": "text/plain"}}),
    ("POST", "/items", {"json": {"name": "x", "extra": 1}}),
    ("POST", "/items", {"json": {"name": "x" * 101}}),
    ("POST", "/items", {"json": {"name": _BIG}}),
    ("POST", "/items", {"json": {"name": ""}}),
    ("POST", "/items", {"json": {"name": None}}),
    ("POST", "/items", {"json": {"name": ["x"]}}),
    ("POST", "/items", {"json": {"name": {"$gt": ""}}}),
    ("POST", "/items", {"content": b'{"name":"' + b"x" * 200_000 + b'"}'}),
    # strings that are attacks elsewhere: stored as text, harmless
    ("POST", "/items", {"json": {"name": "'; DROP TABLE items; --"}}),
    ("POST", "/items", {"json": {"name": "%s%s%s%n"}}),
    ("POST", "/items", {"json": {"name": "{{7*7}}${7*7}"}}),
    ("POST", "/items", {"json": {"name": "\u202e\ufeff\U0001f4a9"}}),
    ("POST", "/users", {"json": {"name": "x", "email": "not an email"}}),
    ("POST", "/users", {"json": {"name": "x", "email": "a@b.c" + "c" * 300}}),
    ("POST", "/users", {"json": {"name": "x", "email": "a\x00@b.co"}}),
    # numbers and ids out of range
    ("GET", "/items", {"params": {"limit": "-1"}}),
    ("GET", "/items", {"params": {"limit": "1e309"}}),
    ("GET", "/items", {"params": {"limit": "NaN"}}),
    ("GET", "/items", {"params": {"limit": "99999999999999999999999999"}}),
    ("GET", "/items", {"params": {"offset": str(2**63)}}),
    ("GET", "/items", {"params": {"offset": "-1"}}),
    ("GET", "/items", {"params": {"limit": ["1", "2"]}}),
    ("GET", "/users/0", {}),
    ("GET", "/users/-1", {}),
    ("GET", f"/users/{2**63}", {}),
    ("GET", f"/users/{2**63 - 1}", {}),
    ("GET", "/users/1e3", {}),
    ("GET", "/users/%00", {}),
    ("GET", "/users/" + "9" * 5000, {}),
    ("GET", f"/items/{2**64}/enriched", {}),
    # cache keys and values
    ("GET", "/cache/%2e%2e%2f%2e%2e", {}),
    ("GET", "/cache/" + "k" * 201, {}),
    ("GET", "/cache/%C3%A9", {}),
    ("POST", "/cache/k", {"params": {"value": "a\x00b"}}),
    ("POST", "/cache/k?value=%ED%A0%80", {}),  # a lone surrogate, as UTF-8 bytes
    ("POST", "/cache/k?value=%FF%FE", {}),  # not UTF-8 at all
    ("POST", "/cache/k", {"params": {"value": "v", "ttl": "0"}}),
    ("POST", "/cache/k", {"params": {"value": "v", "ttl": str(2**70)}}),
    ("POST", "/cache/k", {"params": {"value": "v" * 5000}}),
    ("POST", "/cache/k*", {"params": {"value": "v"}}),
    # files: traversal, odd names, bad multipart, too large
    ("GET", "/files/..%2f..%2fetc%2fpasswd", {}),
    ("GET", "/files/%2e%2e", {}),
    ("GET", "/files/a%5cb", {}),
    ("GET", "/files/%00", {}),
    ("GET", "/files/" + "a" * 500, {}),
    ("POST", "/files", {"files": {"file": ("../../escape.txt", b"x")}}),
    ("POST", "/files", {"files": {"file": ("a\x00b.txt", b"x")}}),
    ("POST", "/files", {"files": {"file": ("", b"x")}}),
    ("POST", "/files", {"files": {"file": (".", b"x")}}),
    ("POST", "/files", {"files": {"file": ("/etc/passwd", b"x")}}),
    ("POST", "/files", {"files": {"file": ("big.bin", b"x" * (UPLOAD_LIMIT * 3))}}),
    ("POST", "/files", {"files": {"other": ("a.txt", b"x")}}),
    (
        "POST",
        "/files",
        {"content": b"--b\r\nnot multipart", "headers": {"content-type": "multipart/form-data"}},
    ),
    (
        "POST",
        "/files",
        {
            "content": b"--b\r\nContent-Disposition: form-data; "
            b'name="file"; filename="a"\r\n\r\nabc',  # never ends
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
    ),
    (
        "POST",
        "/files",
        {
            "content": b"x" * 100,
            "headers": {"content-type": "multipart/form-data; boundary=" + "b" * 5000},
        },
    ),
    # methods and headers
    ("DELETE", "/items", {}),
    ("PATCH", "/users/1", {}),
    ("TRACE", "/", {}),
    ("GET", "/healthz", {"headers": {"authorization": "Bearer " + "x" * 8000}}),
    ("POST", "/items", {"json": {"name": "x"}, "headers": {"authorization": "Basic \x7f\x7f"}}),
]

#: Raw requests that no HTTP client would send.
RAW: list[bytes] = [
    b"POST /items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
    b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n{}",
    b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"GET /items?limit=%ZZ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
    b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 99999999999999999999\r\n\r\n{}",
]


def _schemathesis_run(url: str) -> Counter[int]:
    """Every operation of the service's schema, valid and invalid inputs: the statuses."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    schema.config.base_url = url
    statuses: Counter[int] = Counter()
    for path, methods in schema.raw_schema["paths"].items():
        for method, spec in methods.items():
            for mode in schemathesis.GenerationMode:
                if mode is schemathesis.GenerationMode.NEGATIVE and not (
                    spec.get("parameters") or spec.get("requestBody")
                ):
                    continue  # nothing to make invalid
                strategy = schema[path][method.upper()].as_strategy(generation_mode=mode)

                @given(case=strategy)
                @settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    derandomize=True,
                    database=None,
                )
                def run(case: schemathesis.Case[Any]) -> None:
                    statuses[case.call(timeout=10).status_code] += 1

                run()
    return statuses


async def _raw(svc: Service, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    try:
        writer.write(data)
        await writer.drain()
        with anyio.fail_after(10):
            line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(line.split()[1]) if line else 0


class TestHostileInput:
    """No input, valid or not, gets a 5xx from the service."""

    @pytest.mark.timeout(120)
    async def test_no_hostile_input_causes_a_server_error(
        self, service_env: dict[str, str], fault_db: TempPostgres, tmp_path: Path
    ) -> None:
        """The schemathesis run and the hostile list answer zero 5xx; the tables survive."""
        service_env["MAX_UPLOAD_BYTES"] = str(UPLOAD_LIMIT)
        upstream = FakeUpstream()
        async with (
            upstream.serve(),
            running_service({**service_env, "UPSTREAM_URL": upstream.url}, tmp_path) as svc,
        ):
            start = time.monotonic()
            fuzzed = await anyio.to_thread.run_sync(_schemathesis_run, svc.url)
            fuzz_seconds = time.monotonic() - start

            listed: list[tuple[str, str, int]] = []
            async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
                for method, path, kwargs in HOSTILE:
                    response = await client.request(method, path, **kwargs)
                    listed.append((method, path[:60], response.status_code))
            raw = [await _raw(svc, data) for data in RAW]
            items_table = await fetchval(fault_db.dsn, "SELECT to_regclass('items') IS NOT NULL")
            log = svc.log_text()

        server_errors = [entry for entry in listed if entry[2] >= 500]
        report(
            "hostile_input",
            schemathesis_requests=sum(fuzzed.values()),
            schemathesis_statuses=dict(sorted(fuzzed.items())),
            schemathesis_seconds=round(fuzz_seconds, 1),
            hostile_payloads=len(HOSTILE),
            hostile_statuses=dict(sorted(Counter(s for _, _, s in listed).items())),
            raw_requests=len(RAW),
            raw_statuses=raw,
            server_errors=server_errors,
            dirty_log_lines=len(dirty_lines(log)),
        )
        assert not [s for s in fuzzed if s >= 500], fuzzed
        assert server_errors == []
        assert all(0 < s < 500 for s in raw), raw
        assert items_table is True
        assert dirty_lines(log) == []
