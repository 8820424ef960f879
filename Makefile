# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment first if it is missing or out of date.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench reproduce clean-venv

$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/cpu.txt
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c requirements/cpu.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kforcing demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: $(STAMP)
	$(BIN)/kforcing bench --model runs/teacher-small --out docs/bench

reproduce: $(STAMP)
	$(BIN)/kforcing reproduce

clean-venv:
	rm -rf $(VENV)
