# The README's commands. PYTHON may name another interpreter (>= 3.11).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test test-tools install build annotate debug-build perf bench clean

# Set up and run the gateway with its embedded demo.
demo: install
	$(PYTHON) -m stellagw demo

# Set up and run the whole test suite (what .ci/run calls).
test: install test-tools
	$(PYTHON) -m pytest -q

# Debian packages the tests use: promtool (from prometheus) checks the /metrics output.
test-tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "promtool missing: sudo apt-get install prometheus (its test is skipped)"; fi; }

install:
	$(PIP) install -q --disable-pip-version-check -e '.[test]'

# Rebuild the Cython extensions in place after editing cext/*.pyx.
build:
	$(PYTHON) setup.py -q build_ext --inplace

# cext/<name>.html: which lines of the Cython code call into Python.
annotate:
	STELLAGW_CYTHON_ANNOTATE=1 $(PYTHON) setup.py -q build_ext --inplace --force

# GW_DEBUG invariant checks, bounds checks, line tracing (for coverage and gdb).
debug-build:
	STELLAGW_DEBUG_BUILD=1 $(PYTHON) setup.py -q build_ext --inplace --force

# Side-by-side comparison benchmark (installs wrk and nginx from Debian if missing).
perf: install
	bash perf/install-tools.sh
	$(PYTHON) perf/compare.py

bench: build
	$(PYTHON) perf/bench_frame.py
	$(PYTHON) perf/bench_radix.py
	$(PYTHON) perf/bench_window.py

clean:
	rm -rf build dist *.egg-info stellagw/_cext/*.so cext/*.c cext/*.html
