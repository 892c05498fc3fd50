"""Every error as ``application/problem+json``, and the request body size limit.

FastAPI's own 422 handler echoes the rejected input and fails with a 500 when that
input is ``inf`` (``{"name": 1e999}``); the handler here names each bad field
and why, without the input.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scoped_resources.adapters.files import UnsafePath, UploadTooLarge
from scoped_resources.exceptions import ResourceBusy
from scoped_resources.fastapi import outage_of, problem_response

logger = logging.getLogger("service")

PROBLEM = "application/problem+json"
_MAX_ERRORS = 20


#: A problem+json response; extra keyword arguments become members of the document.
problem = problem_response


def problem_schema() -> dict[str, Any]:
    """The OpenAPI description of a problem document (for ``responses=``)."""
    return {
        "content": {
            PROBLEM: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                    "required": ["status", "detail"],
                }
            }
        }
    }


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ResourceBusy, _busy)
    app.add_exception_handler(UploadTooLarge, _too_large)
    app.add_exception_handler(UnsafePath, _unsafe_path)
    app.add_exception_handler(Exception, _unexpected)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem(exc.status_code, detail, dict(exc.headers) if exc.headers else None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [part if isinstance(part, int) else str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "invalid")),
            "type": str(err.get("type", "value_error")),
        }
        for err in exc.errors()[:_MAX_ERRORS]
    ]
    detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors)
    return problem(422, detail[:2000] or "invalid request", errors=errors)


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ResourceBusy)
    return problem(503, str(exc), {"Retry-After": f"{max(1, round(exc.retry_after))}"})


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UploadTooLarge)
    return problem(413, f"the upload is larger than the limit of {exc.limit} bytes")


async def _unsafe_path(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnsafePath)
    return problem(400, f"unsafe file name: {exc.problem}")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    what = outage_of(exc)
    if what is not None:
        logger.warning("%s unavailable on %s %s: %s", what, request.method, request.url.path, exc)
        return problem(503, f"the {what} is unavailable; retry later", {"Retry-After": "1"})
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal error; the service logged the details")


class BodyTooLarge(HTTPException):
    """Raised when a request body is larger than its route allows (HTTP 413).

    An ``HTTPException``, because FastAPI re-raises those from the body reader
    where it turns any other error into a 400.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: bodies over the limit get 413 (by Content-Length, or when read).

    Uploads (``POST /files``) get *upload_limit* (the file limit plus room for the
    multipart framing); every other request gets *limit*.
    """

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/files"
        limit = self.upload_limit if is_upload else self.limit
        length = _content_length(scope)
        if length == -1:
            await problem(400, "the Content-Length header is not a number")(scope, receive, send)
            return
        if length is not None and length > limit:
            await problem(413, BodyTooLarge(limit).detail)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() and len(value) < 19 else -1
    return None
