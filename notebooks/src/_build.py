"""Shared by the notebook generators: cells -> a stored ``.ipynb`` without outputs.

Each ``notebooks/src/NN_name.py`` lists its cells as ``("md" | "code", text)`` pairs and calls
:func:`write`; ``python tasks/notebooks.py --save NN_name.ipynb`` then executes the notebook and
stores its outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1]


def write(cells: list[tuple[str, str]], name: str) -> Path:
    """Write ``notebooks/<name>`` from ``(kind, text)`` cells; returns its path."""
    out = []
    for i, (kind, text) in enumerate(cells):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(text.strip("\n"))
        cell["id"] = f"cell-{i}"
        out.append(cell)
    nb = new_notebook(
        cells=out,
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    path = NOTEBOOKS / name
    nbformat.write(nb, path)
    print(f"wrote {path}")
    return path
