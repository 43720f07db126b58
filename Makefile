# make run   installs what the proxy needs and runs it
# make test  installs what the tests need too (test clients, Codex CLI, ruff), runs make lint, then the tests
# make lint  ruff over the whole tree (ruff.toml: pyflakes, pycodestyle, bugbear, import order)
# make soak  the long load and fuzz runs (30-45 minutes): 200 concurrent streams, 5,000 requests,
#            a 10-minute stream, thousands of fuzzed bodies per endpoint; the proxies' logs stay in
#            soak-logs/ (its own --basetemp: other pytest runs cannot clean it up mid-run)
# make bench installs what the proxy and the tests' fakes need and runs the benchmark (bench/results.json, a table):
#            loopback, then WAN (TLS and 50 ms round trip); make bench-wan runs only the WAN one
#            (docs/performance.md: the scenarios, their options, the idle measurement)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPM_CI := npm ci --no-audit --no-fund --loglevel=error

.PHONY: install install-test chromium run lint test soak bench bench-wan
install: $(VENV)/.installed node_modules/.installed build/bridge.mjs
install-test: $(VENV)/.installed-test node_modules/.installed-dev build/bridge.mjs

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The tests' packages (pytest, the SDKs, hypothesis, ruff) on top of the proxy's.
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# Runtime packages only: the devDependencies (pi-agent-core, the pi coding agent, the Codex CLI) serve the tests.
node_modules/.installed: package.json package-lock.json
	$(NPM_CI) --omit=dev
	touch $@

node_modules/.installed-dev: package.json package-lock.json
	$(NPM_CI)
	touch node_modules/.installed $@

# bridge.mjs with pi-ai in one build (esbuild, a pinned dependency); providers stay separate
# chunks, loaded when used.
build/bridge.mjs: bridge.mjs web-fetch.mjs node_modules/.installed
	rm -rf build
	npm run --silent build

run: install
	$(PY) proxy.py

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

test: install-test chromium
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q tests

# tests/test_browser.py drives Debian's chromium. Installing it may fail (no root, no apt, no mirror):
# that test then skips, saying so.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "note: chromium could not be installed through apt; tests/test_browser.py will be skipped"

soak: install-test
	SOAK=1 $(PY) -m pytest -q -s --basetemp=soak-logs/load tests/test_load.py
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest -q --hypothesis-show-statistics --basetemp=soak-logs/fuzz tests/test_fuzz.py

bench: install-test
	$(PY) bench/bench.py

bench-wan: install-test
	$(PY) bench/bench.py wan
