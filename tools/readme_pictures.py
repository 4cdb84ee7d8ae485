"""Regenerate the README's and the notebooks' pictures (docs/images/*.png) from a real run's outputs.

    python tools/readme_pictures.py outputs                 # after `make demo` (and `make browser-test`)
    python tools/readme_pictures.py RUN_A RUN_B --screenshots outputs/browser

Each SOURCE is an outputs folder of the series (what ``PHI3_LORA_OUTPUTS`` pointed at: ``notebooks/`` with the
executed notebooks of ``make demo``, ``plots/``); every picture comes from the first SOURCE that holds its input:

| picture | taken from |
|---|---|
| ``01_mask.png`` | 01's executed notebook: the HTML output of ``mark_assistant_tokens(..., html=True)`` |
| ``03_loss.png`` | ``plots/03_loss.png``, saved by 03 |
| ``04_loss.png`` | ``plots/04_loss.png``, saved by 04 (LoRA and QLoRA validation curves) |
| ``05_before_after.png`` | 05's executed notebook: the before/after answer table (``side_by_side``), its first rows |
| ``06_chat_box.png`` | the browser test's screenshot of 06's chat box after two turns (``--screenshots``) |

HTML outputs are drawn by the same headless Chromium the browser test uses (Debian's ``/usr/bin/chromium``,
driven by Playwright: ``make browser-test`` installs both). Nothing is drawn by hand; every picture is scaled down
to at most ``--width`` pixels and stored as a palette PNG, so the README stays light. Existing pictures are
replaced atomically; a missing input is an error that names the file and the command that writes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python tools/readme_pictures.py`: the browser test's settings below
    sys.path.insert(0, str(REPO_ROOT))
from tests.browser.browser_lab import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the same Chromium, one home)

IMAGES = REPO_ROOT / "docs" / "images"

# The look of a notebook's HTML output (JupyterLab's fonts and table style, simplified).
PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; padding: 12px; background: white; font-family: system-ui, sans-serif; font-size: 13px; }}
pre {{ font-family: "DejaVu Sans Mono", monospace; font-size: 12.5px; line-height: 1.35; margin: 0; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: none; padding: 4px 8px; max-width: 300px; }}
thead th {{ border-bottom: 1px solid #bbb; text-align: left; }}
tbody tr:nth-child(odd) {{ background: #f5f5f5; }}
</style></head><body><div id="picture" style="display: inline-block">{body}</div></body></html>"""


def find_input(sources: Sequence[Path], relative: str) -> Path:
    """The first ``SOURCE/relative`` that exists, or an error naming where it was looked for."""
    for source in sources:
        if (source / relative).is_file():
            return source / relative
    looked = ", ".join(str(source / relative) for source in sources)
    raise FileNotFoundError(f"{relative}: not found (looked at {looked}). Run `make demo` (or the notebook) with "
                            f"PHI3_LORA_OUTPUTS set to the SOURCE folder first.")


def html_output(notebook: Path, contains: str) -> str:
    """The text/html output of the first code cell whose source contains ``contains``."""
    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and contains in cell.source:
            for output in cell.get("outputs", []):
                if "text/html" in output.get("data", {}):
                    return output["data"]["text/html"]
            raise ValueError(f"{notebook}: the cell with {contains!r} has no HTML output; was it executed?")
    raise ValueError(f"{notebook}: no code cell contains {contains!r}; update tools/readme_pictures.py to the "
                     f"notebook's new code")


def save_small(image_path: Path, target: Path, width: int) -> Path:
    """Scale ``image_path`` down to at most ``width`` pixels wide, as a palette PNG at ``target`` (atomic)."""
    from PIL import Image  # Pillow comes with matplotlib (pinned)

    with Image.open(image_path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".png", delete=False) as temporary:
            small.save(temporary, format="PNG", optimize=True)
        os.chmod(temporary.name, 0o644)
        os.replace(temporary.name, target)
    return target


