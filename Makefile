# The README's commands. PYTHON may name another interpreter (>= 3.11).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test test-tools install build annotate debug-build perf bench clean
.PHONY: flamegraph perf-stat callgrind bench-ratelimit test-alerts

# Set up and run the gateway with its embedded demo.
demo: install
	$(PYTHON) -m stellagw demo

# Set up and run the whole test suite (what .ci/run calls), then the suites of the glue
# once more uncompiled, with the codecs' pure-Python twins (STELLAGW_NO_EXTENSIONS=1: the
# codec unit tests compare the two directly; the glue is one source, run both ways).
TWIN_SUITES := tests/test_router_e2e.py tests/test_websocket.py tests/test_ingress_integration.py \
	tests/test_ratelimit_e2e.py tests/test_auth_e2e.py tests/test_auth_dpop.py \
	tests/test_ingress_protocol.py tests/test_ingress_edge.py tests/edge/test_corpus.py \
	tests/test_replay_workers.py
test: install test-tools
	$(PYTHON) -m pytest -q
	STELLAGW_NO_EXTENSIONS=1 $(PYTHON) -m pytest -q $(TWIN_SUITES)

# Debian packages the tests use: promtool (from prometheus) checks the /metrics output;
# nginx is the oracle of tests/edge/test_nginx_oracle.py (run in the foreground with its own
# prefix; the package's own service is stopped again if its postinst started it).
test-tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "promtool missing: sudo apt-get install prometheus (its test is skipped)"; fi; }
	@[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; \
	    if [ -f /run/nginx.pid ]; then /usr/sbin/nginx -s quit 2>/dev/null || true; fi; \
	  else echo "nginx missing: sudo apt-get install nginx (tests/edge/test_nginx_oracle.py is skipped)"; fi; }

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

# Profiling the routed path (perf/README.md, "Profiling"). Each run is bounded and stops
# every process it starts. PROFILE_SECONDS sets the window (default 10 s).
PROFILE_SECONDS ?= 10

# py-spy (pip install py-spy) of the gateway under wrk load on GET /bench/hello, Python and
# native (uvloop, httptools, Cython) frames -> perf/results/flamegraph.svg.
flamegraph:
	$(PYTHON) perf/profile_routed.py flamegraph --duration $(PROFILE_SECONDS) --out perf/results/flamegraph.svg

# perf stat -e instructions,cycles on the gateway under the same load; prints "not supported
# here" when perf (Debian: linux-perf) or the hardware counters are missing (most VMs).
perf-stat:
	$(PYTHON) perf/profile_routed.py perf-stat --duration $(PROFILE_SECONDS)

# Instructions per routed request under callgrind (valgrind), the run-to-run steady figure;
# appends to perf/callgrind_history.csv (CALLGRIND_ARGS=--no-history to skip that).
CALLGRIND_ARGS ?=
callgrind:
	$(PYTHON) perf/callgrind_routed.py $(CALLGRIND_ARGS)

# Rate-limit cost per request (issue 5): instance tier, environment tier (a local
# valkey-server) and limiting off, side by side, three interleaved rounds.
bench-ratelimit:
	$(PYTHON) perf/compare.py --targets gateway-routed,gateway-routed-rl-instance,gateway-routed-rl-env --duration 8 --rounds 3

# promtool check config / check rules / test rules on grafana/ (Debian's prometheus package).
test-alerts: test-tools
	$(PYTHON) -m pytest -q tests/test_alerts.py

bench: build
	$(PYTHON) perf/bench_frame.py
	$(PYTHON) perf/bench_radix.py
	$(PYTHON) perf/bench_window.py

clean:
	rm -rf build dist *.egg-info stellagw/_cext/*.so cext/*.c cext/*.html
