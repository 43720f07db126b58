# make run   installs what the proxy needs and runs it
# make test  installs what the tests need too (test clients, Codex CLI) and runs them
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPM_CI := npm ci --no-audit --no-fund --loglevel=error

.PHONY: install install-test run test
install: $(VENV)/.installed node_modules/.installed
install-test: $(VENV)/.installed node_modules/.installed-dev

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Runtime packages only: the devDependencies (pi-agent-core, the Codex CLI) serve the tests.
node_modules/.installed: package.json package-lock.json
	$(NPM_CI) --omit=dev
	touch $@

node_modules/.installed-dev: package.json package-lock.json
	$(NPM_CI)
	touch node_modules/.installed $@

run: install
	$(PY) proxy.py

test: install-test
	$(PY) -m pytest -q tests
