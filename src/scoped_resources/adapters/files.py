"""Files under one base directory: request-scoped handles and atomic uploads (anyio).

===============================  =======================================================
guarantee                        how
===============================  =======================================================
paths stay inside *base_dir*     empty, absolute, NUL, ``..`` and symlink-escaping paths
                                 raise :class:`UnsafePath` (a ``ValueError``: user input)
handles are closed               every file opened through ``.handles`` is closed when the
                                 request scope ends, whatever the outcome
uploads are atomic               ``.uploads`` writes to a temporary file next to the
                                 target and ``os.replace``-s it into place only when the
                                 request succeeded (fsync first)
failed uploads leave nothing     on an error or a cancellation the temporary file is
                                 deleted; the target is untouched
uploads are bounded              writing past *max_upload_bytes* raises
                                 :class:`UploadTooLarge` before the bytes hit the disk
===============================  =======================================================

The containment check resolves symlinks when the path is checked; a symlink
swapped in between the check and the open is not detected (keep *base_dir*
writable only by the app).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import anyio
from anyio import AsyncFile

from .._registry import Resources
from .._resource import Resource

__all__ = ["FileHandles", "Files", "UnsafePath", "Upload", "UploadTooLarge", "Uploads"]

_TEMP_SUFFIX = ".part"


class UnsafePath(ValueError):
    """Raised when a requested path could reach outside the base directory."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"unsafe path {path!r}: {problem}")


