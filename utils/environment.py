"""Environment checks for 00_setup: installed versions against requirements.txt, and the hardware."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

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
        return self.installed is not None and self.installed.split("+")[0] == self.required

    def line(self) -> str:
        """A report line: ``OK`` or ``FAIL`` with what to do."""
        if self.ok:
            return f"OK    {self.package}=={self.installed}"
        found = "not installed" if self.installed is None else f"found {self.installed}"
        return f"FAIL  {self.package}: requirements.txt pins {self.required}, {found} -> run `make venv`"


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
