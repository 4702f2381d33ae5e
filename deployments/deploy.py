"""Register the work-pool deployments: ``python deployments/deploy.py --repository URL --branch NAME``.

Workers bring no code of their own: each flow run starts with the pull step of
``deployments/prefect.yaml``, a shallow ``git clone`` of the branch named by the Prefect variables
``trainflow_repository`` and ``trainflow_branch``. This command checks that the repository and
branch answer (``git ls-remote``), sets those variables, creates the ``trainflow`` process work
pool if it is missing, runs ``prefect deploy`` on ``deployments/prefect.yaml`` and registers the
automations that recover crashed and silent runs (``deployments/automations.py``). Rerunning it
is safe. Workers then run the branch's pushed commit, not this checkout's working tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python deployments/deploy.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.registry import BRANCH_VAR, PREFECT_YAML, REPOSITORY_VAR, WORK_POOL

ROOT = PREFECT_YAML.parents[1]


def git(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail, rather than wait for a password nobody types
    return subprocess.run(["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deployments/deploy.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--repository", help="git URL the workers clone (https://, ssh, file://; default: this "
                   "checkout's 'origin' remote)")
    p.add_argument("--branch", help="branch the workers run (default: this checkout's current branch)")
    return p


def source(args: argparse.Namespace) -> tuple[str, str]:
    """The repository and branch to deploy; ValueError in one line when neither is known."""
    repo = args.repository or git("remote", "get-url", "origin").stdout.strip()
    if not repo:
        raise ValueError("this checkout has no 'origin' remote; pass --repository URL (the git URL workers clone)")
    branch = args.branch or git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    if not branch or branch == "HEAD":
        raise ValueError("this checkout is on no branch; pass --branch NAME (the branch workers run)")
    return repo, branch


def head_of(repo: str, branch: str) -> str:
    """The branch's commit on the repository; ValueError in one line when it cannot be reached."""
    try:
        found = git("ls-remote", "--exit-code", "--heads", "--", repo, branch)
    except subprocess.TimeoutExpired:
        raise ValueError(f"repository {repo} did not answer within 60 s; check the URL and the network") from None
    if found.returncode == 2:
        raise ValueError(f"repository {repo} has no branch {branch!r}; push it, or pass --branch NAME")
    if found.returncode != 0:
        why = (found.stderr.strip().splitlines() or ["git ls-remote failed"])[0].removeprefix("fatal: ")
        raise ValueError(f"cannot reach repository {repo} ({why}); check --repository and its credentials")
    return found.stdout.split()[0]


def register(repo: str, branch: str) -> int:
    """Variables, work pool, deployments, automations; returns ``prefect deploy``'s exit code."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.variables import Variable

    from deployments.automations import register as register_automations

    Variable.set(REPOSITORY_VAR, repo, overwrite=True)
    Variable.set(BRANCH_VAR, branch, overwrite=True)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
        except ObjectAlreadyExists:
            pass
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", str(PREFECT_YAML)], cwd=ROOT, check=False)
    if deployed.returncode == 0:
        register_automations()
    return deployed.returncode


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        repo, branch = source(args)
        commit = head_of(repo, branch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"workers will clone {repo} at branch {branch} (now {commit[:12]})", flush=True)
    code = register(repo, branch)
    if code == 0:
        print(f"deployed to work pool {WORK_POOL!r}; start workers with: "
              f"prefect worker start --pool {WORK_POOL} --type process --limit 1")
    return code


if __name__ == "__main__":
    sys.exit(main())
