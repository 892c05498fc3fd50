"""Streaming multipart parsing: the file part goes to disk chunk by chunk.

Starlette's ``request.form()`` spools a whole upload into a temporary file before
the route runs, so a size limit could only be checked afterwards. Here the body
is parsed as it arrives and each chunk is written (and counted) at once; the
first byte over the limit stops the upload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header

from scoped_resources.adapters.files import Upload, Uploads

from .validation import check_file_name

FILE_FIELD = "file"


@dataclass
class StoredFile:
    """What was written: the name, its size and its SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass
class _Events:
    """Collects what the (synchronous) parser reports for one chunk of body."""

    queue: list[tuple[str, object]] = field(default_factory=list)
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_name).lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        self.queue.append(("part", dict(self.headers)))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.queue.append(("data", bytes(data[start:end])))

    def on_part_end(self) -> None:
        self.queue.append(("end", None))


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise HTTPException(415, "send the file as multipart/form-data with a 'file' part")
    if len(boundary) > 200:
        raise HTTPException(400, "the multipart boundary is too long")
    return boundary


async def receive_file(request: Request, uploads: Uploads) -> StoredFile:
    """Parse *request*'s multipart body and write its ``file`` part through *uploads*.

    The file appears under its name only when the request succeeds (the uploads
    lease publishes it atomically when released); on any error it is discarded.
    """
    events = _Events()
    parser = MultipartParser(
        _boundary(request),
        callbacks={
            "on_part_begin": events.on_part_begin,
            "on_header_field": events.on_header_field,
            "on_header_value": events.on_header_value,
            "on_header_end": events.on_header_end,
            "on_headers_finished": events.on_headers_finished,
            "on_part_data": events.on_part_data,
            "on_part_end": events.on_part_end,
        },
    )
    upload: Upload | None = None
    current: Upload | None = None
    digest = hashlib.sha256()
    stored: StoredFile | None = None
    async for chunk in request.stream():
        try:
            parser.write(chunk)
        except Exception as exc:  # noqa: BLE001 - the parser's errors are all bad input
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        for kind, value in events.queue:
            if kind == "part":
                current = None
                assert isinstance(value, dict)
                name, filename = _disposition(value)
                if name == FILE_FIELD and upload is None:
                    if filename is None:
                        raise HTTPException(400, "the 'file' part has no filename")
                    upload = current = await uploads.create(check_file_name(filename))
            elif kind == "data" and current is not None:
                assert isinstance(value, bytes)
                digest.update(value)
                await current.write(value)
            elif kind == "end" and current is not None:
                stored = StoredFile(current.path, current.size, digest.hexdigest())
                current = None
        events.queue.clear()
    parser.finalize()
    if upload is None:
        raise HTTPException(422, "the multipart body has no 'file' part")
    if stored is None:
        raise HTTPException(400, "the multipart body ended inside the 'file' part")
    return stored


def _disposition(headers: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    raw = headers.get(b"content-disposition")
    if raw is None:
        raise HTTPException(400, "a multipart part has no Content-Disposition header")
    _, options = parse_options_header(raw)
    name = options.get(b"name")
    filename = options.get(b"filename")
    try:
        return (
            name.decode() if name is not None else None,
            filename.decode() if filename is not None else None,
        )
    except UnicodeDecodeError:
        raise HTTPException(400, "a multipart part's name is not UTF-8") from None
