"""Publishing: the machine and versions, the chart, and the results section of the README."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .apps._common import database_url, redis_url

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
PACKAGES = ("fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "asyncpg",
            "redis", "anyio", "dishka", "scoped-resources")
COLORS = {"scoped": "#2a7ab0", "plain": "#7f7f7f", "fastapi_fn": "#66a61e",
          "dishka_di": "#e6ab02", "naive": "#d95f02"}


def machine() -> dict[str, Any]:
    """CPU, cores, memory, kernel and load of this machine."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }


def versions() -> dict[str, str]:
    """Versions of the packages, the servers and wrk."""
    found = {name: version(name) for name in PACKAGES}
    wrk = shutil.which("wrk")
    if wrk is not None:
        run = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        match = re.search(r"wrk (\S+)", run.stdout + run.stderr)
        found["wrk"] = match.group(1) if match else "?"
    found.update(asyncio.run(_servers()))
    return found


async def _servers() -> dict[str, str]:
    import asyncpg
    from redis.asyncio import Redis

    conn = await asyncpg.connect(database_url())
    try:
        pg = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    client = Redis.from_url(redis_url())
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return {"postgresql": str(pg), "redis-server": str(info["redis_version"])}


def chart(result: dict[str, Any], path: Path) -> None:
    """Requests/s per endpoint per app, with the bare-client limit and the no-I/O ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runner import ENDPOINTS

    http = result["http"]
    endpoints = list(http["cells"])
    apps = list(dict.fromkeys(a for e in endpoints for a in http["cells"][e]))
    width = 0.8 / max(len(apps), 1)
    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    for i, app in enumerate(apps):
        xs = [k + (i - (len(apps) - 1) / 2) * width for k in range(len(endpoints))]
        ys = [http["cells"][e].get(app, {}).get("rps", 0.0) for e in endpoints]
        bars = ax.bar(xs, ys, width, label=app, color=COLORS.get(app))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    baseline = result.get("baseline") or {}
    for k, e in enumerate(endpoints):
        if e in baseline:
            label = "bare asyncpg/redis, no HTTP" if k == 0 else "_nolegend_"
            ax.hlines(baseline[e]["rps"], k - 0.45, k + 0.45, colors="black", linestyles=":",
                      label=label)
    ceiling = http.get("ceiling")
    if ceiling:
        ax.axhline(ceiling["rps"], color="green", linestyle="--", linewidth=1,
                   label=f"FastAPI endpoint with no I/O ({ceiling['rps']:.0f})")
    ax.set_xticks(range(len(endpoints)), [ENDPOINTS[e][1] for e in endpoints])
    ax.set_ylabel("requests/s (median of rounds)")
    s = http["settings"]
    quick = " (QUICK, noisy)" if result["quick"] else ""
    ax.set_title(f"scoped-resources vs hand-written FastAPI — {s['connections']} connections, "
                 f"{s['rounds']} x {s['duration']:g} s{quick}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def results_markdown(result: dict[str, Any]) -> str:
    """The README's results section for *result*."""
    from . import baseline, instructions, memory, micro, runner

    m, v = result["machine"], result["versions"]
    out = [
        f"Measured {result['date']} with `{result['command']}`"
        + (" — **QUICK run: short rounds on a busy machine, the figures are noisy**."
           if result["quick"] else "."),
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, load average at start {' '.join(m['load_average'])}; client, "
        "server, PostgreSQL and Redis all on this machine.",
        "",
        "**Versions:** Python " + m["python"] + ", "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    http = result.get("http")
    if http:
        s = http["settings"]
        out += [
            "### HTTP",
            "",
            f"wrk, {s['threads']} thread, {s['connections']} connections, {s['rounds']} "
            f"interleaved rounds of {s['duration']:g} s per endpoint after {s['warmup']:g} s "
            "of warm-up; medians of the rounds. *Server CPU µs/req* is the uvicorn "
            "process's CPU time divided by the requests it served: the steadiest figure "
            "on a shared machine.",
            "",
            runner.table(http),
            "",
            "![requests/s per endpoint per app](results/requests_per_s.png)",
            "",
        ]
    if result.get("baseline"):
        out += [
            "### Physical limit: the same I/O from a bare client, no HTTP",
            "",
            baseline.table(result["baseline"]),
            "",
        ]
    if result.get("micro"):
        mi = result["micro"]["settings"]
        out += [
            "### Micro: per-request cost without I/O",
            "",
            f"Median of {mi['repeats']} timings of {mi['loops']} requests, microseconds per "
            "request, uvloop.",
            "",
            micro.table(result["micro"]),
            "",
        ]
    if result.get("memory"):
        out += _section("Memory", None, memory.table(result["memory"]))
    if result.get("instructions"):
        ins = result["instructions"]["settings"]
        out += _section(
            "Instructions per request (deterministic)",
            "Each app in-process through ASGI with real I/O, under `valgrind "
            "--tool=callgrind`: instructions the server process executes per request, "
            f"from two runs of {ins['small']} and {ins['large']} requests ({ins['concurrency']} "
            "at a time, below the pool size), against plain in brackets. The same code "
            "gives the same count to about 0.1% however busy the machine is; it leaves "
            "out PostgreSQL's and Redis's own work, HTTP parsing and the network. "
            "How and why: `benchmarks/instructions.py`.",
            instructions.table(result["instructions"]),
        )
    if result.get("micro_instructions"):
        mi = result["micro_instructions"]["settings"]
        out += _section(
            "Micro, in instructions (deterministic)",
            "The micro benchmark's requests (no I/O) under callgrind: instructions per "
            f"request from two runs of {mi['small']:,} and {mi['large']:,} requests. The "
            "timed micro figures above move by tens of percent between runs on this "
            "shared machine; these do not.",
            instructions.micro_table(result["micro_instructions"]),
        )
    out += ["### Targets", ""]
    out += [f"- {'✅' if met else '❌'} {name}: {figures}" for name, met, figures in
            result["targets"]]
    return "\n".join(out)


def _section(title: str, text: str | None, table: str) -> list[str]:
    """A results subsection: its heading, what it measures (if said), its table."""
    return [f"### {title}", "", *([text, ""] if text else []), table, ""]


def publish(result: dict[str, Any]) -> None:
    """Write the chart and replace the README's results section."""
    if result.get("http"):
        chart(result, RESULTS / "requests_per_s.png")
    text = README.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    README.write_text(f"{before}{START}\n{results_markdown(result)}\n{END}{after}")
