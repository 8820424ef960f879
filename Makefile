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

# the playground test drives Debian's chromium; installing it needs root (CI), else that one
# test is skipped with its reason
test: $(STAMP)
	-@bash .ci/install-browser.sh || echo "make test: chromium not installed; the playground test will be skipped" >&2
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

# the demo's draft against its teacher on the 40 chat prompts: AR, lossless and K-Forcing at
# batch 1 (both made by `make demo`)
DEMO_STUDENT := runs/demo/draft
bench: $(STAMP)
	@test -d $(DEMO_STUDENT) || { echo "make bench: no student in $(DEMO_STUDENT): run \`make demo\` first (it trains the draft the benchmark measures)" >&2; exit 1; }
	$(BIN)/kforcing eval-chat --student $(DEMO_STUDENT) --dtype auto --out runs/demo/bench

reproduce: $(STAMP)
	$(BIN)/kforcing reproduce

clean-venv:
	rm -rf $(VENV)
