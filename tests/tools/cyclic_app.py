"""An app whose resources need each other (names resolved from module globals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI

from scoped_resources import Resources, Use

resources = Resources("cyclic")


@resources.app
async def first(x: Annotated[int, Use(second)]) -> int:
    return x


@resources.app
async def second(x: Annotated[int, Use(first)]) -> int:
    return x


app = FastAPI(lifespan=resources.lifespan)
