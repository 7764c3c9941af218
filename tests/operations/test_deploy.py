"""The deployment artefacts agree with the code: Dockerfile, deploy/kubernetes/*.yaml.

Static checks read the manifests with PyYAML and compare them with what the gateway really
does (its endpoint table, its configuration loader, its ports); the last test runs the
ConfigMap's own gateway.yaml with `stellagw serve` and probes it the way the kubelet would.
There is no Docker engine or cluster here: docs/operations.md says what that leaves unchecked.
"""
from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shlex
import signal
import ssl
import threading
import time
import types
import urllib.request

import pytest
import yaml

from stellagw.config import ConfigError, load_config_text
from stellagw.health import builtins

from tests.support.gwtest import ROOT, Served

DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")

# ${NAME} without a default (an error when unset) and ${NAME:-default}; `$${` is a literal.
_ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


# ---------------------------------------------------------------------------- reading

def _docs() -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _docs() if d.get("kind") == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment() -> dict:
    return _one("Deployment", "stellagw")


def _pod() -> dict:
    return _deployment()["spec"]["template"]["spec"]


def _container() -> dict:
    containers = _pod()["containers"]
    assert len(containers) == 1
    return containers[0]


def _config_mount() -> tuple[str, str, str]:
    """(config file path in the container, ConfigMap name, key) from the config volume."""
    pod, c = _pod(), _container()
    for vol in pod["volumes"]:
        cm = vol.get("configMap")
        if not cm:
            continue
        mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
        items = cm.get("items") or []
        assert len(items) == 1, "mount exactly one key of the ConfigMap"
        return (os.path.join(mount["mountPath"], items[0]["path"]), cm["name"], items[0]["key"])
    raise AssertionError("no ConfigMap volume in the Deployment")


def _config_text() -> str:
    _, name, key = _config_mount()
    return _one("ConfigMap", name)["data"][key]


def _env_names() -> set[str]:
    return {e["name"] for e in _container().get("env", [])}


def _dummy_env() -> dict[str, str]:
    """A value for every variable the Deployment sets (only substituted, never used)."""
    values = {"POD_NAME": "stellagw-7d9f8c6b5-x2k4q", "VALKEY_URL": "valkey:6379",
              "DPOP_NONCE_SECRET": "n" * 40, "GATEWAY_CERT_PASSWORD": "pfx-password"}
    return {name: values.get(name, "dummy") for name in _env_names()}


def _settings():
    return load_config_text(_config_text(), env=_dummy_env(), source="configmap.yaml")


def _enabled_listeners(settings) -> dict[str, int]:
    gw = settings.gateway
    ports = {"http": gw.http.port}
    if gw.admin.enabled:
        ports["admin"] = gw.admin.port
    for kind in ("tcp", "tls"):
        node = getattr(gw.transports, kind)
        if node.enabled:
            ports[kind] = node.port
    return ports


def _container_port(ref) -> int:
    """A probe's or Service's port: a number or the name of a containerPort."""
    if isinstance(ref, int):
        return ref
    for p in _container()["ports"]:
        if p["name"] == ref:
            return p["containerPort"]
    raise AssertionError(f"no containerPort named {ref!r}")


def _dockerfile() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuations joined and comments dropped."""
    out, pending = [], ""
    with open(DOCKERFILE) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue  # a comment inside a continued instruction
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            instr, _, args = text.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _runtime_stage() -> dict:
    """The last stage's instructions, with its ARG defaults (and the global ones) applied."""
    args: dict[str, str] = {}
    stages: list[dict] = []
    for instr, rest in _dockerfile():
        if instr == "ARG":
            name, _, default = rest.partition("=")
            (stages[-1]["args"] if stages else args)[name] = default
        elif instr == "FROM":
            stages.append({"from": rest, "args": {}, "instr": []})
        elif stages:
            stages[-1]["instr"].append((instr, rest))

    def expand(text, scope):
        return re.sub(r"\$\{(\w+)\}", lambda m: scope.get(m.group(1), m.group(0)), text)

    for st in stages:
        st["from"] = expand(st["from"], args)
        scope = {**args, **st["args"]}
        st["instr"] = [(i, expand(r, scope)) for i, r in st["instr"]]
    return {"stages": stages, "last": stages[-1]}


