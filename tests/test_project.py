"""Project promises that are cheap to check: CI runs README's test command."""

from __future__ import annotations

import re

from tests.helpers import ROOT


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one() -> None:
    setup_and_run, setup_and_test = readme_commands()[:2]
    assert "flows/train_flow.py" in setup_and_run and "pytest" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci, ".ci/run must run README's test command verbatim"


def test_help_prints_every_jobs_defaults_without_importing_prefect_or_torch() -> None:
    """--help is for reading: it starts no server and imports neither Prefect nor torch (it
    prints the rendered help, which must be what the options and the jobs' defaults give now:
    regenerate it with `python flows/options.py`)."""
    from flows import HELP_FILE
    from flows.options import rendered_help

    assert HELP_FILE.read_text() == rendered_help(), "flows/train_help.txt is stale: run python flows/options.py"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "flows" / "train_flow.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "torch")}, "--help imported Prefect or torch"
    for default in ("nonlinear: 10000", "fashion_mnist: 10", "linear: 10000", "multi_linear: 20000"):
        assert default in " ".join(proc.stdout.split()), default


def test_every_proof_in_the_guarantees_table_is_a_test() -> None:
    """docs/guarantees.md names the tests that prove each promise: they exist."""
    table = (ROOT / "docs" / "guarantees.md").read_text().split("| promise", 1)[1].split("\n\n**", 1)[0]
    proofs = [row.rsplit("|", 2)[1] for row in table.splitlines() if row.startswith("| ") and "`test_" in row]
    assert len(proofs) >= 15, table
    for proof in proofs:
        module = None
        for name in re.findall(r"`([^`]+)`", proof):
            path, _, test = name.partition("::")
            module = path or module
            source = (ROOT / "tests" / module).read_text()
            assert not test or re.search(rf"^def {re.escape(test)}\(", source, re.M), f"{name}: no such test in {module}"


def test_the_command_opts_prefects_client_out_of_usage_data(monkeypatch) -> None:
    """pyproject.toml opts the server out; the command does the same for the client (the
    documented DO_NOT_TRACK), so a rerun prints no telemetry notice. A user's own choice stays."""
    import gc

    import flows.train_flow as command
    import tasks.orchestration.server as server

    monkeypatch.setattr(server, "launch", lambda: None)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    try:
        command.start_up(["--job", "nonlinear"])
    finally:
        gc.enable()
    assert command.os.environ["DO_NOT_TRACK"] == "1"
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    command.start_up([])
    gc.enable()
    assert command.os.environ["DO_NOT_TRACK"] == "0"
