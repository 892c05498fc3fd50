"""Property-based run against the service's own OpenAPI schema: no input causes a 5xx.

Schemathesis's pytest plugin does not run on pytest 9 (it reads a removed private
attribute), so each operation's Hypothesis strategy is driven here directly.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service import Settings, create_app

from .conftest import BACKENDS, RealServices, delete_keys
from .processes import service_process

EXAMPLES_PER_OPERATION = 30

_PATHS = create_app(Settings(_env_file=None)).openapi()["paths"]  # type: ignore[call-arg]
# (method, path, mode); an operation without inputs has no invalid requests to make.
CASES = sorted(
    (method.upper(), path, mode)
    for path, methods in _PATHS.items()
    for method, spec in methods.items()
    for mode in schemathesis.GenerationMode
    if mode is schemathesis.GenerationMode.POSITIVE
    or spec.get("parameters")
    or spec.get("requestBody")
)


class _Upstream(BaseHTTPRequestHandler):
    """A fake upstream items API: every item has a price."""

    def do_GET(self) -> None:
        body = json.dumps({"price": 1.5, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet."""


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    """A fake upstream in a thread, so that /items/{id}/enriched has something to call."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module", params=BACKENDS)
def api_schema(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream_url: str
) -> Iterator[schemathesis.BaseSchema]:
    """The schema of the service running as a real process on a free port."""
    folder = tmp_path_factory.mktemp("schemathesis")
    env = {
        "DATABASE_URL": f"sqlite:///{folder / 'service.db'}",
        "FILES_DIR": str(folder / "files"),
        "MAX_UPLOAD_BYTES": "4096",
        "UPSTREAM_URL": upstream_url,
        "CACHE_PREFIX": f"sr-test:{uuid.uuid4().hex[:12]}:",
    }
    if request.param == "real":
        real: RealServices = request.getfixturevalue("real_services")
        env.update(DATABASE_URL=real.database_url, REDIS_URL=real.redis_url)
    with service_process(env, folder / "stderr.log") as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        schema.config.base_url = url
        yield schema
    if "REDIS_URL" in env:
        asyncio.run(delete_keys(env["REDIS_URL"], env["CACHE_PREFIX"] + "*"))


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_input_causes_a_server_error(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    """Every generated request (valid and invalid) to this operation is answered without a 5xx."""
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    run()
