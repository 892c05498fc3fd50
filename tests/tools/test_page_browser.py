"""The resource page in headless Chromium, against the service running as a process."""

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import httpx
import pytest

from tests.service.processes import started_service

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
#: The picture the docs show; rewritten only with SR_UPDATE_SCREENSHOTS=1, so that
#: a test run leaves the work tree as it was.
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "resource-page.png"
TOKEN = "browser-token-5c1e"
HOLDERS = 3
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium_or_skip() -> str:
    """The Chromium binary; a skip only on a developer's machine without it."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("SR_REQUIRE_SERVICES"):
        pytest.fail("chromium is not installed, and SR_REQUIRE_SERVICES requires this test")
    pytest.skip("chromium is not installed")


def chromium(binary: str, profile: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on *url* with *extra* flags; return its stdout."""
    done = subprocess.run(  # noqa: S603 - the installed chromium, our flags
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1360,1040",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cell(dom: str, resource: str, key: str) -> str:
    """The text of column *key* in *resource*'s row of the rendered page."""
    rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)
    for tr in rows:
        if f'<td data-key="name">{resource}</td>' in tr:
            found = re.search(rf'<td data-key="{key}">([^<]*)</td>', tr)
            assert found is not None, tr
            return found.group(1)
    raise AssertionError(f"no row for {resource!r} in the page")


async def test_page_renders_the_held_leases_in_chromium(pg_dsn: str, tmp_path: Path) -> None:
    """Three POSTs blocked on a table lock show in Chromium as three leases of tx and the pool."""
    binary = chromium_or_skip()
    shot = tmp_path / "resource-page.png"
    name = f"sr_page_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path=f"/{name}"))
    env = {
        "DATABASE_URL": dsn,
        "RESOURCE_PAGE_TOKEN": TOKEN,
        "DATABASE_APPLICATION_NAME": name,
        "REDIS_URL": "",
        "AMQP_URL": "",
        "UPSTREAM_URL": "",
        "API_TOKEN": "",
    }
    try:
        with started_service(env, tmp_path / "service.log") as (proc, base):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                for _ in range(5):
                    assert (await client.get("/items")).status_code == 200
                locker = await asyncpg.connect(dsn)
                try:
                    lock = locker.transaction()
                    await lock.start()
                    await locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                    statuses: list[int] = []
                    async with anyio.create_task_group() as tg:

                        async def post(i: int) -> None:
                            answer = await client.post("/items", json={"name": f"held {i}"})
                            statuses.append(answer.status_code)

                        for i in range(HOLDERS):
                            tg.start_soon(post, i)
                        auth = {"Authorization": f"Bearer {TOKEN}"}
                        with anyio.fail_after(20):
                            while True:  # until the three requests hold their leases
                                data = await client.get("/resources/data.json", headers=auth)
                                held = [x for x in data.json()["leases"] if x["resource"] == "tx"]
                                if len(held) == HOLDERS:
                                    break
                                await anyio.sleep(0.05)
                        url = f"{base}/resources?token={TOKEN}"
                        dom = await anyio.to_thread.run_sync(
                            lambda: chromium(
                                binary,
                                tmp_path / "p1",
                                url,
                                "--virtual-time-budget=4000",
                                "--dump-dom",
                            )
                        )
                        await anyio.to_thread.run_sync(
                            lambda: chromium(binary, tmp_path / "p2", url, f"--screenshot={shot}")
                        )
                        await lock.rollback()
                finally:
                    await locker.close()
            assert statuses == [201] * HOLDERS
            proc.terminate()
            proc.wait(timeout=15)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    assert cell(dom, "tx", "leases_in_use") == str(HOLDERS)
    assert cell(dom, "db.connection", "leases_in_use") == str(HOLDERS)
    assert cell(dom, "db.engine", "owners_open") == "1"
    assert cell(dom, "db.engine", "readiness") == "ok"
    assert cell(dom, "db.connection", "acquires") != "0"
    assert cell(dom, "db.connection", "wait_p50_ms") != "-"
    assert dom.count("<td>POST /items</td>") >= 2 * HOLDERS  # tx and its connection
    gate_row = re.search(
        r"<tbody><tr><td>db\.connection</td>(.*?)</tr>", dom.split('id="gates"')[1]
    )
    assert gate_row is not None
    assert re.findall(r"<td>([^<]*)</td>", gate_row.group(1))[1] == str(HOLDERS)  # in use
    assert re.search(r'data-refreshed="[1-9]', dom), "the script never refreshed the page"
    assert TOKEN not in dom.split("<body", 1)[1].split("<script", 1)[0]
    assert shot.stat().st_size > 10_000
    if os.environ.get("SR_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
