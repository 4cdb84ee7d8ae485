"""JupyterLab in headless Chromium for the browser tests: a server, a browser, and what a reader does with them.

The server is the pinned JupyterLab of ``.venv/``, on a free localhost port with a random token, serving copies of
the notebooks (the sources are never opened, so autosave cannot write outputs into them), with throw-away
JupyterLab settings, workspaces, runtime and IPython folders: nothing of the user's own configuration is read or
written. The browser is Debian's ``/usr/bin/chromium`` driven by Playwright (never a downloaded browser).
Everything started here is stopped in :meth:`JupyterLab.stop` (server and kernels by process group) and by
Playwright's own ``close``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from utils.paths import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium`
CHROMIUM_ARGS = [  # the machine has no outside network: keep Chromium from trying
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
BROWSER_MODEL_ENV_VAR = "PHI3_LORA_BROWSER_MODEL"  # the model the notebooks run on in the browser (default tiny)
SCREENSHOTS = REPO_ROOT / "outputs" / "browser"  # one PNG per step; failures name the one to look at
VIEWPORT = {"width": 1280, "height": 860}

# JupyterLab settings for the run (in the throw-away settings folder): keep every cell in the page (no windowing,
# so the test sees all prompts and outputs) and no news or update toasts over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none",
                                                                    "autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}

# In the page: the prompts (`[ ]:`, `[*]:`, `[3]:`) of the open notebook's code cells, in order.
PROMPTS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')).map(e => e.textContent.trim())"""
# ... and the text of every error output (IPython writes "Traceback (most recent call last)" in its header).
ERRORS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')).map(e => e.innerText)
    .filter(t => t.includes('Traceback (most recent call last)'))"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BrowserCheckFailed(AssertionError):
    """A step did not show what a reader should see; the message names the screenshot."""


