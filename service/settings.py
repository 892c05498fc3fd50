"""Settings: read from the environment (and an optional ``.env``), checked at start.

With nothing set the service runs on embedded defaults: SQLite and uploaded files
under ``./service-data``, an in-process cache, no broker and no upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("service-data")
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{DEFAULT_DATA_DIR / 'service.db'}"


class Settings(BaseSettings):
    """Every setting of the service; each field is read from the env var of its name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="postgresql://... (asyncpg) or sqlite:///path; default: embedded SQLite.",
    )
    redis_url: str | None = Field(default=None, description="redis://...; unset: in-process cache.")
    amqp_url: str | None = Field(default=None, description="amqp://...; unset: no events.")
    upstream_url: str | None = Field(
        default=None, description="Base URL of the items API that /items/{id}/enriched calls."
    )
    api_token: SecretStr | None = Field(
        default=None, description="When set, mutating endpoints need 'Authorization: Bearer ...'."
    )
    files_dir: Path = Field(default=DEFAULT_DATA_DIR / "files")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_json_bytes: int = Field(default=64 * 1024, ge=256)
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_replicas: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Replicas sharing the PostgreSQL server: the start-up check counts "
        "DB_POOL_SIZE x DB_REPLICAS against its max_connections.",
    )
    database_pgbouncer: bool = Field(
        default=False,
        description="DATABASE_URL is a PgBouncer in transaction mode: no prepared statement "
        "cache, unique statement names; the pool budget is PgBouncer's, not checked here.",
    )
    database_application_name: str = Field(
        default="sr-service",
        min_length=1,
        max_length=63,
        description="application_name of the service's PostgreSQL sessions (the pool budget "
        "check counts other names as connections already in use).",
    )
    cache_prefix: str = Field(default="sr:", max_length=64)
    events_exchange: str = Field(default="service.events", min_length=1, max_length=255)
    outbox_relay: bool = Field(
        default=True,
        description="With AMQP_URL: run the outbox relay here (false: another process does).",
    )
    outbox_poll_seconds: float = Field(default=2.0, gt=0, le=3600)
    outbox_linger_seconds: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="After a wake-up the relay waits this long, so events leave in batches.",
    )
    upstream_timeout: float = Field(default=5.0, gt=0, le=300)
    ready_timeout: float = Field(default=2.0, gt=0, le=60)
    request_timeout: float = Field(
        default=30.0, gt=0, le=3600, description="Bound on each request (503 past it)."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one JSON object per log line on stderr."
    )
    gc_freeze: bool = Field(
        default=True,
        description="Once start-up is done, freeze the objects it made (gc.freeze), so that "
        "full garbage collections skip them and stop the event loop for ~1 ms, not ~80 ms.",
    )
    resource_page_token: SecretStr | None = Field(
        default=None,
        description="When set, GET /resources shows the live resource page to callers with "
        "this token ('Authorization: Bearer ...' or '?token=...').",
    )
    resource_page_loopback_only: bool = Field(
        default=True, description="The resource page answers loopback clients only."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    @field_validator("api_token", "resource_page_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url", "amqp_url", "upstream_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_database_is_default(cls, value: object) -> object:
        return DEFAULT_DATABASE_URL if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
            return "postgresql+asyncpg://" + value.split("://", 1)[1]
        if scheme in ("sqlite", "sqlite+aiosqlite"):
            return "sqlite+aiosqlite://" + value.split("://", 1)[1]
        raise ValueError(
            f"DATABASE_URL must start with postgresql:// or sqlite:///, not {scheme or value!r}"
        )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return _check_scheme("REDIS_URL", value, ("redis", "rediss", "unix"))

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str | None) -> str | None:
        return _check_scheme("AMQP_URL", value, ("amqp", "amqps"))

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        checked = _check_scheme("UPSTREAM_URL", value, ("http", "https"))
        if checked is not None and not urlsplit(checked).hostname:
            raise ValueError("UPSTREAM_URL needs a host, e.g. http://127.0.0.1:9000")
        return checked.rstrip("/") if checked else None

    @property
    def is_sqlite(self) -> bool:
        """True when the database is the embedded SQLite file."""
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None for PostgreSQL or an in-memory database."""
        if not self.is_sqlite:
            return None
        path = self.database_url.split(":///", 1)[1] if ":///" in self.database_url else ""
        return Path(path) if path and path != ":memory:" else None


def _check_scheme(name: str, value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{name} must start with one of {allowed}; got {scheme or value!r}")
    return value
