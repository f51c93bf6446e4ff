# Two commands on a fresh machine with Python 3.11: `make run` (demo) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint docs bench conformance clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

run: $(STAMP)   ## emulator + gateway with the demo policy; prints a demo key and examples
	$(BIN)/tollway demo

test: $(STAMP)  ## lint, then the whole suite
	$(BIN)/ruff check proxy plugins tests bench docs conformance
	$(BIN)/ruff format --check proxy plugins tests bench docs conformance
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check proxy plugins tests bench docs conformance
	$(BIN)/mypy

docs: $(STAMP)  ## regenerate the tables of docs/ from the config models and hookspecs
	$(BIN)/python docs/generate.py

conformance: $(STAMP)  ## the SDKs' own API tests through the gateway vs conformance/expected-*.txt
	$(BIN)/python -m conformance.run

bench: $(STAMP)  ## overhead of the gateway vs direct and a bare proxy; writes bench/results.md
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache data
