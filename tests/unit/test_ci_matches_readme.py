""".ci/run must run the README's set-up and test commands (CI promises what users run)."""

from tests.helpers import ROOT


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in (
        'pip install torch==2.13.0 && pip install -e ".[dev]"',
        "python -m pytest -q",
        "bash tests/launchers/setup.sh",
        'pip install -e ".[docs]" && mkdocs build --strict',
    ):
        assert command in readme, f"README lost {command!r}"
        assert command.replace("pip install", "pip install -q") in ci or command in ci, (
            f".ci/run does not run {command!r}"
        )
