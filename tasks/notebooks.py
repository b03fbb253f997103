"""Execute the tutorials in notebooks/: ``python tasks/notebooks.py [--save] [NAME ...]``.

Without ``--save`` each notebook runs top to bottom in a scratch copy (what the tests do): a cell
that raises fails the run. With ``--save`` the executed notebook, outputs included, replaces the
stored one, with volatile metadata (execution counts, timings, kernel versions) stripped so a
re-run changes only outputs that really changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(path: str | Path, *, save: bool = False, timeout: int = 300) -> float:
    """Run one notebook (working directory: the repository root); returns seconds taken."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    seconds = time.perf_counter() - t0
    if save:
        nb.metadata = {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
        for i, cell in enumerate(nb.cells):
            cell.metadata = {}
            cell["id"] = f"cell-{i}"
            if cell.cell_type == "code":
                cell.execution_count = None
                for out in cell.get("outputs", []):
                    out.pop("execution_count", None)
                    if "execution_count" in out.get("metadata", {}):
                        out["metadata"].pop("execution_count")
        nbformat.write(nb, path)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="notebook file names (default: all)")
    p.add_argument("--save", action="store_true", help="store the executed notebooks")
    args = p.parse_args()
    paths = [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: ", end="", flush=True)
        print(f"{execute(path, save=args.save):.1f}s")
    sys.exit(0)


if __name__ == "__main__":
    main()
