# execq — the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo .uv-bootstrap/bin/uv)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: install run test lint typecheck bench clean chaos soak

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

# The sandbox's launcher: one exec for a command's limits and identity (prlimit + setpriv
# without it, 1.2 ms slower per command). Needs a C compiler; execq works without it.
# Linked statically where the C library allows it: no dynamic loader to run on each exec
# (0.15 ms of CPU and 0.18 ms of wall time less per command, measured), and nothing for
# LD_* variables to load into it. Dynamically linked otherwise.
$(VENV)/libexec/execq-launch: workers/sandbox/launch.c | $(VENV)/.installed
	@mkdir -p $(VENV)/libexec
	@if command -v $(CC) >/dev/null 2>&1; then \
	  if $(CC) -O2 -Wall -Wextra -Werror -static -o $@ $< 2>/dev/null; then \
	    echo "built $@ (static)"; \
	  else $(CC) -O2 -Wall -Wextra -Werror -o $@ $< && echo "built $@"; fi; \
	else echo "no C compiler ($(CC)): commands start through prlimit + setpriv instead"; fi

install: $(VENV)/.installed $(VENV)/libexec/execq-launch  ## install everything into .venv from uv.lock

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
	$(VENV)/bin/python -m bench.actions
	$(VENV)/bin/python -m bench.gateway
	$(VENV)/bin/python -m bench.growth $(GROWTH_ARGS)

clean:
	rm -rf $(VENV) .uv-bootstrap .execq .pytest_cache .mypy_cache .ruff_cache

chaos: install  ## faults (kills, stops, restarts, failover, full disk, tampering, skew) under load; bounded
	$(VENV)/bin/python -m chaos --timeout $(or $(CHAOS_TIMEOUT),3000) $(CHAOS_ARGS)

soak: install  ## 30 min of mixed commands at 100/s; slopes must be flat, charts in docs/img
	$(VENV)/bin/python -m chaos.soak --timeout $(or $(SOAK_TIMEOUT),5400) $(SOAK_ARGS)
