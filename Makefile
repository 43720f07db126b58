# make run   installs what is needed and runs the proxy
# make test  installs what is needed and runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test
install: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	$(PY) proxy.py

test: install
	$(PY) -m pytest -q tests
