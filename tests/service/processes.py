"""Run the service as a real process (``python -m service``), the README's way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (http://\S+) \(API docs: (\S+)\)")


def run_service(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m service`` with *env* added, run to its end (for start-ups that must stop)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextmanager
def started_service(
    env: dict[str, str], log: Path, *, log_level: str = "warning"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``python -m service`` on a free port; yield the process and its base URL.

    The caller stops the process (and may first signal it); whatever happened,
    the process is killed if it is still running when the block ends.
    """
    full_env = {
        **os.environ,
        "PORT": "0",
        "HOST": "127.0.0.1",
        "LOG_LEVEL": log_level,
        **env,
    }
    extra = os.environ.get("PYTHONPATH")
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), extra] if extra else [str(ROOT)])
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=log.parent,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert proc.stdout is not None
            # The service prints this line once it listens: no polling for start-up.
            line = proc.stdout.readline()
            match = LISTENING.search(line)
            if match is None:
                raise RuntimeError(f"the service did not start: {line!r}\n{log.read_text()}")
            yield proc, match.group(1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@contextmanager
def service_process(env: dict[str, str], log: Path) -> Iterator[str]:
    """Start ``python -m service`` on a free port; yield its base URL; stop it after."""
    with started_service(env, log) as (proc, url):
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
