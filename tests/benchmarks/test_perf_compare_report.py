"""python -m perf compare's verdict against nginx: each round's ratio, from the same round."""
from __future__ import annotations

from perf.compare.report import _steal_note, against_nginx, median_round, render_against_nginx


def runs(name, cpus):
    return [{"target": name, "ok": c is not None, "cpu_us_per_req": c, "req_per_s": 1.0}
            for c in cpus]


def test_each_round_is_divided_by_nginx_of_the_same_round():
    gw = median_round("gateway-routed", runs("gateway-routed", [10.0, 9.0, 12.0, 10.0, 8.0]))
    ng = median_round("nginx", runs("nginx", [20.0, 10.0, 12.5, 12.0, 16.0]))
    (a,) = against_nginx([gw, ng])
    assert [round(x, 3) for x in a["ratios"]] == [0.5, 0.9, 0.96, 0.833, 0.5]
    # The median of the per-round ratios, not the ratio of the medians (10/12.5 = 0.8).
    assert round(a["median"], 3) == 0.833 and a["below_nginx_every_round"]
    assert render_against_nginx([gw, ng]) == [
        "gateway-routed ÷ nginx per round: 0.50, 0.90, 0.96, 0.83, 0.50; "
        "median round 0.83; below nginx in every round"]


def test_a_round_above_nginx_is_counted_and_a_failed_round_left_out():
    gw = median_round("gateway-routed", runs("gateway-routed", [10.0, None, 15.0]))
    ng = median_round("nginx", runs("nginx", [20.0, 10.0, 12.0]))
    (a,) = against_nginx([gw, ng, median_round("raw", runs("raw", [5.0, 5.0, 5.0]))])
    assert a["ratios"] == [0.5, 1.25] and not a["below_nginx_every_round"]
    assert render_against_nginx([gw, ng])[0].endswith("below nginx in 1 of 2 rounds")


def test_nothing_without_nginx_or_rounds():
    gw = median_round("gateway-routed", runs("gateway-routed", [10.0, 9.0]))
    assert against_nginx([gw]) == []
    one = median_round("nginx", runs("nginx", [12.0]))
    assert against_nginx([median_round("gateway-routed", runs("gateway-routed", [10.0])), one]) == []


def test_rounds_the_hypervisor_took_cpu_from_are_named():
    rs = runs("nginx", [12.0, 30.0, 12.5])
    for r, steal in zip(rs, [0.0, 0.35, 0.01]):
        r["steal_util"] = steal
    chosen = median_round("nginx", rs)
    assert chosen["rounds_steal_util"] == [0.0, 0.35, 0.01]
    assert _steal_note(chosen["rounds_steal_util"]) == "; steal % of a CPU 0, 35, 1"
    assert _steal_note([0.0, 0.01, None]) == ""      # nothing worth a word
