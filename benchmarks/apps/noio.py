"""A FastAPI endpoint doing no I/O: the ceiling of the framework and the server here."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, Any]:
    return {"ok": True}
