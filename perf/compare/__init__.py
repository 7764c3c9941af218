"""Side-by-side HTTP benchmark: the gateway against its baselines, in one run
(``python -m perf compare``; perf/README.md, Method).

measuring: starting nothing itself, what one target's run measures (wrk, CPU of the
process trees, RSS, pinning); targets: what each target starts; report: medians over
rounds, the rate-limit differences, the table; cli: the command.
"""
