"""Static checks on the notebooks: clean, consistent, and shaped the way CONTRIBUTING.md says.

(The notebooks themselves are executed by nbval: `pytest` collects notebooks/*.ipynb.)
"""

from __future__ import annotations

import re

import nbformat
import pytest

from utils.paths import NOTEBOOKS_DIR, REPO_ROOT
from utils.series import series_notebooks

NOTEBOOKS = series_notebooks()


def test_the_series_is_numbered_without_gaps():
    numbers = [int(path.name[:2]) for path in NOTEBOOKS]
    assert numbers == list(range(len(numbers))) and numbers, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {index} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    cells = nbformat.read(path, as_version=4).cells
    colab_cell = nbformat.read(NOTEBOOKS_DIR / "00_setup.ipynb", as_version=4).cells[0].source
    assert cells[0].source == colab_cell, f"{path.name}: the first cell must be the shared Colab cell"
    assert cells[1].cell_type == "markdown" and cells[1].source.startswith("# "), "title cell"
    intro = cells[1].source.lower()
    assert "what you will learn" in intro and "what you need" in intro and "what it produces" in intro
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged `parameters`"
    assert "MODEL_NAME" in tagged[0].source
    assert "## Summary" in cells[-1].source or "## Summary" in cells[-2].source
    for cell in cells:
        if cell.cell_type == "code":
            assert "trust_remote_code=True" not in cell.source
            assert ".to(\"cuda\")" not in cell.source and ".cuda()" not in cell.source


def test_colab_cell_matches_contributing_md():
    contributing = (REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    colab_cell = nbformat.read(NOTEBOOKS_DIR / "00_setup.ipynb", as_version=4).cells[0].source
    assert colab_cell in contributing


def test_no_notebook_grows_a_helper_that_another_notebook_needs():
    """A function defined in a notebook is local to it: none is defined twice or called from another notebook."""
    sources = {path.name: "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
               for path in NOTEBOOKS}
    defined = {name: set(re.findall(r"^def (\w+)\(", source, re.M)) for name, source in sources.items()}
    for owner, functions in defined.items():
        for function in functions:
            users = [other for other, source in sources.items()
                     if other != owner and re.search(rf"\b{function}\(", source)]
            assert not users, f"{function}() from {owner} is also used in {users}: move it into utils/"
