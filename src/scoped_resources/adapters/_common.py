"""Pieces every adapter shares: secret redaction and bounded waiting."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TypeVar

import anyio

from ..exceptions import ResourceBusy

T = TypeVar("T")

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@]*):(?P<pw>[^@/]*)@")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>password|passwd|pwd|secret|token)=(?P<val>[^&;\s]+)")


def redact(url: str) -> str:
    """*url* with its password (user-info or query parameter) replaced by ``***``."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}=***", url)


async def bounded(resource: str, awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await *awaitable*; past *timeout* raise :class:`ResourceBusy` naming *resource*."""
    if timeout is None:
        return await awaitable
    try:
        with anyio.fail_after(timeout):
            return await awaitable
    except TimeoutError:
        raise ResourceBusy(resource, timeout) from None
