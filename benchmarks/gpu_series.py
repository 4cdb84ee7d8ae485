"""The prepared GPU check: the whole series (00-06) on a full-size Phi-3-mini, then the GPU speed benchmark.

No GPU is here, and the GPU machine that is sometimes lent (the ``device`` tool) cannot reach the Hub or
PyPI. So the check runs on ``phi3-mini-random`` (Phi-3-mini's exact architecture and size, random weights,
the real tokenizer: memory and speed do not depend on the weights' values), with the notebooks' smoke
sizes (few steps), and the packages that the device image lacks travel as wheels. Three steps:

1. here, on the CPU machine (downloads wheels for the device's Python 3.12, exports the benchmark's
   conversations, copies the built tokenizer; prints the size that will travel and the command to run)::

       .venv/bin/python -m benchmarks.gpu_series --prepare

2. on the device (one call of the ``run`` tool, ~8 minutes)::

       run(command="bash benchmarks/gpu_series.sh", carry=[".whl", ".gpu-carry"], timeout_s=600)

3. the report comes back as ``gpu_series.json`` and ``gpu_series.md`` (per notebook: wall time, peak CUDA
   memory against the 16 GB budget of ``utils.memory_budget``, and any error; then the speed table).

Notebooks run in-process by a minimal cell runner (the device image has no Jupyter): one fresh Python
process per notebook, code cells executed in order in one namespace, ``display`` printing. A cell that
needs a package the device image lacks and that is too large to carry (ipywidgets with IPython, for the
chat box of 06) is reported as not run, by name, never silently skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"  # git-ignored: wheels that travel to the device
CARRY = REPO / ".gpu-carry"  # git-ignored: the built tokenizer and the benchmark conversations
CARRY_LIMIT_MIB = 64  # the device tool moves at most 64 MiB (working tree + carried folders)
STAND_IN = "phi3-mini-random"
# Packages the notebooks need that the device image (Python 3.12, torch, transformers, accelerate, pandas,
# matplotlib, safetensors, sentencepiece, pyyaml, psutil, tqdm) does not have at a usable version. transformers and
# tokenizers are taken from the image (5.17 / 0.23.2 there against the pins 5.24.0 / 0.23.3): carrying them would
# not fit beside bitsandbytes; the report records the versions that ran.
DEVICE_WHEELS = ("bitsandbytes==0.50.2", "trl==1.16.0", "peft==0.21.2", "datasets==5.2.0", "dill==0.4.0",
                 "multiprocess==0.70.18", "loralib==0.1.2", "nltk==3.9.2", "absl-py==2.3.1")
SDIST_ONLY = ("rouge-score==0.1.2",)  # pure Python, published as an sdist: built into a wheel here
NOT_CARRIED = {"ipywidgets": "the chat box of 06 (ipywidgets needs IPython and Jupyter's widget stack: too large)"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def folder_mib(folder: Path) -> float:
    """Size of every file under ``folder`` in MiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def prepare() -> None:
    """(CPU machine) Download the wheels, export conversations, copy the tokenizer, check the size that travels."""
    from benchmarks.gpu_phi3_mini import SEQUENCE_LENGTH, export_conversations
    from utils.models import build_phi3_tokenizer

    WHEELS.mkdir(exist_ok=True)
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform_args, "--platform", "any",
                    "-d", str(WHEELS), *DEVICE_WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(WHEELS), *SDIST_ONLY],
                   check=True)
    CARRY.mkdir(exist_ok=True)
    shutil.copytree(build_phi3_tokenizer(), CARRY / "phi3-tokenizer-v1", dirs_exist_ok=True)
    export_conversations(CARRY / "gpu_conversations.json", n_train=120, n_heldout=16, max_tokens=SEQUENCE_LENGTH,
                         seed=0)
    tracked = sum((REPO / line).stat().st_size for line in subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split() if
        (REPO / line).is_file()) / 2**20
    total = tracked + folder_mib(WHEELS) + folder_mib(CARRY)
    print(f"Travels: repository {tracked:.1f} MiB + .whl {folder_mib(WHEELS):.1f} MiB + .gpu-carry "
          f"{folder_mib(CARRY):.1f} MiB = {total:.1f} MiB (limit {CARRY_LIMIT_MIB} MiB)")
    if total > CARRY_LIMIT_MIB:
        sys.exit("Too large for the device tool: drop a wheel from DEVICE_WHEELS and say so in the report.")
    print('Then: run(command="bash benchmarks/gpu_series.sh", carry=[".whl", ".gpu-carry"], timeout_s=600)')


def display(*objects: Any) -> None:
    """What a notebook's ``display`` shows, as text."""
    for item in objects:
        print(item.to_string() if hasattr(item, "to_string") else item)


