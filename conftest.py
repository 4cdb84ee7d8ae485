"""Test settings: every notebook and test runs the tiny Phi-3 in smoke mode, writing to outputs/smoke/.

These environment variables are set before any notebook kernel starts, so nbval's kernels inherit them.

Memory traces: unless ``$PHI3_LORA_MEMORY_TRACE`` is set to an empty string, every notebook kernel started
under pytest loads ``tests/support/memory_trace.py`` through an IPython startup file (an ``IPYTHONDIR``
written under the trace folder) and records which models it holds at once into
``$PHI3_LORA_OUTPUTS/memory-trace/<notebook>.json``; ``tests/test_memory_budget.py`` prices them as Phi-3-mini.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from utils.paths import REPO_ROOT

os.environ.setdefault("PHI3_LORA_MODEL", "tiny")
os.environ.setdefault("PHI3_LORA_SMOKE", "1")
os.environ.setdefault("PHI3_LORA_OUTPUTS", str(REPO_ROOT / "outputs" / "smoke"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the Hub
os.environ.setdefault("MPLBACKEND", "Agg")

MEMORY_TRACE_ENV_VAR = "PHI3_LORA_MEMORY_TRACE"  # folder of the traces; "" switches tracing off
MEMORY_TRACE_NOTEBOOK_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK"  # the notebook the next kernel runs
MEMORY_TRACE_SHA_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK_SHA256"  # ... as nbval read it (collection time)
MEMORY_TRACER = REPO_ROOT / "tests" / "support" / "memory_trace.py"
MEMORY_BUDGET_TABLE = "budget.md"  # written by tests/test_memory_budget.py, shown at the end of the run
_SESSION_START = time.time()
_COLLECTED_SHA256: dict[str, str] = {}  # notebook path -> sha256 of the file nbval collected

STARTUP_FILE = '''\
# Written by conftest.py for the tests: record the models this kernel holds ({tracer}).
def _phi3_memory_trace():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("phi3_memory_trace", {tracer!r})
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.install(get_ipython())


_phi3_memory_trace()
del _phi3_memory_trace
'''


KERNEL_CONFIG = "c.HistoryManager.hist_file = ':memory:'  # no history database in the test profile\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file + rename) unless the file already holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)


def install_memory_tracer(folder: Path) -> Path:
    """Write an IPython profile whose startup file loads the tracer; returns the IPYTHONDIR to use."""
    profile = folder / "ipython" / "profile_default"
    _write_if_changed(profile / "startup" / "00-phi3-memory-trace.py", STARTUP_FILE.format(tracer=str(MEMORY_TRACER)))
    _write_if_changed(profile / "ipython_kernel_config.py", KERNEL_CONFIG)
    return folder / "ipython"


os.environ.setdefault(MEMORY_TRACE_ENV_VAR, str(Path(os.environ["PHI3_LORA_OUTPUTS"]).resolve() / "memory-trace"))
if os.environ[MEMORY_TRACE_ENV_VAR]:
    os.environ[MEMORY_TRACE_ENV_VAR] = str(Path(os.environ[MEMORY_TRACE_ENV_VAR]).resolve())
    os.environ["IPYTHONDIR"] = str(install_memory_tracer(Path(os.environ[MEMORY_TRACE_ENV_VAR])))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before nbval starts a notebook's kernel (at its first cell's setup), name the notebook for the tracer.

    Any other test runs with no notebook named, so a kernel it starts records nothing.
    """
    notebook = getattr(item, "parent", None)
    if type(notebook).__name__ == "IPyNbFile":
        os.environ[MEMORY_TRACE_NOTEBOOK_ENV_VAR] = str(Path(notebook.path).resolve())
        os.environ[MEMORY_TRACE_SHA_ENV_VAR] = _COLLECTED_SHA256.get(str(notebook.path), "")
    else:
        os.environ.pop(MEMORY_TRACE_NOTEBOOK_ENV_VAR, None)
        os.environ.pop(MEMORY_TRACE_SHA_ENV_VAR, None)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests/test_memory_budget.py last, so it reads the traces the notebooks of this same run wrote.

    Also note each notebook's sha256 as nbval collected it: a trace then says which version actually ran,
    even if the file is edited while the tests run.
    """
    for item in items:
        if type(item.parent).__name__ == "IPyNbFile" and str(item.parent.path) not in _COLLECTED_SHA256:
            _COLLECTED_SHA256[str(item.parent.path)] = hashlib.sha256(Path(item.parent.path).read_bytes()).hexdigest()
    last = [item for item in items if item.path.name == "test_memory_budget.py"]
    if last:
        items[:] = [item for item in items if item.path.name != "test_memory_budget.py"] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the memory budget table when this run's tests/test_memory_budget.py wrote one."""
    folder = os.environ.get(MEMORY_TRACE_ENV_VAR)
    table = Path(folder) / MEMORY_BUDGET_TABLE if folder else None
    if table is not None and table.is_file() and table.stat().st_mtime >= _SESSION_START:
        terminalreporter.write_sep("=", "memory budget with Phi-3-mini (tests/test_memory_budget.py)")
        terminalreporter.write_line(table.read_text(encoding="utf-8"))