class JupyterLab:
    """The pinned JupyterLab on copies of the notebooks, and one Chromium page on it."""

    def __init__(self, workdir: Path, outputs: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.notebooks = self.workdir / "notebooks"
        self.outputs = Path(outputs)  # PHI3_LORA_OUTPUTS of every kernel started here
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = self._environment(env or {})
        self.server: subprocess.Popen[bytes] | None = None
        self.log_path = SCREENSHOTS / "jupyterlab.log"
        self._playwright: Any = None
        self.browser: Any = None
        self.page: Any = None
        self.comm_frames: list[str] = []  # every widget message the page received from a kernel, in order

    # --- start and stop -------------------------------------------------------------------------------

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        """The server's (and so the kernels') environment: tiny model, smoke sizes, private Jupyter folders."""
        env = dict(os.environ)
        for name in ("MPLBACKEND", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_PATH",
                     "JUPYTERLAB_DIR"):
            env.pop(name, None)  # Agg (set for pytest) would hide the plots; the tests' IPython profile traces memory
        private = self.workdir / "jupyter"
        env.update({
            # The tiny model unless PHI3_LORA_BROWSER_MODEL says otherwise (smol: readable chat for the README picture)
            "PHI3_LORA_MODEL": os.environ.get(BROWSER_MODEL_ENV_VAR, "tiny"), "PHI3_LORA_SMOKE": "1",
            "PHI3_LORA_OUTPUTS": str(self.outputs),
            "PHI3_LORA_MEMORY_TRACE": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "JUPYTER_CONFIG_DIR": str(private / "config"), "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
            "JUPYTER_DATA_DIR": str(private / "data"),  # the kernels still come from .venv/share/jupyter
            "JUPYTERLAB_SETTINGS_DIR": str(private / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(private / "workspaces"), "IPYTHONDIR": str(private / "ipython"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        env.update(extra)
        return env

    def start(self, timeout: float = 90.0) -> None:
        """Copy the notebooks, write the settings, start the server and Chromium, wait until both answer."""
        if self.notebooks.exists():
            shutil.rmtree(self.notebooks)
        shutil.copytree(REPO_ROOT / "notebooks", self.notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for relative, values in LAB_SETTINGS.items():
            path = Path(self.env["JUPYTERLAB_SETTINGS_DIR"]) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values), encoding="utf-8")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.notebooks}", f"--IdentityProvider.token={self.token}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        with open(self.log_path, "wb") as log:
            self.server = subprocess.Popen(command, cwd=self.notebooks, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.server.returncode}: see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer on {self.base} within {timeout:.0f} s: "
                                   f"see {self.log_path}")
            time.sleep(0.5)

        from playwright.sync_api import sync_playwright

        if not CHROMIUM.exists():
            raise RuntimeError(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make browser-test does it)")
        self._playwright = sync_playwright().start()
        home = self.workdir / "chromium-home"  # Chromium's config and crash folders, not the user's ~/.config
        self.browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                 "XDG_CACHE_HOME": str(home / ".cache")})
        self.page = self.browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(60_000)
        self.page.on("websocket", lambda socket: socket.on("framereceived", self._received))

    def stop(self) -> None:
        """Close the browser, then stop the server and every kernel it started (each in its own process group)."""
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            try:
                if self._playwright is not None:
                    self._playwright.stop()
            finally:
                self._stop_server()

    def _stop_server(self) -> None:
        """SIGTERM, then SIGKILL, to the server's process group and to each kernel's (kernels start new sessions)."""
        if self.server is None or self.server.poll() is not None:
            return
        import psutil

        try:
            children = psutil.Process(self.server.pid).children(recursive=True)
        except psutil.Error:
            children = []
        groups = {os.getpgid(self.server.pid)}
        for child in children:
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            try:
                self.server.wait(timeout=10)
                psutil.wait_procs(children, timeout=5)
                if sig == signal.SIGTERM and not any(child.is_running() for child in children):
                    return
            except (subprocess.TimeoutExpired, psutil.Error):
                continue

    def _received(self, payload: str | bytes) -> None:
        """Keep the widget updates the page receives from the kernel (comm messages), as text."""
        text = payload if isinstance(payload, str) else payload.decode("utf-8", errors="replace")
        if "comm_msg" in text:
            self.comm_frames.append(text)

    # --- what a reader does -----------------------------------------------------------------------------

    def shot(self, name: str) -> Path:
        """A screenshot of the page now: ``outputs/browser/<name>.png``."""
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def fail(self, message: str, name: str) -> BrowserCheckFailed:
        """Take the screenshot ``name`` and return the error to raise, naming it."""
        try:
            path = self.shot(name)
        except Exception as error:  # the page itself may be gone
            path = f"(no screenshot: {error})"
        return BrowserCheckFailed(f"{message}\nscreenshot: {path}\nserver log: {self.log_path}")

    def open_notebook(self, name: str) -> None:
        """Open ``notebooks/<name>`` in a fresh workspace and wait for its kernel to be idle."""
        self.page.goto(f"{self.base}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={self.token}")
        expected = len([cell for cell in json.loads((self.notebooks / name).read_text(encoding="utf-8"))["cells"]
                        if cell["cell_type"] == "code"])
        try:
            self.page.wait_for_function(f"() => ({PROMPTS_JS})().length === {expected}", timeout=90_000)
            dialog = self.page.locator(".jp-Dialog", has_text="Select Kernel")
            if dialog.count():  # a reader picks the suggested kernel (Python 3 of the venv)
                dialog.get_by_role("button", name="Select").click()
            self.page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
        except Exception as error:
            raise self.fail(f"{name} did not open with an idle kernel: {error}", f"{Path(name).stem}-open") from None

    def run_all(self) -> None:
        """Run > Run All Cells, from the menu bar."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel",
                          has_text=re.compile(r"^Run All Cells$")).click()

    def prompts(self) -> list[str]:
        """The execution prompts of the open notebook's code cells."""
        return self.page.evaluate(PROMPTS_JS)

    def errors(self) -> list[str]:
        """The error outputs shown in the open notebook."""
        return self.page.evaluate(ERRORS_JS)

    def check_errors(self, name: str) -> None:
        """Fail, with the error scrolled into the screenshot, when a cell of the open notebook shows an error."""
        errors = self.errors()
        if errors:
            self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output",
                              has_text="Traceback (most recent call last)").first.scroll_into_view_if_needed()
            raise self.fail(f"{name}: a cell shows an error:\n{errors[0][-3000:]}", f"{name}-error")

    def wait_until_run(self, name: str, timeout: float) -> list[str]:
        """Wait until no cell is running or queued; fail (with a screenshot) on an error output or a cell left out."""
        deadline = time.monotonic() + timeout
        prompts: list[str] = []
        while time.monotonic() < deadline:
            prompts = self.prompts()
            self.check_errors(name)
            if prompts and not any("*" in prompt for prompt in prompts):
                break
            time.sleep(0.5)
        else:
            raise self.fail(f"{name}: still running after {timeout:.0f} s (prompts {prompts})", f"{name}-timeout")
        unrun = [i for i, prompt in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", prompt)]
        if unrun:
            raise self.fail(f"{name}: code cells {unrun} did not run (prompts {prompts})", f"{name}-not-run")
        return prompts

    def code_cell(self, contains: str) -> Any:
        """The code cell whose source contains ``contains`` (a Playwright locator)."""
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell").filter(
            has=self.page.locator(".jp-InputArea-editor", has_text=contains))


def papermill(notebook: str, lab: JupyterLab, timeout: float = 600) -> None:
    """Run a notebook copy headless (as `make demo` does) with the server's environment: adapters for 06."""
    executed = lab.workdir / "executed" / notebook
    executed.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "papermill"), "--no-progress-bar", "-k", "python3", notebook,
         str(executed)], cwd=lab.notebooks, env=lab.env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"papermill {notebook} failed ({executed}):\n{result.stderr[-3000:]}")
