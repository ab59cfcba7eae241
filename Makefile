# Two commands: `make up` runs everything on this machine, `make test` runs every test.
PY ?= python3
# Tests wait on real servers far more than they compute: four workers fill two cores (three left
# a quarter of the CPU idle; docs/decisions.md, "make test runs in four pytest-xdist workers").
TEST_WORKERS ?= 4
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test check fmt clean install tools browser-tools bench-tools client-tools bytecode monitoring deploy-configs image compose-test container-tools

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/baton up $(ARGS)

test: $(STAMP) tools browser-tools bench-tools client-tools container-tools bytecode
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The project's own bytecode, once: with PYTHONDONTWRITEBYTECODE=1 (set on CI machines) each of
# the ~300 service processes a test run starts would compile baton/shared/services again (pip
# writes the dependencies' bytecode at install, whatever that variable says). Python still
# reads bytecode with it set. Measured in docs/benchmarks.md ("Service start-up").
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q -j0 baton shared services >/dev/null

# promtool (the alert-rule checker) has no PyPI wheel: take it from Debian's prometheus package
# where apt exists (no root needed for a download). Without it the promtool tests skip. Kept in
# TOOLS_CACHE keyed on apt's package lists (their directory's mtime: an `apt-get update` that
# changes them fetches it again), so a fresh clone links it instead of fetching the package
# again (13 s on a loaded machine; `apt-cache policy` for the version alone took 4 s there).
TOOLS_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/baton-tools
tools:
	@test -x $(BIN)/promtool || command -v promtool >/dev/null || { \
	  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null && \
	  c=$(TOOLS_CACHE)/promtool-$$(stat -c %Y /var/lib/apt/lists 2>/dev/null) && \
	  { test -x $$c || { tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q prometheus >/dev/null 2>&1) && \
	    dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -xO ./usr/bin/promtool > $$tmp/promtool && \
	    chmod +x $$tmp/promtool && mkdir -p $(TOOLS_CACHE) && rm -f $(TOOLS_CACHE)/promtool-* && \
	    mv $$tmp/promtool $$c.tmp && mv $$c.tmp $$c; \
	    rm -rf $$tmp; }; } && test -x $$c && { ln -f $$c $(BIN)/promtool 2>/dev/null || cp $$c $(BIN)/promtool; }; \
	  test -x $(BIN)/promtool || echo "promtool unavailable: its checks will skip"; }

# The browser tests (tests/browser, marker "browser") drive Debian's headless Chromium through
# /usr/bin/chromedriver: installed with apt where root and apt-get exist, else said; the tests
# skip, with that reason, only when no Chromium can be had. Nothing downloads a browser build.
browser-tools:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { scripts/apt-install.sh chromium chromium-driver; \
	  test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	    echo "chromium/chromium-driver unavailable (needs root and apt-get): the browser tests will skip"; }

# wrk, the faster load generator of `baton bench accept` (--loadgen wrk), whose driver test sends
# real requests through it: Debian's package where root and apt-get exist, else said; that test
# then skips with the reason.
bench-tools:
	@command -v wrk >/dev/null || { scripts/apt-install.sh wrk; command -v wrk >/dev/null || \
	  echo "wrk unavailable (needs root and apt-get): its driver test will skip"; }

# The AI SDK client tests (tests/clients/ai-sdk): the pinned `ai` package from npm, `npm ci` once
# per package-lock.json. Without node/npm the tests skip and say so. The installed node_modules
# is kept in TOOLS_CACHE keyed on the lock file and node's version: a fresh clone copies it
# (under a second) instead of running npm ci again (18 s on a loaded machine).
AI_SDK := tests/clients/ai-sdk
client-tools:
	@test -f $(AI_SDK)/node_modules/.installed -a $(AI_SDK)/node_modules/.installed -nt $(AI_SDK)/package-lock.json || { \
	  if command -v npm >/dev/null; then \
	    c=$(TOOLS_CACHE)/ai-sdk-$$({ cat $(AI_SDK)/package-lock.json; node --version; } | cksum | cut -d' ' -f1); \
	    if test -f $$c/.installed; then rm -rf $(AI_SDK)/node_modules && cp -a $$c $(AI_SDK)/node_modules && touch $(AI_SDK)/node_modules/.installed; \
	    else (cd $(AI_SDK) && npm ci --silent --no-audit --no-fund >/dev/null && touch node_modules/.installed) && \
	      { mkdir -p $(TOOLS_CACHE) && rm -rf $$c.tmp && cp -a $(AI_SDK)/node_modules $$c.tmp && mv $$c.tmp $$c || rm -rf $$c.tmp; } || \
	      echo "npm ci failed in $(AI_SDK): the AI SDK client tests will skip"; fi; \
	  else echo "npm unavailable: the AI SDK client tests will skip"; fi; }

# Containers (docs/operations.md). The engine is the one answering, else a private dockerd started
# for the command and stopped by its pid; the base, the layer cache and the stand-ins are cached
# in ~/.cache/baton-containers (BATON_CONTAINER_CACHE), keyed on what they are made from.
CONTAINERS := scripts/containers

# docker.io, docker-compose, debootstrap from Debian where missing (root, apt); else says so.
container-tools:
	@$(CONTAINERS)/tools.sh

# The one image (baton:latest, or BATON_IMAGE), on the official Python image where a registry
# gives it, else on a base made from Debian's packages (BATON_PYTHON_IMAGE picks another).
image: container-tools
	@$(CONTAINERS)/with-engine.sh $(CONTAINERS)/image.sh

# docker-compose.yml run for real: image, stack, the typical journey, a killed service, down -v.
# Also part of `make test` (marker "compose"); it skips, with the reason, where no engine can start.
compose-test: $(STAMP) container-tools
	$(BIN)/python -m pytest -m compose tests/compose $(PYTEST_ARGS)

# The Prometheus Operator's copy of the alert rules, regenerated from k8s/monitoring/rules.yaml.
monitoring: $(STAMP)
	$(BIN)/python scripts/render_prometheusrule.py

# Every generated deployment file, after baton/permissions.py or the rules change (tests fail
# until they match): compose's NATS config, the NATS Helm values, the PrometheusRule.
deploy-configs: monitoring
	$(BIN)/baton nats-config --out deploy/nats.conf
	$(BIN)/baton nats-config --helm-values --out k8s/nats/values.yaml

check: $(STAMP)
	$(BIN)/ruff format --check baton shared services tests scripts
	$(BIN)/ruff check baton shared services tests scripts
	$(BIN)/mypy shared services baton

fmt: $(STAMP)
	$(BIN)/ruff format baton shared services tests scripts
	$(BIN)/ruff check --fix baton shared services tests scripts

clean:
	rm -rf $(VENV) .baton .pytest_cache .mypy_cache .ruff_cache
