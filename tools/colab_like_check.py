"""Run the Colab cell and notebook 00 in a fresh Colab-like environment, offline from Colab itself.

    python tools/colab_like_check.py [--report report.json] [--notebook path/to/00_setup.ipynb] [--keep DIR]

The environment is what a fresh Colab runtime looks like to the course: a Python with torch, numpy, pandas,
matplotlib and an older transformers already installed at versions *other* than requirements.txt's pins, a
Jupyter kernel, no test runners, and an importable ``google.colab`` module (a stand-in: the cell only checks
that it is imported). The course is cloned by the cell itself from a git snapshot of this working tree
(``PHI3_LORA_REPO``) into a temporary "/content" (``PHI3_LORA_COURSE_DIR``).

Two kernels run, as a reader would on Colab:
1. ``import transformers`` (Colab's old one), then the Colab cell: it installs the pins and must stop with
   "restart the runtime", because the imported transformers was replaced on disk;
2. the "restarted runtime": the Colab cell again (nothing left to install, no restart), then every other cell
   of 00_setup on the tiny model, offline.

The Colab-like base (about 1.3 GB) is built once into ``.cache/colab-like/base-<hash>/`` and never modified:
each run makes a new, empty virtual environment on top of it (the base's site-packages come after its own on
``sys.path``, as Colab's system packages do), so whatever the cell installs lands in the new environment and
the base stays fresh for the next run. The report (JSON) lists versions before and after, what each kernel
printed, and timings; tests/test_colab.py asserts on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# What a fresh Colab runtime brings that matters to the course: the kernel's own packages at versions other
# than requirements.txt's pins, and an older transformers, which the cell must replace (and then ask for a restart).
COLAB_LIKE_BASE = [
    "torch==2.13.0",  # the CPU wheel on this machine's disk; Colab's is a CUDA build of its own version
    "numpy==2.3.5",  # pin: 2.4.6
    "pandas==2.2.3",  # pin: 3.1.1
    "matplotlib==3.10.9",  # pin: 3.11.2
    "transformers==4.57.6",  # pin: 5.24.0 (Colab ships transformers 4.x)
    "ipykernel",
    "ipywidgets",
    "tqdm",
    "pyyaml",
    "psutil",
    "nbclient==0.11.0",  # runs the notebooks here (Colab has its own front end)
    "nbformat==5.11.1",
]
KERNEL_NAME = "colab-like"
FAKE_COLAB = '"""Stand-in for Colab\'s google.colab: the course\'s first cell only checks that it is imported."""\n'
VERSIONS_SCRIPT = """
import importlib.metadata as m, json, re
seen = {}
for d in m.distributions():
    name = d.metadata["Name"]
    if name:
        seen.setdefault(re.sub(r"[-_.]+", "-", name).lower(), [d.version, str(d.locate_file(""))])
print(json.dumps(seen))
"""


def log(message: str) -> None:
    """Progress on stderr, with the time."""
    print(f"[colab-like {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def site_packages(prefix: Path) -> Path:
    """The purelib folder of the virtual environment at ``prefix``."""
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would leak the course's own venv or settings."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not key.startswith(("PHI3_LORA_", "JUPYTER"))}
    env.update(PYTHONNOUSERSITE="1", **extra)
    return env


def base_venv(cache: Path) -> Path:
    """The Colab-like base environment, built once per package list (atomically: a half-built one is never used)."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], "pip upgraded", COLAB_LIKE_BASE]).encode()).hexdigest()[:12]
    target = cache / f"base-{key}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".base-{key}.", dir=cache))
    try:
        log(f"building the Colab-like base once into {target} (a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, env=clean_env())  # Colab's pip is recent
        subprocess.run([*pip, *COLAB_LIKE_BASE], check=True, env=clean_env())
        (staging / ".complete").write_text("\n".join(COLAB_LIKE_BASE) + "\n")
        if target.exists():  # an incomplete copy from an interrupted build
            shutil.rmtree(target)
        staging.rename(target)
        for older in cache.glob("base-*"):  # bases for an older package list (about 1.4 GB each)
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def overlay_venv(base: Path, folder: Path, fake_colab: Path) -> Path:
    """A new, empty venv that sees the base's packages after its own and imports the stand-in google.colab."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    base_site = site_packages(base)
    (site_packages(folder) / "colab_like.pth").write_text(
        f"import site; site.addsitedir({str(base_site)!r})\n{fake_colab}\nimport google.colab\n")
    return folder / "bin" / "python"


def snapshot_repository(source: Path, target: Path) -> Path:
    """A git repository holding this working tree's files (tracked and new, not ignored), committed once."""
    listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        path = source / name
        if path.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)
    git = ["git", "-C", str(target), "-c", "user.name=colab-like", "-c", "user.email=colab-like@localhost"]
    subprocess.run([*git, "init", "--quiet"], check=True)
    subprocess.run([*git, "add", "--all"], check=True)
    subprocess.run([*git, "commit", "--quiet", "--no-verify", "-m", "working tree snapshot"], check=True)
    return target


