"""Project promises that are cheap to check: CI runs README's test command."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one() -> None:
    setup_and_run, setup_and_test = readme_commands()[:2]
    assert "flows/train_flow.py" in setup_and_run and "pytest" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci, ".ci/run must run README's test command verbatim"
