"""Run the whole notebook series in order (``make demo``): ``python -m utils.series [--model NAME]``.

Each notebook is executed by papermill into ``outputs/notebooks/`` with its parameters cell left
to read ``$PHI3_LORA_MODEL``; the source notebooks are never modified. A failing notebook stops
the series and says where its partly executed copy is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from utils.models import MODEL_ENV_VAR
from utils.paths import EXECUTED_NOTEBOOKS, NOTEBOOKS_DIR, artifact, outputs_dir
from utils.runtime import TEXT_PROGRESS_ENV_VAR


def series_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The lessons in order: ``NN_name.ipynb`` sorted by number."""
    return sorted(path for path in folder.glob("[0-9][0-9]_*.ipynb"))


def run_series(model: str | None = None, only: list[str] | None = None) -> list[tuple[str, float]]:
    """Execute every notebook (or those whose name starts with one of ``only``); returns (name, seconds)."""
    import papermill  # lazy: a test/demo tool, not installed on Colab (utils.colab.NOT_ON_COLAB)

    if model:
        os.environ[MODEL_ENV_VAR] = model
    os.environ[TEXT_PROGRESS_ENV_VAR] = "1"  # the kernels inherit it: the saved notebooks keep the bars as text
    target = artifact(EXECUTED_NOTEBOOKS + "/.keep").parent
    timings: list[tuple[str, float]] = []
    for notebook in series_notebooks():
        if only and not any(notebook.name.startswith(prefix) for prefix in only):
            continue
        executed = target / notebook.name
        print(f"==> {notebook.name}  (model: {os.environ.get(MODEL_ENV_VAR, 'auto')})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook), str(executed), cwd=str(notebook.parent), progress_bar=True, kernel_name="python3"
            )
        except Exception as error:  # papermill raises PapermillExecutionError with the cell's traceback
            print(f"\n{notebook.name} failed; the partly executed copy is {executed}\n{error}", file=sys.stderr)
            raise SystemExit(1) from None
        timings.append((notebook.name, time.perf_counter() - start))
        print(f"    done in {timings[-1][1] / 60:.1f} min -> {executed}", flush=True)
    return timings


def main() -> None:
    """Command-line entry point for ``make demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model name (default: ${MODEL_ENV_VAR} or auto)")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose names start with these prefixes")
    args = parser.parse_args()
    timings = run_series(args.model, args.only)
    total = sum(seconds for _, seconds in timings)
    print("\nNotebook                              minutes")
    for name, seconds in timings:
        print(f"{name:<38}{seconds / 60:7.1f}")
    print(f"{'total':<38}{total / 60:7.1f}")
    print(f"\nEverything the series produced is in {outputs_dir()}:")
    for path in sorted(outputs_dir().iterdir()):
        if path.name != "smoke":
            print(f"  {path}")


if __name__ == "__main__":
    main()
