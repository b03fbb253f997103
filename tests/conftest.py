from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real MNIST lives beside the checkout (../shared/data/MNIST/raw), read-only.
SHARED_DATA = Path(os.environ.get("OPTLAYERS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set OPTLAYERS_SHARED_DATA)")
    return SHARED_DATA


def task_env(**extra: str) -> dict[str, str]:
    """The environment of a task run in a subprocess: this checkout first on the path, so the
    code under test is this one even where ``import tasks`` would find an editable install of
    another checkout (the main copy beside a git worktree)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_task(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``tasks/<script>`` with ``args`` as a user would (in :func:`task_env`), capturing its
    output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tasks" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=task_env(),
    )


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str, out: Path) -> None:
    """A refused command line: exit 2, one stderr line naming the problem, nothing written."""
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert not any(out.iterdir())
