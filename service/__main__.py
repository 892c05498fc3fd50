"""``python -m service``: migrate the database, then serve on HOST:PORT.

``python -m service migrate`` only migrates. ``WORKERS=N`` (N > 1) runs N worker
processes on one port. Bad settings, or database pools beyond the server's connection
budget (DB_POOL_SIZE x DB_REPLICAS), end the program with exit code 2 and one line
per problem, naming the environment variable. A database that cannot be opened
(refused, unknown host, no such database or role) ends it with exit code 3 and one
line naming DATABASE_URL (password hidden) and the cause.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError

from .database import (
    DatabaseUnavailable,
    PoolBudgetExceeded,
    check_pool_budget,
    migrate,
    open_engine,
)
from .settings import Settings


def load_settings() -> Settings:
    """The settings from the environment; exit 2 with a clear message when invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"service: invalid configuration ({exc.error_count()} problem(s)):"]
        for err in exc.errors(include_url=False):
            var = "_".join(str(p) for p in err["loc"]).upper() or "?"
            lines.append(f"  {var}: {err['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


async def run_migrations(settings: Settings) -> None:
    """Check the pool budget, then bring the database schema up to date."""
    engine = await open_engine(settings)
    try:
        await check_pool_budget(engine, settings)
        await migrate(engine)
    finally:
        await engine.dispose()


class _Server(uvicorn.Server):
    """Prints the address (with the real port when PORT=0) once it listens."""

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.config.host, self.config.port
            for server in getattr(self, "servers", ()):
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
            base = f"http://{host}:{port}"
            print(f"service: listening on {base} (API docs: {base}/docs)", flush=True)


def main(argv: list[str]) -> int:
    """Run the command in *argv* (``serve`` by default)."""
    command = argv[0] if argv else "serve"
    if command not in ("serve", "migrate"):
        print("usage: python -m service [serve|migrate]", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        asyncio.run(run_migrations(settings))
    except PoolBudgetExceeded as exc:
        print(f"service: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as exc:
        print(f"service: {exc}", file=sys.stderr)
        return 3
    if command == "migrate":
        print("service: the database schema is up to date", flush=True)
        return 0
    workers = int(os.environ.get("WORKERS", "1") or 1)
    if workers > 1:
        base = f"http://{settings.host}:{settings.port}"
        print(f"service: {workers} workers listening on {base} (API docs: {base}/docs)")
        uvicorn.run("service.app:app", host=settings.host, port=settings.port, workers=workers)
        return 0
    from .app import create_app
    from .logging_config import configure

    log_level = os.environ.get("LOG_LEVEL", "info").lower()
    configure(log_level, settings.log_format)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=10,
        log_level=log_level,
        log_config=None,  # logging_config.configure set the handlers
    )
    _Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
