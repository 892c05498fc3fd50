"""The adapter examples run as scripts and print what they promise.

The README shows each of them verbatim (tests/test_readme.py checks that), so the
README's adapter examples are the ones executed here.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"


def run_example(name: str, env: dict[str, str]) -> str:
    """Run examples/adapters/<name>_example.py with warnings as errors; return its output."""
    result = subprocess.run(  # noqa: S603 - our own interpreter and files
        [sys.executable, "-W", "error", str(EXAMPLES / f"{name}_example.py")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class TestSqlExamples:
    """PostgreSQL, SQLAlchemy and SQLite."""

    def test_postgres_example_adds_in_the_database(self, pg_dsn: str) -> None:
        """The PostgreSQL example answers with a sum computed by the server."""
        answer = run_example("postgres", {"SR_TEST_PG_DSN": pg_dsn})
        assert ast.literal_eval(answer) == {"sum": 42}

    def test_sqlalchemy_example_adds_in_the_database(self, pg_dsn: str) -> None:
        """The SQLAlchemy example answers with a sum computed through its session."""
        answer = run_example("sqlalchemy", {"SR_TEST_PG_DSN": pg_dsn})
        assert ast.literal_eval(answer) == {"sum": 42}

    def test_sqlite_example_stores_a_note(self) -> None:
        """The SQLite example stores a note and answers with its id."""
        assert ast.literal_eval(run_example("sqlite", {})) == {"id": 1}


class TestNetworkExamples:
    """Redis, HTTP, files and RabbitMQ."""

    def test_redis_example_caches_a_value(self, redis_url: str) -> None:
        """The Redis example stores a value through a route and reads it back."""
        answer = run_example("redis", {"SR_TEST_REDIS_URL": redis_url})
        assert ast.literal_eval(answer) == {"msg": "cached", "stored": True}

    def test_http_example_calls_its_upstream(self) -> None:
        """The HTTP example relays its local upstream's answer."""
        assert ast.literal_eval(run_example("http", {})) == {"upstream_says": "12:00"}

    def test_files_example_stores_an_upload(self, tmp_path: Path) -> None:
        """The files example stores an upload and prints its content."""
        answer = run_example("files", {"TMPDIR": str(tmp_path)})
        assert answer == "{'note.txt': 5} hello"

    def test_rabbitmq_example_publishes_and_receives(self, amqp_url: str) -> None:
        """The RabbitMQ example publishes a confirmed message and receives it."""
        answer = run_example("rabbitmq", {"SR_TEST_AMQP_URL": amqp_url})
        assert ast.literal_eval(answer) == {"confirmed_and_received": "order-1"}
