"""``python -m benchmarks [--quick]``: every benchmark, then the README's results.

Runs the HTTP benchmark (with the no-I/O ceiling), the bare-client limit, the
micro benchmark, the memory check and the instruction count (callgrind); writes
``benchmarks/results/latest.json`` and the chart, and rewrites the results
section of ``benchmarks/README.md`` (unless ``--no-publish``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import baseline, instructions, memory, micro, report, runner


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    runner.add_http_arguments(parser)
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: http,baseline,micro,memory,"
                             "instructions")
    parser.add_argument("--no-publish", action="store_true",
                        help="do not rewrite benchmarks/README.md and the chart")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(","))
    settings = runner.http_settings(args)
    quick = bool(args.quick)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": quick,
        "machine": report.machine(),
        "versions": report.versions(),
    }
    targets: list[tuple[str, bool, str]] = []
    if "http" not in skip:
        print("== HTTP", flush=True)
        result["http"] = runner.run_http(**settings)
        print(runner.table(result["http"]), flush=True)
        targets += runner.targets(result["http"])
    if "baseline" not in skip:
        print("== bare asyncpg/redis, no HTTP", flush=True)
        result["baseline"] = baseline.run_baseline(
            workers=settings["connections"],
            duration=min(settings["duration"], 10.0),
            warmup=min(settings["warmup"], 2.0),
            rounds=1 if quick else 3,
        )
        print(baseline.table(result["baseline"]), flush=True)
    if "micro" not in skip:
        print("== micro", flush=True)
        result["micro"] = micro.run_micro(loops=500 if quick else 2000,
                                          repeats=3 if quick else 7)
        print(micro.table(result["micro"]), flush=True)
        targets += _micro_targets({n: r["scoped_vs_exitstack"]
                                   for n, r in result["micro"]["ratios"].items()}, "")
    if "memory" not in skip:
        print("== memory", flush=True)
        points = (2_000, 20_000) if quick else (10_000, 100_000)
        result["memory"] = memory.run_memory(checkpoints=points,
                                             connections=settings["connections"])
        print(memory.table(result["memory"]), flush=True)
        growth = result["memory"]["scoped"]["growth"]
        targets.append((f"memory: scoped RSS after {points[1]:,} requests within 5% of "
                        f"after {points[0]:,}", abs(growth) <= 0.05, f"{growth * 100:+.1f}%"))
    if "instructions" not in skip:
        print("== instructions per request (callgrind)", flush=True)
        result["instructions"] = instructions.run_instructions(
            small=50 if quick else 100, large=200 if quick else 600)
        print(instructions.table(result["instructions"]), flush=True)
        for endpoint, counts in result["instructions"]["per_request"].items():
            ratio = counts["scoped"] / counts["plain"]
            targets.append((f"{endpoint}: scoped instructions/request <= plain's",
                            ratio <= 1.0, f"{ratio:.3f}x"))
        print("== micro, instructions per request (callgrind)", flush=True)
        result["micro_instructions"] = instructions.run_micro_instructions(
            small=500 if quick else 1000, large=2000 if quick else 6000)
        print(instructions.micro_table(result["micro_instructions"]), flush=True)
        targets += _micro_targets({n: c["scoped"] / c["exitstack"] for n, c in
                                   result["micro_instructions"]["per_request"].items()},
                                  " instructions")
    result["targets"] = targets
    print("== targets")
    for name, met, figures in targets:
        print(f"{'MET ' if met else 'MISS'} {name}: {figures}")
    report.RESULTS.mkdir(exist_ok=True)
    (report.RESULTS / "latest.json").write_text(json.dumps(result, indent=2))
    if not args.no_publish:
        report.publish(result)
        print(f"wrote {report.README} and {report.RESULTS / 'requests_per_s.png'}")


def _micro_targets(ratios: dict[str, float], what: str) -> list[tuple[str, bool, str]]:
    """The micro bounds, for each size's ratio of scoped to a bare AsyncExitStack."""
    return [(f"micro, {n} resource(s): scoped{what} <= {micro.bound(int(n))}x AsyncExitStack",
             ratio <= micro.bound(int(n)), f"{ratio:.2f}x") for n, ratio in ratios.items()]


if __name__ == "__main__":
    main()
