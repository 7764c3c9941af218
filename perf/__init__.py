"""stellagw's benchmarks: ``python -m perf <command>`` from the repository's root (the
commands are listed in perf/commands.py; perf/README.md says what each figure means).

A package of the repository, not of the wheel: it measures the checkout it sits in, and
the processes it starts import that checkout's stellagw (_procs.py_env).
"""
