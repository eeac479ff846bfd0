# The two commands a newcomer runs (see README): `make demo` and `make test`; `make bench` is the
# overhead report.
# Each creates .venv if missing, installs the pinned dev requirements, builds the extension
# without build isolation (it must compile against the torch it will run with), then runs.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILD_STAMP := $(VENV)/.gradguard-built

.PHONY: venv build test test-noext test-integrations bench demo clean

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

# The framework integrations against the real Lightning / HF Trainer / TensorBoard (pinned in
# requirements-integrations.txt, installed into the same venv). One kernel path: the integrations
# are Python over GradGuard's public API, whose two kernel paths the main suite covers (and with
# these packages installed, `make test-noext` runs these tests on the reference kernels too).
INTEG_STAMP := $(VENV)/.integrations-installed
$(INTEG_STAMP): $(STAMP) requirements-integrations.txt
	$(VPY) -m pip install -q -r requirements-integrations.txt
	touch $@

test-integrations: build $(INTEG_STAMP)
	$(VPY) -m pytest -q -m integrations tests

bench: build
	$(VPY) -m gradguard.bench

demo: build
	$(VPY) -m gradguard.demo

clean:
	rm -rf build *.egg-info gradguard/_C*.so gradguard/_build_info.json $(VENV)
