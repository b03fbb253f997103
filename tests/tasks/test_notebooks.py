"""Every tutorial in notebooks/ runs top to bottom (in a scratch copy) without error."""

from __future__ import annotations

import shutil

import pytest

from tasks.notebooks import NOTEBOOKS, execute

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_there_are_tutorials():
    assert len(PATHS) >= 1


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    seconds = execute(copy, timeout=300)
    assert seconds < 300
