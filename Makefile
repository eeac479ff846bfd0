# The two commands a newcomer runs (see README): `make demo` and `make test`; `make bench` is the
# overhead report.
# Each creates .venv if missing, installs the pinned dev requirements, builds the extension
# without build isolation (it must compile against the torch it will run with), then runs.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := $(VENV)/.gradguard-built

.PHONY: venv build test test-noext bench demo clean

venv: $(STAMP)
$(STAMP): requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

# Rebuilt when a C++/CUDA source or setup.py changes.
$(BUILD_STAMP): $(STAMP) setup.py $(shell find csrc -type f 2>/dev/null)
	CFLAGS=-g0 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(VPY) -m pytest -q

test-noext: build
	GRADGUARD_DISABLE_EXT=1 $(VPY) -m pytest -q

bench: build
	$(VPY) -m gradguard.bench

demo: build
	$(VPY) -m gradguard.demo

clean:
	rm -rf build *.egg-info gradguard/_C*.so gradguard/_build_info.json $(VENV)
