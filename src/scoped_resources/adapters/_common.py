"""Pieces every adapter shares: secret redaction and bounded waiting."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import anyio

from ..exceptions import ResourceBusy

T = TypeVar("T")

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@]*):(?P<pw>[^@/]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>password|passwd|pwd|secret|token)=(?P<val>[^&;\s]+)")


def redact(url: str) -> str:
    """*url* with its password (user-info or query parameter) replaced by ``***``."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}=***", url)


def secrets_of(url: str, *more: object) -> tuple[str, ...]:
    """The secrets a message about *url* must not show: its password, and *more* strings."""
    try:
        from_url = urlsplit(url).password
    except ValueError:
        from_url = None
    return tuple(s for s in (from_url, *more) if isinstance(s, str) and s)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """*text* (a driver's message) with URLs redacted and every one of *secrets* as ``***``."""
    text = redact(text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


async def bounded(resource: str, awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await *awaitable*; past *timeout* raise :class:`ResourceBusy` naming *resource*."""
    if timeout is None:
        return await awaitable
    try:
        with anyio.fail_after(timeout):
            return await awaitable
    except TimeoutError:
        raise ResourceBusy(resource, timeout) from None
