"""environment.yml (conda) and pyproject.toml name the same packages."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import ROOT

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = {_name(r) for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["dev"]}

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    have = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            have |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        else:
            have.add(CONDA_TO_PIP.get(_name(dep), _name(dep)))
    have -= NOT_PACKAGES
    assert have == want, f"only in environment.yml: {have - want}; only in pyproject: {want - have}"
