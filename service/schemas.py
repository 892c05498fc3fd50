"""Request and response bodies. Requests forbid unknown fields."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from .validation import Email, Name


class UserIn(BaseModel):
    """``POST /users``."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    email: Email


class User(BaseModel):
    """A stored user."""

    id: int
    name: str
    email: str


class ItemIn(BaseModel):
    """``POST /items``."""

    model_config = ConfigDict(extra="forbid")
    name: Name


class Item(BaseModel):
    """A stored item."""

    id: int
    name: str
    created_at: datetime


class Cached(BaseModel):
    """``POST /cache/{key}``."""

    msg: str


class CacheEntry(BaseModel):
    """``GET /cache/{key}``."""

    key: str
    value: str


class Combo(BaseModel):
    """``GET /combo``: the log count and the access time it recorded."""

    logs: int
    last_access: datetime
    previous_access: datetime | None


class StoredFileOut(BaseModel):
    """``POST /files``."""

    name: str
    size: int
    sha256: str