def versions(python: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """``{name: [version, folder]}`` as the given interpreter sees them (the first of each name on sys.path)."""
    result = subprocess.run([str(python), "-c", VERSIONS_SCRIPT], check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout)


def run(notebook: Path | None, work: Path, cache: Path, cell_from: Path | None = None) -> dict:
    """Build the environment under ``work``, run both kernels, and return the report."""
    started = time.perf_counter()
    base = base_venv(cache)
    built = time.perf_counter()
    origin = snapshot_repository(REPO_ROOT, work / "origin")
    fake = work / "fake-colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text(FAKE_COLAB)
    python = overlay_venv(base, work / "venv", fake)
    kernels = work / "jupyter" / "kernels" / KERNEL_NAME
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab-like", "language": "python"}))
    outputs_cache = work / "cache"
    # The Phi-3 vocabulary comes from a 77 MB sdist on PyPI: reuse the course's copy when there is one (a fresh
    # Colab downloads it the same way; the download is not what this check is about).
    vocab = Path(os.environ.get("PHI3_LORA_CACHE") or REPO_ROOT / ".cache") / "phi3-vocab"
    if vocab.is_dir():
        shutil.copytree(vocab, outputs_cache / "phi3-vocab")
    (work / "content").mkdir()
    env = clean_env(
        PHI3_LORA_REPO=str(origin), PHI3_LORA_COURSE_DIR=str(work / "content" / "phi3-lora-course"),
        PHI3_LORA_MODEL="tiny", PHI3_LORA_SMOKE="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
        PHI3_LORA_OUTPUTS=str(work / "outputs"), PHI3_LORA_CACHE=str(outputs_cache),
        TOKENIZERS_PARALLELISM="false", JUPYTER_PATH=str(work / "jupyter"), JUPYTER_DATA_DIR=str(work / "jupyter"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    before = versions(python, env)
    plan = {"notebook": str(notebook or origin / "notebooks" / "00_setup.ipynb"), "cwd": str(work / "content"),
            "colab_cell": first_cell(cell_from) if cell_from else colab_cell(origin),
            "result": str(work / "driver.json")}
    (work / "plan.json").write_text(json.dumps(plan))
    log(f"running the kernels in {work}")
    driver = subprocess.run([str(python), __file__, "--drive", str(work / "plan.json")], env=env)
    report = json.loads((work / "driver.json").read_text()) if (work / "driver.json").exists() else {}
    report.update(
        driver_returncode=driver.returncode, before=before, after=versions(python, env),
        overlay_site_packages=str(site_packages(work / "venv")), base=str(base), work=str(work),
        environment_json=(work / "outputs" / "setup" / "environment.json").exists(),
        seconds={"base": round(built - started, 1), "total": round(time.perf_counter() - started, 1),
                 **report.get("seconds", {})},
    )
    return report


def colab_cell(origin: Path) -> str:
    """The cell that the snapshot's utils.colab renders (every notebook carries the same text: a test checks)."""
    result = subprocess.run([sys.executable, "-c", "from utils.colab import colab_cell_source as c; print(c())"],
                            cwd=origin, check=True, capture_output=True, text=True, env=clean_env())
    return result.stdout.removesuffix("\n")


def first_cell(notebook: Path) -> str:
    """The first cell's source of a notebook file (to try a notebook's own cell instead of the rendered one)."""
    return "".join(json.loads(notebook.read_text(encoding="utf-8"))["cells"][0]["source"])


def drive(plan_path: Path) -> None:
    """Inside the Colab-like venv: run kernel 1 (pre-imported transformers) and kernel 2 (the restarted runtime)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    plan = json.loads(plan_path.read_text())
    report: dict = {"kernels": {}, "seconds": {}}

    def execute(label: str, sources: list[str]) -> None:
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
        client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=900,
                                resources={"metadata": {"path": plan["cwd"]}})
        start = time.perf_counter()
        error = None
        try:
            client.execute()
        except CellExecutionError as exc:
            error = str(exc)
        report["seconds"][label] = round(time.perf_counter() - start, 1)
        cells = []
        for cell in notebook.cells:
            text = []
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream":
                    text.append(output["text"])
                elif output.get("output_type") == "error":
                    text.append(f"{output['ename']}: {output['evalue']}")
                elif "text/plain" in output.get("data", {}):
                    text.append(output["data"]["text/plain"])
            cells.append({"source": cell.source[:200], "executed": cell.execution_count is not None,
                          "output": "".join(text)})
        report["kernels"][label] = {"error": error, "cells": cells}
        log(f"{label}: {'error' if error else 'ok'} in {report['seconds'][label]} s")

    execute("first_run", ["import transformers\nprint('Colab kernel imported transformers', transformers.__version__)",
                          plan["colab_cell"]])
    setup = nbformat.read(plan["notebook"], as_version=4)
    execute("after_restart", [plan["colab_cell"], *(c.source for c in setup.cells[1:] if c.cell_type == "code")])
    Path(plan["result"]).write_text(json.dumps(report, indent=1))


def main() -> int:
    """Command line: build, run, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--notebook", type=Path, help="the 00 notebook to run (default: the snapshot's)")
    parser.add_argument("--cell-from", type=Path, help="run this notebook's first cell instead of the rendered one")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "colab-like",
                        help="where the Colab-like base environment is kept between runs")
    parser.add_argument("--drive", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive)
        return 0
    if args.keep:
        args.keep.mkdir(parents=True)
        report = run(args.notebook, args.keep.resolve(), args.cache, args.cell_from)
    else:
        with tempfile.TemporaryDirectory(prefix="colab-like-") as folder:
            report = run(args.notebook, Path(folder), args.cache, args.cell_from)
    text = json.dumps(report, indent=1)
    if args.report:
        args.report.write_text(text)
    else:
        print(text)
    return 0 if report.get("driver_returncode") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
