"""The command line in-process: exit codes, output, and usage errors."""

import json

import pytest

from scoped_resources._cli import main


class TestCommands:
    """``check`` and ``graph`` as called from the console script."""

    def test_check_prints_each_problem_and_exits_1(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Three problems give three lines on stdout and a summary on stderr."""
        assert main(["check", "tests.tools.apps:many"]) == 1
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 3
        assert err == "tests.tools.apps:many: 4 resources checked, 3 problem(s)\n"

    def test_check_json_of_a_sound_app(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--json`` on a sound app says ok and exits 0."""
        assert main(["check", "--json", "tests.tools.apps:sound"]) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True

    def test_a_registry_can_be_the_target(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``MODULE:RESOURCES`` checks that registry alone (no routes)."""
        assert main(["check", "tests.tools.cyclic_app:resources"]) == 1
        assert capsys.readouterr().out.startswith("cycle: ")

    def test_graph_mermaid_and_dot(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``graph`` prints Mermaid, ``graph --dot`` prints DOT; both exit 0."""
        assert main(["graph", "tests.tools.apps:sound"]) == 0
        assert capsys.readouterr().out.startswith("flowchart LR\n")
        assert main(["graph", "--dot", "tests.tools.apps:sound"]) == 0
        assert capsys.readouterr().out.startswith("digraph resources {\n")

    def test_graph_of_several_registries_prefixes_each(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two registries get their names on their scope groups and distinct node ids."""
        assert main(["graph", "tests.tools.apps:foreign_route"]) == 0
        out = capsys.readouterr().out
        assert 'subgraph s0_app["mine: app scope"]' in out
        assert "r1_res_stray" in out
        assert main(["graph", "--dot", "tests.tools.apps:foreign_route"]) == 0
        assert 'label="theirs: request scope";' in capsys.readouterr().out


class TestUsageErrors:
    """A target that cannot be used exits 2 with one line on stderr."""

    @pytest.mark.parametrize(
        ("target", "message"),
        [
            (":app", "is not MODULE:APP"),
            ("tests.tools.no_such:app", "cannot import module 'tests.tools.no_such'"),
            ("tests.tools.apps:nothing_here", "has no attribute 'nothing_here'"),
            (
                "tests.tools.raising_app:app",
                "importing 'tests.tools.raising_app' raised RuntimeError: DATABASE_URL is not set",
            ),
            ("tests.tools.apps:bare", "uses no Resources registry"),
        ],
    )
    def test_bad_target(
        self, capsys: pytest.CaptureFixture[str], target: str, message: str
    ) -> None:
        """The line names what is wrong with the target."""
        assert main(["check", target]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scoped-resources: ")
        assert message in err
        assert len(err.splitlines()) == 1


def test_python_dash_m_runs_the_same_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m scoped_resources`` exits with the command's code."""
    import runpy

    import scoped_resources

    monkeypatch.setattr("sys.argv", ["scoped_resources", "check", "tests.tools.apps:sound"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(f"{scoped_resources.__path__[0]}/__main__.py", run_name="__main__")
    assert stopped.value.code == 0
    assert "ok" in capsys.readouterr().err
