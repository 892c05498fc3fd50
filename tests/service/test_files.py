"""File upload and download, on both backends."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .conftest import PROBLEM, Running, SettingsFactory, running

pytestmark = pytest.mark.anyio

BOUNDARY = "sr-test-boundary"


def multipart(filename: bytes, data: bytes, field: bytes = b"file") -> bytes:
    """A multipart body with one part, written by hand so any filename can be sent."""
    return (
        f"--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="'
        + field
        + b'"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def leftovers(directory: Path) -> list[str]:
    """Every entry under *directory*, temporary files included."""
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


class TestUpload:
    async def test_upload_answers_name_size_and_sha256(self, service: Running) -> None:
        """POST /files answers 201 with the name, size and SHA-256 of what it stored."""
        data = b"hello world\n" * 1000
        response = await service.client.post("/files", files={"file": ("hello.txt", data)})
        assert response.status_code == 201, response.text
        assert response.json() == {
            "name": "hello.txt",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert (service.settings.files_dir / "hello.txt").read_bytes() == data

    async def test_download_streams_the_stored_bytes(self, service: Running) -> None:
        """GET /files/{name} returns exactly the uploaded bytes."""
        data = bytes(range(256)) * 512
        await service.client.post("/files", files={"file": ("blob.bin", data)})
        response = await service.client.get("/files/blob.bin")
        assert response.status_code == 200
        assert response.content == data

    async def test_missing_file_is_404(self, service: Running) -> None:
        """Downloading a name that was never uploaded is a 404 problem."""
        response = await service.client.get("/files/absent.txt")
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM

    async def test_body_without_file_part_is_422(self, service: Running) -> None:
        """A multipart body whose only part is not 'file' is refused."""
        body = multipart(b"a.txt", b"x", field=b"other")
        response = await service.client.post("/files", content=body, headers=HEADERS)
        assert response.status_code == 422

    async def test_non_multipart_body_is_415(self, service: Running) -> None:
        """A JSON body sent to /files is refused with 415."""
        response = await service.client.post("/files", json={"file": "x"})
        assert response.status_code == 415


class TestUploadLimit:
    @pytest.fixture
    async def small(self, make_settings: SettingsFactory) -> AsyncIterator[Running]:
        """The service with a 1 KiB upload limit."""
        async with running(make_settings(max_upload_bytes=1024)) as svc:
            yield svc

    async def test_upload_at_the_limit_is_stored(self, small: Running) -> None:
        """A file of exactly the limit is accepted."""
        response = await small.client.post("/files", files={"file": ("ok.bin", b"x" * 1024)})
        assert response.status_code == 201

    async def test_upload_over_the_limit_is_413_and_leaves_nothing(self, small: Running) -> None:
        """One byte over the limit is a 413, and no file (not even a temporary one) is left."""
        response = await small.client.post("/files", files={"file": ("big.bin", b"x" * 1025)})
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM
        assert leftovers(small.settings.files_dir) == []

    async def test_chunked_upload_over_the_limit_is_413(self, small: Running) -> None:
        """Without a Content-Length the upload is cut off while it streams."""
        body = multipart(b"stream.bin", b"y" * 5000)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        response = await small.client.post("/files", content=chunks(), headers=HEADERS)
        assert response.status_code == 413
        assert leftovers(small.settings.files_dir) == []

    async def test_declared_length_over_the_limit_is_413_before_reading(
        self, small: Running
    ) -> None:
        """A Content-Length far over the limit is refused without reading the body."""
        body = multipart(b"huge.bin", b"z" * 200_000)
        response = await small.client.post("/files", content=body, headers=HEADERS)
        assert response.status_code == 413


class TestHostileNames:
    @pytest.mark.parametrize(
        "filename",
        [b"../x", b"../../etc/passwd", b"/etc/passwd", b"a\x00b", b".hidden", b"a/b", b""],
    )
    async def test_hostile_upload_names_are_4xx(self, service: Running, filename: bytes) -> None:
        """Traversal, absolute, NUL, hidden and empty names are refused, and nothing is written."""
        body = multipart(filename, b"evil")
        response = await service.client.post("/files", content=body, headers=HEADERS)
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"] == PROBLEM
        assert leftovers(service.settings.files_dir) == []
        assert not (service.settings.files_dir.parent / "x").exists()

    @pytest.mark.parametrize(
        "path", ["/files/..%2Fservice.db", "/files/%2Fetc%2Fpasswd", "/files/a%00b"]
    )
    async def test_hostile_download_names_are_4xx(self, service: Running, path: str) -> None:
        """Downloads cannot reach outside the files directory."""
        response = await service.client.get(path)
        assert 400 <= response.status_code < 500
