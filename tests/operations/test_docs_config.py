"""The configuration the documents show is the configuration the loader accepts.

Every ```yaml block in docs/*.md, README.md and perf/README.md, every inline `gateway: {...}` /
`rate_limiting: {...}` span, and examples/*.yaml go through stellagw.config; every
`gateway.…` / `rate_limiting.…` key named in backticks must exist in the settings classes.
A block that is deliberately partial or wrong starts with `# not a complete configuration`
and is skipped; fixing the block is better than marking it.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing

import pytest
import yaml

from stellagw.config import ConfigError, Settings, load_config_text
from stellagw.observe.metrics import DURATION_BUCKETS
from tests.support import REPO

ROOT = REPO
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "perf" / "README.md"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SKIP_MARK = "# not a complete configuration"

_FENCE = re.compile(r"^( *)```yaml[^\n]*\n(.*?)^\1```", re.S | re.M)
_INLINE = re.compile(r"`((?:gateway|rate_limiting): *\{[^`]*)`")
# ${NAME} with no default must be set, or the loader (rightly) refuses the file.
_REQUIRED_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KEY_SPAN = re.compile(r"`((?:gateway|rate_limiting)\.[^`\s]*)")

# Backticked names that start like a key but are not configuration.
NOT_KEYS = {
    "gateway.yaml",                    # the ConfigMap's file name
    "gateway.route",                   # OpenTelemetry span names (docs/configuration.md
    "gateway.auth.validate",           # "tracing", requirements.md)
    "gateway.transport.send",
}


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _snippets() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            out.append((f"{_rel(path)}:{line}", m.group(2)))
        for m in _INLINE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{_rel(path)}:{line} (inline)", m.group(1)))
    out += [(_rel(path), path.read_text()) for path in EXAMPLES]
    return out


SNIPPETS = _snippets()


def _is_clients_file(text: str) -> bool:
    doc = yaml.safe_load(text)
    return isinstance(doc, dict) and set(doc) == {"clients"}


@pytest.mark.parametrize("where, text", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_every_configuration_shown_loads(where, text, tmp_path):
    if text.lstrip().startswith(SKIP_MARK):
        pytest.skip("marked as not a complete configuration")
    if _is_clients_file(text):
        # docs/dev-authority.md's --clients file: the dev Authority's own loader reads it.
        from stellagw.devauth.authority import load_clients
        path = tmp_path / "clients.yaml"
        path.write_text(text)
        assert load_clients(str(path))
        return
    env = {name: "x" * 40 for name in _REQUIRED_VAR.findall(text)}
    try:
        load_config_text(text, env=env, source=where)
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}")


def test_the_documents_have_snippets_to_check():
    # A fence regex that stopped matching would pass every document vacuously.
    fenced = [w for w, _ in SNIPPETS if re.search(r"\.md:\d+$", w)]
    assert len(fenced) >= 8
    assert any(w.endswith("(inline)") for w, _ in SNIPPETS)


# ---------------------------------------------------------------------------- named keys

def _child(cls: type, name: str):
    """The type under the YAML key ``name`` of section ``cls``, or None when there is none."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("yaml") == name:
            return hints[f.name]
    return None


def _unwrap(hint):
    """("section", cls) | ("list", cls) | ("map", value type) | ("leaf", None)."""
    if dataclasses.is_dataclass(hint):
        return "section", hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is types.UnionType and len(args) == 1:
        return _unwrap(args[0])
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return "list", args[0]
    if origin is not None and origin not in (tuple, list) and args:
        return "map", args[-1]
    return "leaf", None


def key_exists(path: str) -> bool:
    """``path`` as the documents write it: dots, ``[]``/``[0]`` on lists, ``<name>`` or any
    name in a mapping of names, ``*`` for any key of a section."""
    return _resolves([p for p in path.split(".") if p], "section", Settings)


def _resolves(parts: list[str], kind: str, cls) -> bool:
    if not parts:
        return True
    part, rest = parts[0], parts[1:]
    if kind == "map":
        # Any name; what is below it is the mapping's value.
        return _resolves(rest, *_unwrap(cls))
    if kind != "section":
        return False                             # a key below a plain value
    if part == "*":
        return any(_resolves([f.metadata["yaml"]] + rest, kind, cls)
                   for f in dataclasses.fields(cls))
    name, _, index = part.partition("[")
    hint = _child(cls, name)
    if hint is None:
        return False
    kind, cls = _unwrap(hint)
    if index:
        if not index.endswith("]") or kind not in ("list", "leaf"):
            return False
        if kind == "list":
            kind = "section"
    return _resolves(rest, kind, cls)


def _named_keys() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _KEY_SPAN.finditer(text):
            # `key: value` and `key=value` name the key before the separator; an ellipsis
            # stands for the rest of the path.
            key = re.split(r"[:=,(]", m.group(1), maxsplit=1)[0].rstrip(".…")
            if key in NOT_KEYS:
                continue
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{_rel(path)}:{line}", key))
    return out


def test_key_walker():
    assert key_exists("gateway.http.port") and key_exists("gateway.http")
    assert key_exists("rate_limiting.for_instance.rules[].max_requests")
    assert key_exists("rate_limiting.for_instance.rules[0]")
    assert key_exists("rate_limiting.for_environment.microservices.<name>.routes.x.pattern")
    assert key_exists("gateway.health.*") and key_exists("gateway.transports.*.maxFrameSize")
    assert not key_exists("gateway.transports.*.maxFrameSiz")
    assert key_exists("gateway.admin.publicEndpoints")
    assert not key_exists("gateway.http.prot")
    assert not key_exists("gateway.http.port.x")
    assert not key_exists("rate_limiting.for_instance.rules[].max_request")
    assert not key_exists("gateway.logging.access_log")


def test_every_key_named_in_the_documents_exists():
    named = _named_keys()
    assert len(named) > 100
    missing = [f"{where}: {key}" for where, key in named if not key_exists(key)]
    assert not missing, "keys the documents name that the configuration does not have:\n" + \
        "\n".join(missing)


# ---------------------------------------------------------------------------- metrics

def _as_seconds(number: str, unit: str) -> float:
    return float(number) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def test_documented_histogram_buckets_are_the_real_ones():
    ops = (ROOT / "docs" / "operations.md").read_text()
    m = re.search(r"buckets from ([\d.]+) (µs|ms|s) to ([\d.]+) (µs|ms|s)", ops)
    assert m, "docs/operations.md §6 names the request histogram's bucket range"
    assert _as_seconds(m[1], m[2]) == pytest.approx(DURATION_BUCKETS[0])
    assert _as_seconds(m[3], m[4]) == pytest.approx(DURATION_BUCKETS[-1])
    perf = (ROOT / "perf" / "README.md").read_text()
    m = re.search(r"first bucket (?:is|ends at) ([\d.]+) (µs|ms|s)", perf)
    assert m and _as_seconds(m[1], m[2]) == pytest.approx(DURATION_BUCKETS[0])
