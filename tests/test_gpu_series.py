"""The prepared GPU check (benchmarks/gpu_series.py), dry-run on this CPU with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat

from benchmarks import gpu_series
from utils.paths import REPO_ROOT


def _notebook(tmp_path, *sources: str):
    path = tmp_path / "07_probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


def test_the_cell_runner_runs_cells_in_one_namespace_and_names_the_failing_cell(tmp_path):
    path = _notebook(tmp_path, "x = 2", "display(x * 21)", "assert x == 3, 'wrong'", "never = True")
    before = __import__("os").getcwd()
    result = gpu_series.run_notebook(path)
    assert __import__("os").getcwd() == before  # later tests start subprocesses from the repository root
    assert result["error"]["cell"] == 2 and "AssertionError: wrong" in result["error"]["traceback"]
    assert result["cells"] == 4 and result["not_run"] == []


def test_a_cell_needing_a_package_too_large_to_carry_is_reported_not_hidden(tmp_path):
    path = _notebook(tmp_path, "raise ModuleNotFoundError(\"No module named 'ipywidgets'\", name='ipywidgets')",
                     "raise ModuleNotFoundError(\"No module named 'trl'\", name='trl')")
    result = gpu_series.run_notebook(path)
    assert result["not_run"] == [{"cell": 0, "why": gpu_series.NOT_CARRIED["ipywidgets"]}]
    assert result["error"]["cell"] == 1  # anything else missing is an error
    report = gpu_series.markdown_report({"model": "m", "gpu": "g", "versions": {}, "t4_budget_gib": 15.0,
                                         "notebooks": [{**result, "notebook": path.name}]})
    assert "not run: cell 0" in report and "error in cell 1" in report


def test_the_series_runner_executes_a_real_notebook_in_a_fresh_process(tmp_path):
    env = {"PHI3_LORA_OUTPUTS": str(tmp_path / "outputs")}
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_series", "--model", "tiny", "--only", "01", "--no-benchmark",
         "--report-dir", str(tmp_path / "report")],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**__import__("os").environ, **env}, timeout=600)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "gpu_series.json").read_text())
    assert [row["notebook"] for row in report["notebooks"]] == ["01_data_formatting.ipynb"]
    assert "error" not in report["notebooks"][0] and report["notebooks"][0]["cells"] > 5
