"""The README's promises hold: its examples run, it stays short, and what it cites exists.

* Every ```python block of README.md is executed, each in a fresh namespace of its own (the blocks
  are independent: each does its own imports), in the order they appear; a block that raises
  fails the test named after its index (``test_readme_python_block[0]`` is the first block), with
  the block's line in README.md in the message. The blocks assert their own results (shapes,
  closed forms, a direct CVXPY solve), so a wrong answer fails as surely as an exception.
* README.md is at most ``MAX_README_LINES`` lines.
* Every file or folder that README.md or a results page (``results/*/RESULTS.md``) cites exists in
  the repository (tracked by git, or new and not ignored): markdown links ``[text](path)``,
  relative to the page that holds them, and paths written in backticks (``tasks/run_sort.py``,
  ``results/sort/summary.md``), relative to the repository root. Fenced code blocks, web
  addresses and paths outside the repository (``../shared/data``) are not checked.
* Every results page is linked from README.md, directly or through another results page.
"""

from __future__ import annotations

import re
import subprocess
import traceback
from pathlib import Path

import pytest

import layers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted(ROOT.glob("results/*/RESULTS.md"))
MAX_README_LINES = 200

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")  # may span a line break
# a relative path: segments of word characters, dots and dashes joined by "/"
PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*/?$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every ```python block, ``line`` 1-based (the fence's line)."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == "python"
    ]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_the_quickstart_examples():
    assert len(BLOCKS) >= 4, "README.md lost its ```python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block(index):
    line, source = BLOCKS[index]
    namespace = {"__name__": f"readme_block_{index}"}
    try:
        exec(compile(source, f"README.md block {index} (line {line})", "exec"), namespace)
    except Exception:
        pytest.fail(
            f"README.md python block {index} (line {line}) failed:\n{traceback.format_exc()}",
            pytrace=False,
        )


def test_readme_examples_import_only_exported_names():
    for index, (line, source) in enumerate(BLOCKS):
        for names in re.findall(r"^from layers import (.+)$", source, re.M):
            for name in (n.strip() for n in names.strip("()").split(",")):
                assert name in layers.__all__, f"block {index} (line {line}) imports {name}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def repo_files() -> set[str]:
    """Files git tracks or would track (untracked but not ignored); the disk if git is absent."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()}
    return {f for f in out.splitlines() if (ROOT / f).exists()}


def cited(page: Path) -> list[tuple[str, str]]:
    """``(how it is cited, repo-relative path)`` for every link and backticked path of ``page``."""
    text = FENCE.sub("", page.read_text())
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z+.-]*:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        path = (page.parent / target.split("#")[0]).resolve()
        found.append((f"link ({target})", path.relative_to(ROOT).as_posix()))
    for span in CODE_SPAN.findall(text):
        for token in span.split():
            token = token.rstrip(",;:")
            if "/" not in token or token.startswith(("../", "./", "/")) or not PATH.match(token):
                continue
            if token.endswith("/") or re.search(r"\.[A-Za-z]\w*$", token):
                found.append((f"`{token}`", token.rstrip("/")))
    return found


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_paths_exist(page):
    files = repo_files()
    folders = {parent.as_posix() for f in files for parent in Path(f).parents}
    missing = [how for how, path in cited(page) if path not in files and path not in folders]
    assert not missing, f"{page.relative_to(ROOT)} cites what is not in the repository: {missing}"


def test_every_results_page_is_linked_from_the_readme():
    assert PAGES, "no results/*/RESULTS.md page"
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for how, path in cited(page):
            target = ROOT / path
            if how.startswith("link") and target.name == "RESULTS.md" and target not in reached:
                reached.add(target)
                todo.append(target)
    unlinked = [p.relative_to(ROOT).as_posix() for p in PAGES if p not in reached]
    assert not unlinked, f"results pages not linked from README.md: {unlinked}"