def _last(stage: dict, instr: str) -> str | None:
    found = [r for i, r in stage["instr"] if i == instr]
    return found[-1] if found else None


def _prestop_seconds() -> float:
    """How long a terminating pod keeps its listeners open: the gateway's own delay."""
    return _settings().gateway.node.pre_stop_delay


def _quantity_cores(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ---------------------------------------------------------------------------- the set

# The API version each kind is written for (autoscaling/v2 has `behavior`, policy/v1 the
# PDB's unhealthyPodEvictionPolicy); an older one would silently lose fields.
API_VERSIONS = {
    "ConfigMap": "v1", "Service": "v1", "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1", "HorizontalPodAutoscaler": "autoscaling/v2",
    "NetworkPolicy": "networking.k8s.io/v1",
}


def test_kustomization_lists_every_manifest_and_each_is_well_formed():
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    files = {os.path.basename(p) for p in glob.glob(os.path.join(DEPLOY, "*.yaml"))}
    files.discard("kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(files), "kustomization.yaml lists every manifest"
    kinds = {}
    for doc in _docs():
        if doc.get("kind") == "Kustomization":
            continue
        kind, meta = doc["kind"], doc["metadata"]
        assert doc["apiVersion"] == API_VERSIONS.get(kind), (kind, doc["apiVersion"])
        # kustomization.yaml sets it: a namespace here would fight `namespace:` there.
        assert "namespace" not in meta, meta["name"]
        assert meta["labels"]["app.kubernetes.io/name"] == "stellagw", meta["name"]
        kinds.setdefault(kind, []).append(meta["name"])
    assert set(kinds) == set(API_VERSIONS), kinds


# ---------------------------------------------------------------------------- the config

def test_configmap_gateway_yaml_loads_with_every_key_known():
    settings = _settings()  # ConfigError on an unknown key, a wrong type or a missing variable
    gw = settings.gateway
    assert gw.node.node_id == _dummy_env()["POD_NAME"]
    # Everything must listen on the pod's addresses: probes, the Service and services dial
    # the pod IP, and the HELLO_ACK's host "" only means "where you dialled" from 0.0.0.0.
    assert gw.http.host == "0.0.0.0"
    assert gw.admin.enabled and gw.admin.host == "0.0.0.0" and gw.admin.port, \
        "the kubelet and Prometheus dial the pod IP, on a port they are told"
    # The client port (behind the LoadBalancer) has nothing internal on it.
    assert not {"metrics", "openapi", "details", "all"} & set(gw.admin.public_endpoints)
    for kind in ("tcp", "tls"):
        assert getattr(gw.transports, kind).host == "0.0.0.0", kind
    assert gw.transports.tls.enabled, "the specification's TLS transport (9443) is on"
    assert gw.http.public_origin.startswith("https://")
    assert gw.auth.authority.startswith("https://")
    # Several pods behind one Service: nonces need one secret, replays and the environment
    # limit one store.
    assert gw.auth.dpop_nonce.enabled and gw.auth.dpop_nonce.secret == "n" * 40
    assert gw.auth.replay_cache.valkey == "valkey:6379"
    assert settings.rate_limiting.for_environment.valkey_connection == "valkey:6379"


def test_every_variable_the_config_needs_comes_from_the_deployment():
    text = _config_text()
    required = {m.group(1) for m in _ENV_REF.finditer(text) if m.group(2) is None}
    referenced = {m.group(1) for m in _ENV_REF.finditer(text)}
    env = _env_names()
    assert required <= env, f"set in deployment.yaml: {sorted(required - env)}"
    assert env <= referenced, f"unused by gateway.yaml: {sorted(env - referenced)}"
    # And each one really is required: without it the gateway would refuse to start.
    for name in sorted(required):
        partial = {k: v for k, v in _dummy_env().items() if k != name}
        with pytest.raises(ConfigError, match=name):
            load_config_text(text, env=partial)


def test_secret_env_comes_from_secrets_not_literals():
    for e in _container()["env"]:
        assert "value" not in e, f"{e['name']}: take it from a Secret or the downward API"
        src = e["valueFrom"]
        if e["name"] == "POD_NAME":
            assert src["fieldRef"]["fieldPath"] == "metadata.name"
        else:
            assert src["secretKeyRef"]["key"] == e["name"]


def test_workers_fit_the_cpu_limit():
    settings = _settings()
    workers = settings.gateway.node.workers
    limit = _quantity_cores(_container()["resources"]["limits"]["cpu"])
    # 0 (= os.cpu_count(), the node's CPUs, not the cgroup limit) is resolved at load; in a
    # pod it would start one worker per node CPU inside a one-CPU limit.
    assert 1 <= workers <= max(1, round(limit)), (workers, limit)
    assert "workers: 0" not in _config_text()


# ---------------------------------------------------------------------------- probes & ports

def test_probe_paths_are_built_in_endpoints():
    settings = _settings()
    table = builtins.table(types.SimpleNamespace(settings=settings), admin=True)
    paths = {p.decode() for p in table}
    c = _container()
    expected = {"livenessProbe": "/health/live", "readinessProbe": "/health/ready",
                "startupProbe": "/health/startup"}
    for probe, path in expected.items():
        assert c[probe]["httpGet"]["path"] == path, probe
        assert path in paths, f"{path} is not served by stellagw.health.builtins"
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert settings.gateway.metrics.enabled


def test_probes_and_scrapes_go_to_the_admin_listener():
    # Its own connection cap: a client port full at maxConnections never fails a probe.
    settings = _settings()
    c = _container()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert _container_port(get["port"]) == settings.gateway.admin.port, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe    # the admin listener is plain HTTP
    ann = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == settings.gateway.admin.port
    assert ann["prometheus.io/scheme"] == "http"


def test_container_ports_are_exactly_the_enabled_listeners():
    listeners = _enabled_listeners(_settings())
    ports = sorted(p["containerPort"] for p in _container()["ports"])
    assert ports == sorted(listeners.values())
    assert all(p.get("protocol", "TCP") == "TCP" for p in _container()["ports"])


def test_services_target_the_right_ports_and_pods():
    settings = _settings()
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert _deployment()["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    http = _one("Service", "stellagw")["spec"]
    assert http["selector"].items() <= pod_labels.items()
    assert [_container_port(p["targetPort"]) for p in http["ports"]] == [settings.gateway.http.port]
    assert http.get("sessionAffinity", "None") == "None"   # no sticky sessions needed
    # The origin clients use is where this Service listens.
    origin_port = int(settings.gateway.http.public_origin.rpartition(":")[2]) \
        if settings.gateway.http.public_origin.count(":") == 2 else 443
    assert [p["port"] for p in http["ports"]] == [origin_port]

    transport = _one("Service", "stellagw-transport")["spec"]
    assert transport["selector"].items() <= pod_labels.items()
    # Headless: a ClusterIP would land each service on one random pod, and never on a
    # worker's private port (docs/protocol.md §4.2).
    assert transport["clusterIP"] == "None"
    # Not-ready pods too: a new pod waits for the fleet's services to dial it before it is
    # ready (gateway.node.fleet), which they can only do if the name leads to it.
    assert transport.get("publishNotReadyAddresses") is True
    assert settings.gateway.node.fleet.valkey and settings.gateway.node.fleet.warmup_timeout
    enabled = _enabled_listeners(settings)
    enabled.pop("http")
    enabled.pop("admin", None)   # the kubelet and Prometheus dial pods directly
    assert sorted(_container_port(p["targetPort"]) for p in transport["ports"]) == \
        sorted(enabled.values())
    assert sorted(p["port"] for p in transport["ports"]) == sorted(enabled.values())


def test_pod_disruption_budget_selects_the_gateway_and_lets_drains_proceed():
    pdb = _one("PodDisruptionBudget", "stellagw")["spec"]
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    # One at a time at any scale: minAvailable at the HPA's floor would block every node
    # drain while it holds the floor, and a percentage rounds to 0 of 3.
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    assert pdb["maxUnavailable"] < _hpa()["minReplicas"]
    # A pod stuck not ready (no Authority keys) must not hold a node drain hostage.
    assert pdb.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"


# ---------------------------------------------------------------------------- scaling

def _hpa() -> dict:
    return _one("HorizontalPodAutoscaler", "stellagw")["spec"]


def test_hpa_scales_the_deployment_from_the_seeds_replicas():
    hpa = _hpa()
    ref = hpa["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "stellagw")
    # docs/requirements.md §12's three replicas are the floor.
    assert hpa["minReplicas"] == 3 and hpa["maxReplicas"] > hpa["minReplicas"]
    # The HPA owns the count: a `replicas` in the applied Deployment would reset it.
    assert "replicas" not in _deployment()["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    resources = _container()["resources"]
    limit = _quantity_cores(resources["limits"]["cpu"])
    if target["type"] == "AverageValue":
        per_pod = _quantity_cores(str(target["averageValue"]))
    else:
        assert target["type"] == "Utilization"   # relative to the request, not the limit
        per_pod = _quantity_cores(resources["requests"]["cpu"]) * target["averageUtilization"] / 100
    # Each worker is one event loop: a pod uses at most min(workers, limit) CPUs, so a target
    # at or above that is never reached and the HPA never scales up.
    workers = _settings().gateway.node.workers
    assert 0 < per_pod < min(workers, limit), (per_pod, workers, limit)


def test_hpa_scale_down_drains_one_pod_at_a_time():
    down = _hpa()["behavior"]["scaleDown"]
    grace = _pod()["terminationGracePeriodSeconds"]
    assert down["stabilizationWindowSeconds"] >= 60
    # Whatever policy is picked, no more than one pod per period and a period long enough
    # for the previous pod's drain to end.
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1, policy
        assert policy["periodSeconds"] >= grace, (policy, grace)


# ---------------------------------------------------------------------------- network policy

def _policy() -> dict:
    return _one("NetworkPolicy", "stellagw")["spec"]


def _rules_by_port() -> dict[int, dict]:
    """{port: the ingress rule that opens it} (ports as numbers; ranges left out)."""
    by_port = {}
    for rule in _policy()["ingress"]:
        for p in rule["ports"]:
            assert p.get("protocol", "TCP") == "TCP"
            if "endPort" in p:
                continue
            port = _container_port(p["port"])
            assert port not in by_port, f"port {port} in two rules: the wider one wins"
            by_port[port] = rule
    return by_port


def test_network_policy_selects_the_gateway_for_ingress():
    pol = _policy()
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert pol["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert pol["policyTypes"] == ["Ingress"]


def test_network_policy_opens_each_listener_to_its_own_peers():
    gw = _settings().gateway
    listeners = _enabled_listeners(_settings())
    by_port = _rules_by_port()
    # Exactly the listeners: a port the gateway does not listen on is a stale rule, one it
    # listens on and the policy forgets is a silent outage.
    assert sorted(by_port) == sorted(listeners.values()), (by_port.keys(), listeners)
    ranges = [p for rule in _policy()["ingress"] for p in rule["ports"] if "endPort" in p]
    assert not ranges or gw.node.workers > 1, "a port range only for workers' private ports"

    # Clients: from anywhere (no `from` at all; an empty list would mean the same, but a
    # `from` with any peer in it would shut out the internet).
    assert "from" not in by_port[gw.http.port]

    def peers(port):
        rule = by_port[port]
        assert rule.get("from"), f"port {port} must name its peers"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "pods move; select them by labels"
            assert peer.get("namespaceSelector", {}).get("matchLabels"), \
                "a namespace, named (an empty selector means every namespace)"
        return rule["from"]

    # Admin (/metrics, OpenAPI, readiness details): Prometheus' pods in its namespace. The
    # kubelet's probes come from the pod's node, which NetworkPolicy always allows.
    for peer in peers(gw.admin.port):
        assert peer.get("podSelector", {}).get("matchLabels"), \
            "the Prometheus pods, not every pod of its namespace"
    # Service transport: the services' namespace.
    for kind in ("tcp", "tls"):
        node = getattr(gw.transports, kind)
        if node.enabled:
            peers(node.port)


def test_network_policy_and_private_worker_ports_agree():
    # With several workers each one also listens on a private port from the ephemeral
    # range (docs/operations.md "Workers per pod"); the services' rule must then open it.
    gw = _settings().gateway
    if gw.node.workers == 1:
        return
    rule = _rules_by_port()[gw.transports.tls.port]
    assert any(p.get("endPort", 0) >= 60999 and p["port"] <= 32768 for p in rule["ports"])


# ---------------------------------------------------------------------------- lifecycle

def test_grace_period_covers_prestop_delay_and_drain():
    settings = _settings()
    grace = _pod()["terminationGracePeriodSeconds"]
    # SIGTERM: readiness fails, listeners stay open for preStopDelay, then the drain may
    # take shutdownTimeout; SIGKILL comes when the grace period is over, so leave 5 s for
    # the last log lines and the exit.
    assert grace >= _prestop_seconds() + settings.gateway.http.shutdown_timeout + 5, grace
    assert _prestop_seconds() >= 5  # long enough for endpoint removal to propagate
    # The gateway waits itself; a preStop sleep as well would add up to twice the wait
    # (and count against the same grace period).
    assert "preStop" not in _container().get("lifecycle", {})


def test_rollout_keeps_capacity_and_resources_are_the_seeds():
    spec = _deployment()["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    res = _container()["resources"]
    assert res["requests"] == {"memory": "256Mi", "cpu": "250m"}
    assert res["limits"] == {"memory": "512Mi", "cpu": "1000m"}


def test_runs_as_non_root_with_a_read_only_root_and_a_writable_tmp():
    pod, c = _pod(), _container()
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    assert uid and uid != 0
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    # Each port must be bindable without NET_BIND_SERVICE.
    assert all(p["containerPort"] >= 1024 for p in c["ports"])
    # The supervisor's metrics snapshots and PKCS#12 temp files go to tempfile's directory:
    # $TMPDIR, else /tmp. It must be a writable volume.
    tmpdir = next((e.get("value") for e in c.get("env", []) if e["name"] == "TMPDIR"), "/tmp")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == tmpdir)
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in vol and not mount.get("readOnly", False)


def test_certificate_files_live_on_read_only_secret_mounts():
    settings = _settings()
    pod, c = _pod(), _container()
    secret_mounts = {}
    for m in c["volumeMounts"]:
        vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
        if "secret" in vol:
            assert m.get("readOnly") is True, m["name"]
            secret_mounts[m["mountPath"]] = vol["secret"]["secretName"]
    gw = settings.gateway
    files = []
    for section in (gw.http.tls, gw.transports.tls):
        if section.enabled:
            files += [p for p in (section.certificate_path, section.key_path,
                                  section.client_ca_path) if p]
    assert files
    for path in files:
        assert os.path.dirname(path) in secret_mounts, f"{path} is on no Secret volume"


# ---------------------------------------------------------------------------- the image

def test_dockerfile_matches_the_manifests():
    df = _runtime_stage()
    stages, last = df["stages"], df["last"]
    assert len(stages) >= 2, "multi-stage: a builder with a compiler, a slim runtime"
    assert all(st["from"].split()[0] == "python:3.11-slim" for st in stages), \
        "both stages on the same base: the extensions are built against its Python and glibc"
    builder = stages[0]
    runs = " ".join(r for i, r in builder["instr"] if i == "RUN")
    assert "build-essential" in runs and "pip wheel" in runs

    exposed = {int(p.split("/")[0]) for p in _last(last, "EXPOSE").split()}
    assert {8080, 9100, 9443} <= exposed
    assert {p["containerPort"] for p in _container()["ports"]} <= exposed

    assert json.loads(_last(last, "ENTRYPOINT")) == ["stellagw"]
    cmd = json.loads(_last(last, "CMD"))
    assert cmd[0] == "serve" and "--config" in cmd
    config_path = cmd[cmd.index("--config") + 1]
    assert config_path == _config_mount()[0], "the ConfigMap is mounted where CMD reads it"
    assert "command" not in _container() and "args" not in _container(), \
        "the Deployment runs the image's ENTRYPOINT/CMD"
    assert _last(last, "STOPSIGNAL") == "SIGTERM"

    user = _last(last, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot checks it)"
    csc, psc = _container()["securityContext"], _pod()["securityContext"]
    assert int(uid) == csc.get("runAsUser", psc.get("runAsUser"))
    if gid:
        assert int(gid) == csc.get("runAsGroup", psc.get("runAsGroup"))


def test_dockerignore_keeps_local_build_output_out():
    with open(DOCKERIGNORE) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "an allow-list"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = set()
    for instr, rest in _dockerfile():
        if instr == "COPY" and "--from" not in rest:
            copied |= {p.rstrip("/") for p in shlex.split(rest)[:-1]}
    assert copied <= allowed, f"COPY of files the context does not carry: {copied - allowed}"
    for pattern in ("cext/*.c", "**/*.so", "**/__pycache__"):
        assert pattern in lines


# ---------------------------------------------------------------------------- for real

def _write_certs(root: str, pfx_password: str) -> None:
    """Files at the places the ConfigMap names (relocated under `root`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from stellagw.devauth.pki import issue_cert, make_ca

    pem = serialization.Encoding.PEM
    ca, ca_key = make_ca("deploy test CA")
    https, https_key = issue_cert(ca, ca_key, "gw.example.com", dns=["gw.example.com"],
                                  ips=["127.0.0.1"])
    transport, transport_key = issue_cert(ca, ca_key, "stellagw-transport",
                                          dns=["stellagw-transport.stellaops.svc"],
                                          ips=["127.0.0.1"])
    service, service_key = issue_cert(ca, ca_key, "scanner", client=True, server=False)

    def put(rel, data):
        path = os.path.join(root, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    key_pem = lambda k: k.private_bytes(pem, serialization.PrivateFormat.PKCS8,  # noqa: E731
                                        serialization.NoEncryption())
    put("/certs/https/tls.crt", https.public_bytes(pem))
    put("/certs/https/tls.key", key_pem(https_key))
    put("/certs/https/ca.crt", ca.public_bytes(pem))
    put("/certs/transport/transport.pfx", pkcs12.serialize_key_and_certificates(
        b"transport", transport_key, transport, None,
        serialization.BestAvailableEncryption(pfx_password.encode())))
    put("/certs/transport/services-ca.crt", ca.public_bytes(pem))
    # The service's side (not part of the pod): its client certificate and our CA.
    put("/service/client.crt", service.public_bytes(pem))
    put("/service/client.key", key_pem(service_key))
    put("/service/ca.crt", ca.public_bytes(pem))


def _jwks(path: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwk.update(kid="deploy-test", use="sig", alg="ES256")
    with open(path, "w") as f:
        json.dump({"keys": [jwk]}, f)


def _probe(port: int, path: str):
    """GET like the kubelet: HTTPS without verifying the certificate, no client certificate."""
    ctx = ssl._create_unverified_context()
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _admin_probe(port: int, path: str):
    """GET like the kubelet on the admin listener (plain HTTP)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _ports_from_log(served, workers):
    recs = served.wait_listening(count=workers)
    http = recs[0]["http"]
    assert http.startswith("https://0.0.0.0:"), http
    tls = recs[0]["tls"]
    assert tls.startswith("0.0.0.0:"), tls
    admin = recs[0]["admin"]
    assert admin.startswith("http://0.0.0.0:"), admin
    return int(http.rsplit(":", 1)[1]), int(tls.rsplit(":", 1)[1]), int(admin.rsplit(":", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [None, 2], ids=["as-configured", "two-workers"])
def test_configmap_config_serves_probes_and_registers_a_tls_service(tmp_path, monkeypatch,
                                                                     workers):
    """The ConfigMap's gateway.yaml, run as the pod would: only the certificate paths move
    under tmp_path, ports become 0 and keys come from a JWKS file instead of the Authority."""
    from stellagw.service import Response, Service

    env = _dummy_env()
    env["VALKEY_URL"] = "127.0.0.1:1"   # no Valkey: both users of it fail open, by design
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _write_certs(str(tmp_path), env["GATEWAY_CERT_PASSWORD"])
    jwks = str(tmp_path / "jwks.json")
    _jwks(jwks)

    raw = yaml.safe_load(_config_text())
    gw = raw["gateway"]
    for section in (gw["http"]["tls"], gw["transports"]["tls"]):
        for key in ("certificatePath", "keyPath", "clientCaPath"):
            if section.get(key):
                section[key] = str(tmp_path) + section[key]
    gw["http"]["port"] = 0
    gw["admin"]["port"] = 0
    gw["transports"]["tls"]["port"] = 0
    gw["node"]["preStopDelay"] = "200ms"   # the configured 10 s matter to a cluster, not here
    gw["auth"]["jwksPath"] = jwks
    text = yaml.safe_dump(raw, sort_keys=False)
    args = ["--workers", str(workers)] if workers else []
    served = Served(*args, config_text=text, tmp_path=tmp_path)
    n = workers or load_config_text(text, env=env).gateway.node.workers
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    svc = None
    try:
        http_port, tls_port, admin_port = _ports_from_log(served, n)
        c = _container()
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = c[probe]["httpGet"]["path"]
            deadline = time.monotonic() + 10
            while True:
                status, body = _admin_probe(admin_port, path)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == 200, (probe, status, body)
        status, body = _admin_probe(admin_port, "/metrics")
        assert status == 200 and b"gateway_requests_total" in body
        # The HTTPS client port keeps liveness and a bare readiness, nothing internal.
        assert _probe(http_port, "/health/ready") == (200, b'{"status":"Ready"}')
        assert _probe(http_port, "/health/live")[0] == 200
        assert _probe(http_port, "/metrics")[0] != 200

        # A service dials the transport like a pod's neighbour would: TLS with a client
        # certificate, the name on the gateway's certificate, and (two workers) the private
        # ports the HELLO_ACK names with host "" = the address it dialled.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "service/ca.crt"))
        ctx.load_cert_chain(str(tmp_path / "service/client.crt"),
                            str(tmp_path / "service/client.key"))
        svc = Service("scanner", "1.0.0", gateways=[f"127.0.0.1:{tls_port}"], ssl=ctx,
                      server_hostname="stellagw-transport.stellaops.svc",
                      reconnect_min=0.05, reconnect_max=0.5)

        @svc.get("/api/v1/scans/{id}")
        async def scan(req):
            return Response.json({"id": req.params["id"]})

        asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
        asyncio.run_coroutine_threadsafe(svc.wait_registered(links=n, timeout=15), loop).result(20)
        assert {key[0] for key in svc._links} == {env["POD_NAME"]}   # nodeId from the pod name
        deadline = time.monotonic() + 10
        seen = set()
        while time.monotonic() < deadline and len(seen) < n:
            status, body = _admin_probe(admin_port, "/health/ready")
            doc = json.loads(body)
            if status == 200 and "scanner" in json.dumps(doc.get("services")):
                seen.add(doc["worker"])
        assert len(seen) == n, f"workers that see the service: {seen}"

        # SIGTERM (what the kubelet sends): drained and gone well inside the grace period.
        asyncio.run_coroutine_threadsafe(svc.stop(timeout=1), loop).result(10)
        svc = None
        t0 = time.monotonic()
        assert served.stop(signal.SIGTERM) == 0
        budget = _pod()["terminationGracePeriodSeconds"] - _prestop_seconds()
        assert time.monotonic() - t0 < budget
    finally:
        if svc is not None:
            asyncio.run_coroutine_threadsafe(svc.stop(timeout=1), loop).result(10)
        served.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
