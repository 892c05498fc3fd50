"""Files: an upload that appears atomically only if the request succeeds."""
import tempfile
from typing import Annotated

import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request

from scoped_resources import Resources, Use
from scoped_resources.adapters.files import Files, Uploads

resources = Resources()
files = Files(resources, tempfile.mkdtemp(), max_upload_bytes=1024)
app = FastAPI(lifespan=resources.lifespan)

@app.put("/files/{name}")
async def put(name: str, r: Request, up: Annotated[Uploads, Use(files.uploads)]) -> dict[str, int]:
    upload = await up.create(name)  # "../x" raises UnsafePath
    async for chunk in r.stream():
        await upload.write(chunk)  # past 1024 bytes: UploadTooLarge
    return {name: upload.size}  # the file appears when the request succeeds

async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        answer = await client.put("/files/note.txt", content=b"hello")
        print(answer.json(), (files.base_dir / "note.txt").read_text())

anyio.run(main)
