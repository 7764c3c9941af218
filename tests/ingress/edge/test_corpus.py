"""Every corpus case against a real gateway and the recording service (docs/http-edge.md).

Each case is sent three times on fresh connections: whole, and cut at two seeded random
patterns (timed cases once, as scripted). The sends run in parallel once for the module;
each case is then its own test, asserting the statuses, whether the connection stayed, and
exactly what reached the service (correlated by the per-send marker in the path).
"""
from __future__ import annotations

import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .corpus import CASES, EXTRA, ROWS, covered_rows
from .harness import EdgeStack, describe, judge, run_case

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

DOC = Path(__file__).resolve().parents[3] / "docs" / "http-edge.md"
CUTS = 2           # random cut patterns per case, besides the uncut send
WORKERS = 8        # concurrent client connections


def seeds(case):
    if case.script:
        return (None,)
    base = zlib.crc32(case.name.encode())
    return (None,) + tuple(base * 10 + k for k in range(CUTS))


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    stack = EdgeStack(tmp_path_factory.mktemp("edge"))
    try:
        jobs = [(case, seed) for case in CASES for seed in seeds(case)]
        # The slow (scripted, timed) sends first, so they overlap with everything else.
        jobs.sort(key=lambda j: -(sum(d for d, _ in j[0].script) + j[0].idle))
        t0 = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [(case, seed, pool.submit(run_case, stack, case, seed)) for case, seed in jobs]
            outcomes = [(case, seed, f.result()) for case, seed, f in futures]
        time.sleep(0.3)    # a CANCEL or a late frame still on its way to the service
        by_case: dict[str, list] = {}
        for case, seed, out in outcomes:
            by_case.setdefault(case.name, []).append(
                (seed, out, stack.book.records(out.marker)))
        yield {"by_case": by_case, "strays": list(stack.book.strays),
               "seconds": time.monotonic() - t0}
    finally:
        stack.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(corpus_run, case):
    failures = []
    for seed, out, recs in corpus_run["by_case"][case.name]:
        problems = judge(case, out, recs)
        if problems:
            label = "uncut" if seed is None else f"cut seed {seed}, {out.pieces} pieces"
            failures.append(describe(case, out, recs, problems, label))
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_nothing_reached_the_service_unmarked(corpus_run):
    """A request the service got that carries no marker came from a case that was meant to
    be refused before its path or X-Edge-Id could be read (or from a smuggled one)."""
    strays = [r.brief() for r in corpus_run["strays"]]
    assert not strays, "\n".join(strays)


def test_corpus_size_and_rows():
    assert len(CASES) >= 150, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)
    doc_rows = []
    # The rules of HTTP/1.1 framing and deadlines, which the corpus covers; the sections
    # after them (client address, CORS, compression: configuration-dependent, tested by
    # tests/ingress/test_client_address.py and tests/ingress/test_cors_compression.py; what a connection can
    # hold) are not corpus rows.
    rules = DOC.read_text(encoding="utf-8").split("## Client address")[0]
    for line in rules.splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            first = line.strip().strip("|").split("|")[0].strip()
            if first not in ("input", "phase"):
                doc_rows.append(first)
    mapped = set(ROWS.values())
    missing_map = [r for r in doc_rows if r not in mapped]
    assert not missing_map, f"rows of docs/http-edge.md without a key in corpus.ROWS: {missing_map}"
    stale = [k for k, v in ROWS.items() if v not in doc_rows]
    assert not stale, f"corpus.ROWS keys whose row is gone from docs/http-edge.md: {stale}"
    uncovered = [k for k, names in covered_rows().items() if not names]
    assert not uncovered, f"rows with no case: {uncovered}"
    for case in CASES:
        assert case.rows and all(r in ROWS or r in EXTRA for r in case.rows), case.name
        assert case.source, case.name