class UploadTooLarge(ValueError):
    """Raised when an upload grows past its size limit."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        super().__init__(f"upload {path!r} is larger than the limit of {limit} bytes")


class Files:
    """The file resources of one app, confined to *base_dir*.

    ``.handles`` (request lease): ``await handles.open("a/b.txt")`` returns an
    ``anyio.AsyncFile`` closed when the request ends. ``.uploads`` (request lease):
    ``up = await uploads.create("a/b.bin")``, ``await up.write(chunk)``; the file
    appears at its path only if the request succeeds.
    """

    def __init__(
        self,
        resources: Resources,
        base_dir: str | os.PathLike[str],
        *,
        name: str = "files",
        max_upload_bytes: int = 10 * 1024 * 1024,
        release_timeout: float = 10.0,
        durable: bool = True,
    ) -> None:
        self.name = name
        self.base_dir = Path(base_dir).resolve()
        self.max_upload_bytes = max_upload_bytes
        self.durable = durable

        async def handles() -> AsyncIterator[FileHandles]:
            owner = FileHandles(self)
            try:
                yield owner
            finally:
                await owner.aclose()

        async def uploads() -> AsyncIterator[Uploads]:
            owner = Uploads(self)
            try:
                yield owner
            except BaseException:
                await owner.discard()
                raise
            await owner.commit()

        async def directory() -> Path:
            await anyio.Path(self.base_dir).mkdir(parents=True, exist_ok=True)
            return self.base_dir

        #: The base directory (app): made at start-up, pinged for readiness.
        self.directory: Resource[Path] = resources.app(name=f"{name}.directory", ping=_ping)(
            directory
        )
        self.handles: Resource[FileHandles] = resources.request(
            name=f"{name}.handles", release_timeout=release_timeout, terminate=_abandon
        )(handles)
        self.uploads: Resource[Uploads] = resources.request(
            name=f"{name}.uploads", release_timeout=release_timeout, terminate=_abandon
        )(uploads)

    def __repr__(self) -> str:
        return f"<Files {self.name!r} {str(self.base_dir)!r}>"

    def resolve(self, path: str) -> Path:
        """The absolute path of *path* inside the base directory; raises UnsafePath."""
        if not path:
            raise UnsafePath(path, "it is empty")
        if "\x00" in path:
            raise UnsafePath(path, "it contains a NUL byte")
        if (
            PurePosixPath(path).is_absolute()
            or PureWindowsPath(path).is_absolute()
            or (PureWindowsPath(path).drive)
        ):
            raise UnsafePath(path, "it is absolute; give a path relative to the base directory")
        parts = PurePosixPath(path.replace("\\", "/")).parts
        if ".." in parts:
            raise UnsafePath(path, "it contains '..'")
        target = (self.base_dir / Path(*parts)).resolve()
        if target == self.base_dir or not target.is_relative_to(self.base_dir):
            raise UnsafePath(path, "it resolves (through a symlink) outside the base directory")
        return target


class FileHandles:
    """Opens files inside the base directory and closes them all when released."""

    def __init__(self, files: Files) -> None:
        self._files = files
        self._open: list[AsyncFile[Any]] = []
        self._closed = False

    async def open(self, path: str, mode: str = "rb") -> AsyncFile[Any]:
        """Open *path* (relative to the base directory); closed with the request."""
        if self._closed:
            raise RuntimeError(f"resource {self._files.name}.handles is released; open in a route")
        target = self._files.resolve(path)
        handle: AsyncFile[Any] = await anyio.open_file(target, mode)  # type: ignore[call-overload]
        self._open.append(handle)  # no await in between: a cancel cannot lose it
        return handle

    async def aclose(self) -> None:
        """Close every file this lease opened; idempotent."""
        self._closed = True
        while self._open:
            await self._open.pop().aclose()


class Upload:
    """One file being uploaded: write chunks, it is published when the request succeeds."""

    def __init__(self, path: str, target: Path, temp: Path, handle: AsyncFile[bytes], limit: int):
        self.path = path
        self.target = target
        self.temp = temp
        self.size = 0
        self.limit = limit
        self._handle = handle

    async def write(self, data: bytes) -> None:
        """Append *data*; raises UploadTooLarge (writing nothing) past the limit."""
        if self.size + len(data) > self.limit:
            raise UploadTooLarge(self.path, self.limit)
        await self._handle.write(data)
        self.size += len(data)


class Uploads:
    """Creates uploads; publishes them on success, deletes their temporary files otherwise."""

    def __init__(self, files: Files) -> None:
        self._files = files
        self._pending: list[Upload] = []

    async def create(self, path: str) -> Upload:
        """Start an upload to *path*; it replaces the file there when the request succeeds."""
        target = self._files.resolve(path)
        await anyio.Path(target.parent).mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        handle = await anyio.open_file(temp, "xb")
        upload = Upload(path, target, temp, handle, self._files.max_upload_bytes)
        self._pending.append(upload)
        return upload

    async def commit(self) -> None:
        """Publish every upload atomically; on a failure the rest are discarded."""
        durable = self._files.durable
        try:
            while self._pending:
                upload = self._pending[0]
                if durable:
                    await upload._handle.flush()
                    await anyio.to_thread.run_sync(os.fsync, upload._handle.wrapped.fileno())
                await upload._handle.aclose()
                await anyio.to_thread.run_sync(os.replace, upload.temp, upload.target)
                self._pending.pop(0)
        finally:
            await self.discard()

    async def discard(self) -> None:
        """Close and delete the temporary file of every unpublished upload."""
        while self._pending:
            upload = self._pending.pop()
            try:
                await upload._handle.aclose()
            finally:
                upload.temp.unlink(missing_ok=True)


async def _abandon(owner: FileHandles | Uploads) -> None:
    # Runs when a release overran its deadline: drop what is left without waiting.
    if isinstance(owner, Uploads):
        for upload in owner._pending:
            upload.temp.unlink(missing_ok=True)
        owner._pending.clear()
    else:
        owner._open.clear()


async def _ping(base_dir: Path) -> None:
    """Readiness: the base directory exists and the app can write in it."""
    writable = await anyio.to_thread.run_sync(os.access, base_dir, os.W_OK | os.X_OK)
    if not writable:
        raise PermissionError(f"the files directory {str(base_dir)!r} is missing or not writable")
