"""SQLite: one writer transaction per request (WAL, busy timeout), committed before the response."""
import tempfile
from typing import Annotated

import aiosqlite
import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from scoped_resources import Resources, Use
from scoped_resources.adapters.sqlite import SQLite

resources = Resources()
db = SQLite(resources, f"{tempfile.mkdtemp()}/notes.sqlite3")
app = FastAPI(lifespan=resources.lifespan)

@app.post("/notes")
async def add(
    text: str, conn: Annotated[aiosqlite.Connection, Use(db.transaction)]
) -> dict[str, int]:
    await conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT)")
    cursor = await conn.execute("INSERT INTO notes (text) VALUES (?)", (text,))
    return {"id": cursor.lastrowid or 0}
async def main() -> None:
    async with LifespanManager(app) as m, httpx.AsyncClient(
            transport=httpx.ASGITransport(m.app), base_url="http://app") as client:
        print((await client.post("/notes", params={"text": "hi"})).json())

anyio.run(main)