class Renderer:
    """Headless Chromium for drawing HTML outputs (started on first use, closed by :meth:`close`)."""

    def __init__(self) -> None:
        self._playwright = None
        self._browser = None
        self._home: tempfile.TemporaryDirectory[str] | None = None

    def render(self, body: str, target: Path, prepare: str = "") -> Path:
        """Draw ``body`` as a notebook output would look, run the JavaScript ``prepare``, screenshot it."""
        if self._browser is None:
            try:
                from playwright.sync_api import sync_playwright
            except ImportError:
                raise SystemExit("Playwright is missing: run `make browser-test` once (it installs "
                                 "requirements-browser.txt and Debian's chromium).") from None
            if not CHROMIUM.exists():
                raise SystemExit(f"{CHROMIUM} is missing: `apt-get install -y chromium` (or `make browser-test`).")
            self._playwright = sync_playwright().start()
            self._home = tempfile.TemporaryDirectory()  # Chromium's config and crash folders, not ~/.config
            home = self._home.name
            self._browser = self._playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                env={**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config",
                     "XDG_CACHE_HOME": f"{home}/.cache"})
        page = self._browser.new_page(viewport={"width": 1100, "height": 800}, device_scale_factor=1)
        try:
            page.set_content(PAGE.format(body=body))
            if prepare:
                page.evaluate(prepare)
            page.locator("#picture").screenshot(path=str(target))
        finally:
            page.close()
        return target

    def close(self) -> None:
        """Stop the browser and Playwright's driver."""
        try:
            if self._browser is not None:
                self._browser.close()
        finally:
            try:
                if self._playwright is not None:
                    self._playwright.stop()
            finally:
                if self._home is not None:
                    self._home.cleanup()


def pictures(sources: Sequence[Path], screenshots: Path, renderer: Renderer,
             scratch: Path) -> dict[str, Callable[[], tuple[Path, str]]]:
    """Each picture's name and how to make it: its full-size PNG (drawn into ``scratch``) and where it came from."""
    def mask() -> tuple[Path, str]:
        notebook = find_input(sources, "notebooks/01_data_formatting.ipynb")
        body = html_output(notebook, "html=True")
        return renderer.render(body, scratch / "01_mask.png", "() => { document.querySelector('pre')"
                                                              ".style.maxWidth = '760px'; }"), f"{notebook} (mask)"

    def before_after() -> tuple[Path, str]:
        notebook = find_input(sources, "notebooks/05_evaluation.ipynb")
        body = html_output(notebook, "side_by_side = ")
        two_rows_short_cells = (  # the first two questions; long answers cut at about ten lines (fading out)
            "() => { document.querySelectorAll('tbody tr').forEach((row, i) => { if (i >= 2) row.remove(); });"
            " document.querySelectorAll('td').forEach(td => { td.innerHTML = '<div style=\"max-height: 150px; "
            "overflow: hidden; -webkit-mask-image: linear-gradient(black 75%, transparent)\">' + td.innerHTML"
            " + '</div>'; }); }")
        return (renderer.render(body, scratch / "05_before_after.png", two_rows_short_cells),
                f"{notebook} (side_by_side: first two rows, answers cut at ~10 lines)")

    def chat_box() -> tuple[Path, str]:
        shot = screenshots / "06-chat.png"
        if not shot.is_file():
            raise FileNotFoundError(f"{shot}: not found. Run `make browser-test` first (it saves 06's chat box).")
        return shot, str(shot)

    def plot(relative: str) -> Callable[[], tuple[Path, str]]:
        def copy() -> tuple[Path, str]:
            found = find_input(sources, relative)
            return found, str(found)
        return copy

    return {
        "01_mask.png": mask,
        "03_loss.png": plot("plots/03_loss.png"),
        "04_loss.png": plot("plots/04_loss.png"),
        "05_before_after.png": before_after,
        "06_chat_box.png": chat_box,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate docs/images/ from the given outputs folders; prints each picture and where it came from."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="outputs folders (the first that holds an input wins)")
    parser.add_argument("--screenshots", type=Path, default=REPO_ROOT / "outputs" / "browser",
                        help="the browser test's screenshots (default: outputs/browser)")
    parser.add_argument("--out", type=Path, default=IMAGES, help="where the pictures go (default: docs/images)")
    parser.add_argument("--width", type=int, default=720, help="largest width in pixels (default: 720)")
    parser.add_argument("--only", nargs="*", help="only these pictures (e.g. 03_loss.png)")
    args = parser.parse_args(argv)
    missing = [str(source) for source in args.sources if not source.is_dir()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    renderer = Renderer()
    failures = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name, make in pictures(args.sources, args.screenshots, renderer, Path(scratch)).items():
                if args.only and name not in args.only:
                    continue
                try:
                    full, origin = make()
                    target = save_small(full, args.out / name, args.width)
                except (FileNotFoundError, ValueError) as error:
                    failures.append(f"{name}: {error}")
                    continue
                print(f"{target} <- {origin} ({target.stat().st_size / 1024:.0f} KiB)")
    finally:
        renderer.close()
    for failure in failures:
        print(f"NOT MADE {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
