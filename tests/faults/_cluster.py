"""Several service processes behind HAProxy, and PgBouncer in front of PostgreSQL.

Everything runs as a child process of the test, on 127.0.0.1 ports chosen free,
with its configuration in the test's own folder, and is stopped when its block
ends whatever happened. A replica keeps its port across restarts, so the load
balancer's configuration never changes.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.service.processes import started_service

#: How often HAProxy asks each replica's readiness endpoint, in milliseconds.
CHECK_INTERVAL_MS = 200


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """The path of the program *name*; skip (fail under ``SR_REQUIRE_SERVICES=1``) without it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package {name})"
    if os.environ.get("SR_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}; SR_REQUIRE_SERVICES=1: fault scenarios must not skip")
    pytest.skip(message)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once 127.0.0.1:*port* accepts connections; raise after *timeout* or if *proc* ends."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"the process on port {port} exited with {proc.returncode}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout} s"
                ) from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 15) -> int:
    """SIGTERM *proc*, wait up to *timeout*, then SIGKILL; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


# -- replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    """One service process on a fixed port; :meth:`restart` keeps the port."""

    index: int
    port: int
    env: dict[str, str]
    folder: Path
    stack: ExitStack = field(default_factory=ExitStack)
    proc: subprocess.Popen[str] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The replica's own base URL (bypassing the load balancer)."""
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything every run of this replica wrote to stderr."""
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.folder.glob("stderr*.log"))
        )

    def start(self) -> None:
        """Start the process on :attr:`port`; returns once it listens."""
        self.starts += 1
        log = self.folder / f"stderr{self.starts}.log"
        env = {**self.env, "PORT": str(self.port)}
        self.proc, _ = self.stack.enter_context(started_service(env, log, log_level="info"))

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM (the graceful drain), wait for the exit; the exit code."""
        assert self.proc is not None
        code = stop(self.proc, timeout)
        self.stack.close()
        self.proc = None
        return code

    def restart(self) -> int:
        """:meth:`terminate`, then :meth:`start` on the same port; the old run's exit code."""
        code = self.terminate()
        self.start()
        return code


@contextmanager
def replicas(env: dict[str, str], workdir: Path, count: int) -> Iterator[list[Replica]]:
    """*count* service processes with *env*, each on a free port of its own; all stopped after."""
    started: list[Replica] = []
    try:
        for index in range(count):
            folder = workdir / f"replica{index}"
            folder.mkdir(parents=True, exist_ok=True)
            replica = Replica(index, free_port(), env, folder)
            started.append(replica)
            replica.start()
        yield started
    finally:
        for replica in started:
            if replica.proc is not None:
                replica.terminate()


# -- HAProxy ----------------------------------------------------------------------------

_HAPROXY = """\
global
    maxconn 4000

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 2s
    # One server connection per request: a replica that stops listening refuses
    # the next connection, and a refused connection is retried on another replica.
    option http-server-close
    # The whole request is read before a server is picked, so that a request with a
    # body can be sent again (an L7 retry needs all of it in HAProxy's buffer).
    option http-buffer-request
    retries 3
    option redispatch 1
    # A connection the kernel accepted for a replica that then closed its listener
    # is reset before the request is read: safe to send again, even a POST.
    retry-on conn-failure empty-response

frontend service
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    http-response set-header X-Replica %s
    option httpchk GET /readyz
    http-check expect status 200
    # fall 3: one slow check (a loaded machine) must not take the last replica out;
    # a stopped replica is left by the retries meanwhile (it refuses connections).
    default-server inter {inter}ms fastinter {inter}ms downinter {inter}ms fall 3 rise 2
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


@dataclass
class Balancer:
    """A running HAProxy: the one URL of the replicas, and its stats page."""

    url: str
    stats_url: str
    config: Path

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (``UP``, ``DOWN``, ...), by server name."""
        text = httpx.get(f"{self.stats_url};csv", timeout=5).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_state(self, server: str, state: str, timeout: float = 15) -> float:
        """Wait until HAProxy reports *server* in *state*; the seconds it took."""
        start = time.monotonic()
        while True:
            current = self.states().get(server)
            if current is not None and current.startswith(state):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"HAProxy reports {server} {current}, not {state}")
            time.sleep(0.05)


def server_name(replica: Replica) -> str:
    """The name of *replica* in HAProxy's configuration."""
    return f"r{replica.index}"


@contextmanager
def haproxy(workdir: Path, backends: list[Replica], port: int | None = None) -> Iterator[Balancer]:
    """HAProxy on *port* (default: a free one) over *backends*, checking ``/readyz``.

    Each response names the replica that served it (``X-Replica``). Stopped after.
    """
    binary = require_tool("haproxy")
    port, stats_port = port or free_port(), free_port()
    servers = "\n".join(f"    server {server_name(r)} 127.0.0.1:{r.port} check" for r in backends)
    config = workdir / "haproxy.cfg"
    config.write_text(
        _HAPROXY.format(port=port, stats_port=stats_port, servers=servers, inter=CHECK_INTERVAL_MS)
    )
    log = (workdir / "haproxy.log").open("wb")
    proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)  # noqa: S603 - the installed haproxy, our config
    try:
        wait_for_port(port, 10, proc)
        balancer = Balancer(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}/stats", config
        )
        for replica in backends:
            balancer.wait_state(server_name(replica), "UP")
        yield balancer
    finally:
        stop(proc, 5)
        log.close()


# -- PgBouncer --------------------------------------------------------------------------

_PGBOUNCER = """\
[databases]
* = host={host} port={pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
# PgBouncer refuses startup parameters it does not know; the SQLAlchemy adapter's
# client_connection_check_interval belongs on the server (ALTER DATABASE ... SET).
ignore_startup_parameters = extra_float_digits,client_connection_check_interval
admin_users = postgres
"""


@dataclass
class Bouncer:
    """A running PgBouncer in transaction mode."""

    port: int
    log: Path
    pool_size: int


@contextmanager
def pgbouncer(
    workdir: Path, *, pg_host: str = "127.0.0.1", pg_port: int = 5432, pool_size: int = 5
) -> Iterator[Bouncer]:
    """PgBouncer on a free port in transaction mode, trusting user postgres; stopped after.

    PgBouncer refuses to run as root, so as root it drops to the ``postgres`` user;
    its configuration then lives in a folder that user can read (removed after),
    and its log in *workdir*.
    """
    binary = require_tool("pgbouncer")
    folder = Path(tempfile.mkdtemp(prefix="sr-pgbouncer-"))
    try:
        folder.chmod(0o755)
        port = free_port()
        auth_file = folder / "userlist.txt"
        auth_file.write_text('"postgres" ""\n')
        config = folder / "pgbouncer.ini"
        config.write_text(
            _PGBOUNCER.format(
                host=pg_host, pg_port=pg_port, port=port, auth_file=auth_file, pool_size=pool_size
            )
        )
        command = [binary, str(config)]
        if os.geteuid() == 0:
            command = [binary, "-u", "postgres", str(config)]
        with (workdir / "pgbouncer.log").open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=log)  # noqa: S603 - the installed pgbouncer, our config
            try:
                wait_for_port(port, 10, proc)
                yield Bouncer(port, workdir / "pgbouncer.log", pool_size)
            finally:
                stop(proc, 5)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
