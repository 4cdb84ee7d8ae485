# Two commands do all set-up (see README):
#   make demo   runs every notebook, in order, on the embedded default model -> outputs/
#   make test   runs the unit tests and every notebook under nbval (tiny model)
# Both create or refresh .venv/ from the pinned requirements first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean lab browser-test llama-cpp export-check

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

demo: venv
	$(BIN)/python -m utils.series

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks.train_speed

# JupyterLab (the pinned one in .venv/) on notebooks/; it prints the URL with its token. Set PHI3_LORA_MODEL etc.
# before `make lab` (README: "Environment variables"); LAB_PORT picks the port.
LAB_PORT ?= 8888
lab: venv
	@echo "Starting JupyterLab on notebooks/: open the http://127.0.0.1:$(LAB_PORT)/lab?token=... URL it prints below (Ctrl-C stops it)."
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --no-browser $(if $(filter 0,$(shell id -u)),--allow-root)

# The notebooks as a reader sees them: JupyterLab in headless Chromium (Debian's package) driven by Playwright.
browser-test: venv
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install --quiet -r requirements-browser.txt
	$(BIN)/python -m pytest -m browser tests/browser $(BROWSER_TEST_ARGS)

# llama.cpp's Python binding (CPU only), built once from the pinned, sha256-checked sdist of utils/assets.py (about
# 18 minutes on 2 cores); the wheel is kept in ~/.cache/phi3-lora-course/wheels ($$PHI3_LORA_WHEELS), so a fresh
# venv or clone installs it in seconds. export-check: llama.cpp itself against transformers + PEFT (tests/test_llama_cpp.py).
llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(STAMP) requirements-export.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-export.txt
	$(BIN)/python -m utils.export build-llama-cpp
	@touch $@

# Go's own text/template (what Ollama runs) is the reference for the Modelfile's TEMPLATE: Debian's golang-go.
export-check: llama-cpp
	@command -v go >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; }
	$(BIN)/python -m pytest -m "llama_cpp or ollama_go" tests/test_llama_cpp.py tests/test_export.py

clean:
	rm -rf outputs .cache
