# execq — the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo .uv-bootstrap/bin/uv)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install run test lint typecheck bench clean

.uv-bootstrap/bin/uv:
	@# uv is the installer; bootstrap it with pip when the machine has none.
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "execq needs Python >= 3.11 (found: $$($(PYTHON) --version 2>&1)); set PYTHON=..."; exit 2; }
	@$(PYTHON) -m venv .uv-bootstrap || { rm -rf .uv-bootstrap; \
	  echo "cannot create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 2; }
	.uv-bootstrap/bin/pip install --quiet uv

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

install: $(VENV)/.installed  ## install everything into .venv from uv.lock

run: install  ## the main job: a demo of every guarantee, on embedded defaults
	$(VENV)/bin/execq demo

test: install  ## the whole test suite (real Redis and PostgreSQL where reachable)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install  ## ruff + mypy (strict)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install  ## throughput and latency against bare Celery, same run; audit costs
	$(VENV)/bin/python -m bench $(BENCH_ARGS)
	$(VENV)/bin/python -m bench.audit

clean:
	rm -rf $(VENV) .uv-bootstrap .execq .pytest_cache .mypy_cache .ruff_cache