def run_notebook(path: Path) -> dict[str, Any]:
    """Execute a notebook's code cells in order in this process; wall time, peak CUDA memory, first error."""
    import torch

    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    namespace: dict[str, Any] = {"__name__": "__main__", "display": display}
    result: dict[str, Any] = {"notebook": path.name, "cells": len(cells), "not_run": []}
    previous_cwd = Path.cwd()
    os.chdir(path.parent)  # notebooks run from their folder, as Jupyter runs them
    start = time.perf_counter()
    try:
        _run_cells(cells, path.name, namespace, result)
    finally:
        os.chdir(previous_cwd)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if torch.cuda.is_available():
        result["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


def _run_cells(cells: list[dict[str, Any]], name: str, namespace: dict[str, Any], result: dict[str, Any]) -> None:
    """Execute code cells in order; record cells that need an uncarried package and the first error."""
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        try:
            exec(compile(source, f"<{name} code cell {index}>", "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name in NOT_CARRIED:
                result["not_run"].append({"cell": index, "why": NOT_CARRIED.get(error.name, str(error))})
                continue
            result["error"] = {"cell": index, "traceback": traceback.format_exc(limit=6)}
            break
        except Exception:  # noqa: BLE001 - the report names the cell and the traceback
            result["error"] = {"cell": index, "traceback": traceback.format_exc(limit=6)}
            break


def run_series(model: str, only: list[str] | None, report_dir: Path) -> list[dict[str, Any]]:
    """Every notebook in its own process (a fresh CUDA context each), in order; stops at the first failure."""
    from utils.series import series_notebooks

    results = []
    for notebook in series_notebooks():
        if only and not any(notebook.name.startswith(prefix) for prefix in only):
            continue
        out = report_dir / f"{notebook.stem}.json"
        command = [sys.executable, "-m", "benchmarks.gpu_series", "--notebook", str(notebook), "--result", str(out)]
        env = {**os.environ, "PHI3_LORA_MODEL": model, "PHI3_LORA_SMOKE": "1", "MPLBACKEND": "Agg"}
        began = time.perf_counter()
        finished = subprocess.run(command, env=env, cwd=REPO)
        row = json.loads(out.read_text()) if out.exists() else {"notebook": notebook.name,
                                                               "error": {"exit_code": finished.returncode}}
        row["process_seconds"] = round(time.perf_counter() - began, 1)
        results.append(row)
        print(f"{notebook.name:<32} {row.get('seconds', '-')!s:>7} s  peak "
              f"{row.get('peak_cuda_gib', '-')} GiB  {'ERROR in cell ' + str(row['error'].get('cell')) if 'error' in row else 'ok'}",
              flush=True)
        if "error" in row:
            break
    return results


def markdown_report(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    lines = [f"# GPU check: {report['model']} on {report['gpu']}", "",
             f"Versions: {json.dumps(report['versions'])}", "",
             "| notebook | seconds | peak CUDA allocated GiB | reserved GiB | fits 16 GB T4 budget | result |",
             "|---|---|---|---|---|---|"]
    for row in report["notebooks"]:
        peak = row.get("peak_cuda_reserved_gib")
        fits = "-" if peak is None else ("yes" if peak <= report["t4_budget_gib"] else "NO")
        status = f"error in cell {row['error'].get('cell')}" if "error" in row else "ok"
        if row.get("not_run"):
            status += "; not run: " + ", ".join(f"cell {c['cell']} ({c['why']})" for c in row["not_run"])
        lines.append(f"| {row['notebook']} | {row.get('seconds', '-')} | {row.get('peak_cuda_gib', '-')} | "
                     f"{peak if peak is not None else '-'} | {fits} | {status} |")
    for row in report["notebooks"]:
        if "error" in row and "traceback" in row["error"]:
            lines += ["", f"## {row['notebook']}: error", "```", row["error"]["traceback"], "```"]
    if report.get("benchmark_tail"):
        lines += ["", "## Speed benchmark (benchmarks.gpu_phi3_mini)", "```", report["benchmark_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: --prepare (CPU), --notebook (one notebook, used internally), or the whole check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="(CPU machine) get what travels to the device")
    parser.add_argument("--model", default=STAND_IN, help="model name for the notebooks (default: phi3-mini-random)")
    parser.add_argument("--only", nargs="*", help="notebooks whose names start with these prefixes")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the speed benchmark")
    parser.add_argument("--report-dir", type=Path, default=Path(os.environ.get("OUT") or REPO / "outputs" / "gpu"))
    parser.add_argument("--notebook", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare()
        return
    if args.notebook:
        args.result.write_text(json.dumps(run_notebook(args.notebook.resolve()), indent=1))
        return

    import torch
    import transformers

    from utils.models import model_source, resolve_model_name
    from utils.memory import T4_MEMORY_GIB

    args.report_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    source = model_source(resolve_model_name(args.model))  # builds the stand-in once (GPU: seconds + the write)
    print(f"{args.model}: {source} ready in {time.perf_counter() - began:.0f} s", flush=True)
    report: dict[str, Any] = {
        "model": args.model, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "t4_budget_gib": T4_MEMORY_GIB,
        "notebooks": run_series(args.model, args.only, args.report_dir),
    }
    if not args.no_benchmark and torch.cuda.is_available():
        bench = subprocess.run([sys.executable, "-m", "benchmarks.gpu_phi3_mini", "--model-dir", source,
                                "--conversations", str(CARRY / "gpu_conversations.json"),
                                "--configs", "lora-defaults", "qlora-defaults", "--steps", "6"],
                               cwd=REPO, capture_output=True, text=True)
        report["benchmark_tail"] = (bench.stdout + bench.stderr)[-4000:]
    (args.report_dir / "gpu_series.json").write_text(json.dumps(report, indent=1, default=str))
    (args.report_dir / "gpu_series.md").write_text(markdown_report(report))
    print(markdown_report(report))
    if any("error" in row for row in report["notebooks"]):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
