"""``scoped-resources graph``: the declared graph as Mermaid or DOT."""

import shutil
import subprocess

import pytest

from .test_check import run_cli

SMALL_MERMAID = """\
flowchart LR
  subgraph s0_app["app scope"]
    res_client["client"]
  end
  subgraph s0_response["request scope (after response)"]
    res_audit["audit"]
  end
  subgraph s0_request["request scope"]
    res_session["session"]
  end
  subgraph routes["routes"]
    route0(["GET /things"])
    route1(["POST /things"])
  end
  res_session --> res_client
  route0 --> res_session
  route1 --> res_session
  route1 --> res_audit
"""

SMALL_DOT = """\
digraph resources {
  rankdir=LR;
  graph [fontname="Helvetica"];
  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];
  subgraph cluster_0_app {
    label="app scope";
    res_client [label="client"];
  }
  subgraph cluster_0_response {
    label="request scope (after response)";
    res_audit [label="audit"];
  }
  subgraph cluster_0_request {
    label="request scope";
    res_session [label="session"];
  }
  subgraph cluster_routes {
    label="routes";
    route0 [label="GET /things", shape=oval, fillcolor="#fdf3e1"];
    route1 [label="POST /things", shape=oval, fillcolor="#fdf3e1"];
  }
  res_session -> res_client;
  route0 -> res_session;
  route1 -> res_session;
  route1 -> res_audit;
}
"""


def test_mermaid_of_the_small_app_is_pinned() -> None:
    """Scopes are subgraphs; needs and route uses are arrows; routes using none are left out."""
    done = run_cli("graph", "tests.tools.apps:sound")
    assert done.returncode == 0, done.stderr
    assert done.stdout == SMALL_MERMAID


def test_dot_of_the_small_app_is_pinned() -> None:
    """``--dot`` prints the same graph for Graphviz, scopes as clusters."""
    done = run_cli("graph", "--dot", "tests.tools.apps:sound")
    assert done.returncode == 0, done.stderr
    assert done.stdout == SMALL_DOT


def test_graph_of_a_broken_app_still_draws_what_compiles() -> None:
    """A cycle is drawn as the two arrows that make it, so the picture shows the problem."""
    done = run_cli("graph", "tests.tools.cyclic_app:app")
    assert done.returncode == 0
    assert "res_first --> res_second" in done.stdout
    assert "res_second --> res_first" in done.stdout


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_dot_output_renders_with_graphviz() -> None:
    """Graphviz accepts the DOT of the reference service and draws an SVG."""
    done = run_cli("graph", "--dot", "service.app:app")
    svg = subprocess.run(  # noqa: S603 - Graphviz, found on PATH by the skip condition
        [str(shutil.which("dot")), "-Tsvg"],
        input=done.stdout,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert svg.lstrip().startswith("<?xml")
    assert "db.connection" in svg
