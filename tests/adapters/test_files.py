"""The files adapter: confinement to the base directory, handles and atomic uploads."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request

from scoped_resources import Resources, Scope, Use
from scoped_resources.adapters.files import (
    FileHandles,
    Files,
    UnsafePath,
    Uploads,
    UploadTooLarge,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base directory with one file in it, and a secret file next to it."""
    root = tmp_path / "base"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    return root


@asynccontextmanager
async def _scope(files_res: Resources) -> AsyncIterator[Scope]:
    async with files_res.open() as app_scope, app_scope.child() as scope:
        yield scope


def _leftovers(base: Path) -> list[str]:
    return sorted(p.name for p in base.rglob("*.part"))


class TestDirectory:
    async def test_the_base_directory_is_made_and_pinged(self, tmp_path: Path) -> None:
        """Start-up makes the base directory; readiness fails once it is gone."""
        resources = Resources("t")
        target = tmp_path / "made" / "here"
        Files(resources, target)
        async with resources.open() as app_scope:
            assert target.is_dir()
            assert await app_scope.ping(timeout=2) == {"files.directory": None}
            target.rmdir()
            result = await app_scope.ping(timeout=2)
        assert isinstance(result["files.directory"], PermissionError)


class TestConfinement:
    @pytest.mark.parametrize(
        ("path", "problem"),
        [
            ("../secret.txt", "'..'"),
            ("a/../../secret.txt", "'..'"),
            ("..\\secret.txt", "'..'"),
            ("/etc/passwd", "absolute"),
            ("C:\\Windows\\win.ini", "absolute"),
            ("hello.txt\x00.png", "NUL"),
            ("", "empty"),
        ],
    )
    def test_unsafe_paths_are_rejected(self, base: Path, path: str, problem: str) -> None:
        """Traversal, absolute, NUL and empty paths raise UnsafePath naming the problem."""
        files = Files(Resources("t"), base)
        with pytest.raises(UnsafePath, match=problem) as info:
            files.resolve(path)
        assert isinstance(info.value, ValueError)

    def test_symlink_escape_is_rejected(self, base: Path) -> None:
        """A symlink inside the base that points outside it is rejected."""
        (base / "link").symlink_to(base.parent)
        files = Files(Resources("t"), base)
        with pytest.raises(UnsafePath, match="symlink"):
            files.resolve("link/secret.txt")

    def test_paths_inside_are_resolved(self, base: Path) -> None:
        """A plain relative path resolves inside the base directory."""
        files = Files(Resources("t"), base)
        assert files.resolve("sub/x.txt") == base.resolve() / "sub" / "x.txt"


class TestHandles:
    async def test_handles_are_closed_with_the_scope(self, base: Path) -> None:
        """A file opened through the lease is readable, and closed when the scope ends."""
        resources = Resources("t")
        files = Files(resources, base)
        async with _scope(resources) as scope:
            handles: FileHandles = await scope.get(files.handles)
            handle = await handles.open("hello.txt")
            assert await handle.read() == b"hello"
        assert handle.wrapped.closed

    async def test_opening_outside_raises(self, base: Path) -> None:
        """Opening a traversal path through the lease raises UnsafePath and opens nothing."""
        resources = Resources("t")
        files = Files(resources, base)
        async with _scope(resources) as scope:
            handles = await scope.get(files.handles)
            with pytest.raises(UnsafePath):
                await handles.open("../secret.txt")


class TestUploads:
    async def test_success_renames_atomically(self, base: Path) -> None:
        """The target appears only when the scope ends successfully, with no temp file left."""
        resources = Resources("t")
        files = Files(resources, base)
        target = base / "up" / "new.bin"
        async with _scope(resources) as scope:
            uploads: Uploads = await scope.get(files.uploads)
            upload = await uploads.create("up/new.bin")
            await upload.write(b"abc")
            await upload.write(b"def")
            assert not target.exists()
            assert _leftovers(base) != []
        assert target.read_bytes() == b"abcdef"
        assert _leftovers(base) == []

    async def test_replaces_an_existing_file(self, base: Path) -> None:
        """A successful upload replaces the file at its path in one step."""
        resources = Resources("t")
        files = Files(resources, base)
        async with _scope(resources) as scope:
            upload = await (await scope.get(files.uploads)).create("hello.txt")
            await upload.write(b"bye")
            assert (base / "hello.txt").read_bytes() == b"hello"
        assert (base / "hello.txt").read_bytes() == b"bye"

    async def test_error_deletes_the_temp_file(self, base: Path) -> None:
        """An error in the scope deletes the temporary file and leaves the target untouched."""
        resources = Resources("t")
        files = Files(resources, base)

        async def fail_midway() -> None:
            async with _scope(resources) as scope:
                upload = await (await scope.get(files.uploads)).create("hello.txt")
                await upload.write(b"partial")
                raise KeyError("boom")

        with pytest.raises(KeyError):
            await fail_midway()
        assert (base / "hello.txt").read_bytes() == b"hello"
        assert _leftovers(base) == []

    async def test_cancellation_deletes_the_temp_file(self, base: Path) -> None:
        """A cancelled upload deletes its temporary file and publishes nothing."""
        resources = Resources("t")
        files = Files(resources, base)
        started = anyio.Event()

        async def upload_forever() -> None:
            async with _scope(resources) as scope:
                upload = await (await scope.get(files.uploads)).create("never.bin")
                await upload.write(b"x")
                started.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(upload_forever)
            await started.wait()
            tg.cancel_scope.cancel()
        assert not (base / "never.bin").exists()
        assert _leftovers(base) == []

    async def test_size_limit_is_enforced(self, base: Path) -> None:
        """Writing past max_upload_bytes raises UploadTooLarge and nothing is published."""
        resources = Resources("t")
        files = Files(resources, base, max_upload_bytes=4)

        async def write_five_bytes() -> None:
            async with _scope(resources) as scope:
                upload = await (await scope.get(files.uploads)).create("big.bin")
                await upload.write(b"1234")
                await upload.write(b"5")

        with pytest.raises(UploadTooLarge, match="4 bytes"):
            await write_five_bytes()
        assert not (base / "big.bin").exists()
        assert _leftovers(base) == []

    async def test_upload_route_publishes_the_body(self, base: Path) -> None:
        """A FastAPI route streams a request body into an upload that appears after success."""
        resources = Resources("t")
        files = Files(resources, base)
        app = FastAPI(lifespan=resources.lifespan)

        @app.put("/files/{name}")
        async def put(
            name: str, request: Request, uploads: Annotated[Uploads, Use(files.uploads)]
        ) -> int:
            upload = await uploads.create(name)
            async for chunk in request.stream():
                await upload.write(chunk)
            return upload.size

        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.put("/files/doc.txt", content=b"payload")
        assert response.json() == 7
        assert (base / "doc.txt").read_bytes() == b"payload"
        assert set(os.listdir(base)) == {
            "doc.txt",
            "hello.txt",
        }


class TestRelease:
    async def test_cancel_during_release_still_cleans_up(self, base: Path) -> None:
        """A scope whose closing is cancelled still deletes its temporary file (shielded)."""
        resources = Resources("t")
        files = Files(resources, base)
        with anyio.CancelScope() as cs:
            async with _scope(resources) as scope:
                upload = await (await scope.get(files.uploads)).create("c.bin")
                await upload.write(b"x")
                cs.cancel()
                await anyio.lowlevel.checkpoint()
        assert cs.cancelled_caught
        assert not (base / "c.bin").exists()
        assert _leftovers(base) == []
