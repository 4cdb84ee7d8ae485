# Two commands do all set-up (see README):
#   make demo   runs every notebook, in order, on the embedded default model -> outputs/
#   make test   runs the unit tests and every notebook under nbval (tiny model)
# Both create or refresh .venv/ from the pinned requirements first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

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

clean:
	rm -rf outputs .cache
