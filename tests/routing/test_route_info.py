"""gateway_route_info (stellagw/observe/routes.py): one sample per route, its kind from the
HELLO, rebuilt only when the routes change; exported by a real worker's /metrics."""
from __future__ import annotations

from stellagw.observe.metrics import Metrics
from stellagw.observe.routes import route_info
from stellagw.routing.state import RoutingState


def hello(service, endpoints):
    return {"service": service, "version": "1.0.0", "instance_id": "i1", "region": "eu1",
            "endpoints": endpoints}


def test_one_sample_per_route_with_its_kind_and_rebuilt_only_on_change():
    state = RoutingState("eu1")
    source = route_info(state)
    assert source()["gateway_route_info_gauge"][2] == []
    state.register(object(), hello("reports", [
        {"method": "GET", "path": "/reports/{id}"},
        {"method": "GET", "path": "/reports/{id}/download", "streaming": True},
        {"method": "GET", "path": "/reports/live", "websocket": True}]))
    _, labels, samples = source()["gateway_route_info_gauge"]
    assert labels == ("service", "method", "path", "kind")
    assert sorted(samples) == [(("reports", "GET", "/reports/live", "websocket"), 1),
                               (("reports", "GET", "/reports/{id}", "unary"), 1),
                               (("reports", "GET", "/reports/{id}/download", "streaming"), 1)]
    assert source()["gateway_route_info_gauge"][2] is samples      # nothing moved: the same list
    state.heartbeat(next(iter(state.instances.values())), "Degraded")
    assert source()["gateway_route_info_gauge"][2] is samples      # health is not a route change
    state.unregister(next(iter(state.instances.values())))
    assert source()["gateway_route_info_gauge"][2] == []           # no instance: not routed


def test_exported_as_a_gauge_summed_over_workers():
    state = RoutingState("eu1")
    state.register(object(), hello("feed", [{"method": "GET", "path": "/feed", "streaming": True}]))
    metrics = Metrics()
    metrics.sources.append(route_info(state))
    text = metrics.render().decode()
    assert "# TYPE gateway_route_info gauge" in text
    assert 'gateway_route_info{kind="streaming",method="GET",path="/feed",service="feed"} 1.0' in text
