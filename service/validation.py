"""Input types that every route shares: bounded ids, storable strings, file names.

PostgreSQL refuses NUL characters in text and no driver can encode a lone UTF-16
surrogate (JSON allows ``"\\ud800"``), so every string is checked before it
reaches a query; ids are bounded to what a BIGINT holds.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import HTTPException, Path
from pydantic import AfterValidator, StringConstraints

INT64_MAX = 2**63 - 1
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
CACHE_KEY = r"^[A-Za-z0-9._:-]{1,200}$"


def storable(value: str) -> str:
    """*value* if a database can store it; ValueError otherwise."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(storable)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(storable)]
Email = Annotated[
    str,
    StringConstraints(max_length=254, pattern=r"^[^@\s\x00]{1,64}@[^@\s\x00]+\.[^@\s\x00]+$"),
    AfterValidator(storable),
]
ItemId = Annotated[int, Path(ge=1, le=INT64_MAX, description="A positive 64-bit id.")]


def check_file_name(name: str) -> str:
    """*name* if it is a plain file name; HTTP 400 naming the problem otherwise.

    Only flat names: no directories, no leading dot (hidden and temporary files),
    no NUL, at most 128 characters.
    """
    if "\x00" in name:
        raise HTTPException(400, "the file name contains a NUL character")
    if "/" in name or "\\" in name:
        raise HTTPException(400, "the file name must not contain a path ('/' or '\\')")
    if not FILE_NAME.fullmatch(name):
        raise HTTPException(
            400,
            "the file name must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-', "
            "not starting with '.' or '-'",
        )
    return name
