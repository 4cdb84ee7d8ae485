"""`make demo`'s runner: papermill executes the notebooks, and the progress bars stay readable in what it saves."""

from __future__ import annotations

import os

import nbformat
import papermill
import pytest

from utils.runtime import TEXT_PROGRESS_ENV_VAR

PROGRESS_CELL = "from utils.runtime import progress_bar\nfor _ in progress_bar(range(3), desc='counting'):\n    pass\n"


def _saved_outputs(tmp_path, text_progress: bool) -> list[dict]:
    """Run a one-cell notebook with papermill (a real kernel) and return the saved cell's outputs."""
    source, executed = tmp_path / "bar.ipynb", tmp_path / "bar-run.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROGRESS_CELL)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, source)
    saved = os.environ.pop(TEXT_PROGRESS_ENV_VAR, None)
    try:
        if text_progress:
            os.environ[TEXT_PROGRESS_ENV_VAR] = "1"  # what utils.series sets before running the notebooks
        papermill.execute_notebook(str(source), str(executed), kernel_name="python3", progress_bar=False)
    finally:
        os.environ.pop(TEXT_PROGRESS_ENV_VAR, None)
        if saved is not None:
            os.environ[TEXT_PROGRESS_ENV_VAR] = saved
    return nbformat.read(executed, as_version=4).cells[0].outputs  # stream text joined into one string


@pytest.mark.parametrize("text_progress", [True, False], ids=["make-demo", "jupyter"])
def test_progress_bars_are_text_under_make_demo_and_widgets_in_a_notebook_kernel(tmp_path, text_progress):
    outputs = _saved_outputs(tmp_path, text_progress)
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if text_progress:
        assert "counting: 100%" in text and "3/3" in text and not widgets, outputs
    else:
        assert widgets and "counting: 100%" not in text, outputs


def test_the_series_runner_asks_the_kernels_for_text_bars(monkeypatch, tmp_path):
    """utils.series sets the variable the kernels inherit before the first notebook runs."""
    import utils.series as series

    monkeypatch.delenv(TEXT_PROGRESS_ENV_VAR, raising=False)
    monkeypatch.setattr(series, "series_notebooks", lambda: [])
    monkeypatch.setenv("PHI3_LORA_OUTPUTS", str(tmp_path))
    series.run_series()
    assert os.environ[TEXT_PROGRESS_ENV_VAR] == "1"
