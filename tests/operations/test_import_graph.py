"""The package import graph of stellagw has no cycle.

Every import in the package counts — at the top of a module or inside a function, in a
`.py`, a glue module's `.pxd` (`cimport`) or a codec's `cext/*.pyx` — because an import a
function makes later is still a dependency a reader has to follow. Each node is a
subpackage (`stellagw.auth`, `stellagw.transport`, ...) or a top-level module
(`stellagw.pipeline`, `stellagw.config`, ...). A codec's two implementations,
`stellagw._cext.<name>` and `stellagw._py.<name>`, count as part of the one package whose
module chooses between them (`stellagw/transport/frame.py` chooses the frame codec): that
they are built into `_cext/` and `_py/` is a matter of the build, not of the layout
(docs/hot-path.md). Compiled glue that cimports a codec's declarations
(`stellagw/_cext/metrics.pxd`) depends on that package.

Run as a script, it prints the graph: `python tests/operations/test_import_graph.py`.
"""
from __future__ import annotations

import ast
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/operations/ is two below
PKG = os.path.join(ROOT, "stellagw")
CODEC_PACKAGES = ("stellagw._cext", "stellagw._py")

_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+(\S+)\s+c?import\b|c?import\s+([\w.]+))", re.M)


def _modules() -> dict[str, str]:
    """Dotted name -> path of every source in the package (and the codecs' .pyx)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith((".py", ".pxd")):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
                dotted = os.path.splitext(rel)[0].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[: -len(".__init__")]
                found.setdefault(dotted, [])
                found[dotted].append(os.path.join(dirpath, name))
    for name in sorted(os.listdir(os.path.join(ROOT, "cext"))):
        if name.endswith(".pyx"):
            found.setdefault("stellagw._cext." + name[:-4], []).append(
                os.path.join(ROOT, "cext", name))
    return found


def _is_package(dotted: str) -> bool:
    return os.path.isdir(os.path.join(ROOT, *dotted.split(".")))


def _resolve(importer: str, is_pkg: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    base = base[: len(base) - level + (1 if is_pkg else 0)]
    return ".".join(base + ([module] if module else []))


def _imports(dotted: str, path: str):
    """(imported dotted name, line) for every import in one file; `from X import y` gives
    X.y when that is a module, else X."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    is_pkg = os.path.basename(path).startswith("__init__.")
    if path.endswith(".py"):
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(dotted, is_pkg, node.module, node.level)
                for alias in node.names:
                    # `from X import y`: the module X.y when there is one, else X itself.
                    yield f"{base}.{alias.name}", node.lineno
        return
    for m in _CYTHON_IMPORT.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        yield (m.group(1) or m.group(2)), line


def _node(dotted: str, codec_home: dict[str, str]) -> str | None:
    if dotted != "stellagw" and not dotted.startswith("stellagw."):
        return None
    for pkg in CODEC_PACKAGES:
        if dotted.startswith(pkg + "."):
            return codec_home.get(dotted.split(".")[2])
    parts = dotted.split(".")
    return ".".join(parts[:2])


def graph():
    """({node: {node: [(file, line), ...]}}, {codec: home node}) over the whole package."""
    modules = _modules()
    raw = []   # (importer module, imported module, file, line)
    for dotted, paths in modules.items():
        for path in paths:
            for target, line in _imports(dotted, path):
                while target and target not in modules and target != "stellagw":
                    target = target.rpartition(".")[0]   # an attribute: its module
                if target:
                    raw.append((dotted, target, os.path.relpath(path, ROOT), line))

    # A codec's home: the one package (or top-level module) whose Python imports it from
    # outside the codec packages (a .pxd's cimport of its C declarations chooses nothing).
    homes = defaultdict(set)
    for src, dst, path, _ in raw:
        if dst.startswith(tuple(p + "." for p in CODEC_PACKAGES)) \
                and not src.startswith(CODEC_PACKAGES) and path.endswith(".py"):
            homes[dst.split(".")[2]].add(".".join(src.split(".")[:2]))
    codec_home = {}
    for codec, nodes in homes.items():
        assert len(nodes) == 1, f"codec {codec!r} is chosen in more than one place: {sorted(nodes)}"
        codec_home[codec] = nodes.pop()

    edges: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for src, dst, path, line in raw:
        a, b = _node(src, codec_home), _node(dst, codec_home)
        if a and b and a != b:
            edges[a][b].append((path, line))
    return edges, codec_home


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for targets in edges.values() for w in targets}):
        if v not in index:
            visit(v)
    return out


def _describe(comp, edges) -> str:
    lines = [" <-> ".join(comp)]
    for a in comp:
        for b in sorted(edges.get(a, ())):
            if b in comp:
                where = ", ".join(f"{p}:{n}" for p, n in edges[a][b][:3])
                lines.append(f"  {a} -> {b}   ({where})")
    return "\n".join(lines)


def test_no_package_level_import_cycle():
    edges, _ = graph()
    found = cycles(edges)
    assert not found, "package import cycles:\n" + "\n".join(_describe(c, edges) for c in found)


def test_every_codec_has_one_home_and_is_imported_plainly():
    _, homes = graph()
    codecs = sorted(name[:-4] for name in os.listdir(os.path.join(ROOT, "cext"))
                    if name.endswith(".pyx"))
    assert sorted(homes) == codecs, "a codec no module imports by name: " \
        f"{sorted(set(codecs) - set(homes))}"


def test_the_graph_sees_the_journey():
    # The measure itself: known edges are found, so an empty cycle list means something.
    edges, homes = graph()
    assert "stellagw.ingress" in edges["stellagw.transport"]     # connection.pxd cimports Request
    assert "stellagw.auth" in edges["stellagw.pipeline"]
    assert homes["frame"] == "stellagw.transport" and homes["radix"] == "stellagw.routing"


if __name__ == "__main__":
    edges, homes = graph()
    for a in sorted(edges):
        print(a, "->", ", ".join(sorted(edges[a])))
    print("codecs:", ", ".join(f"{k} in {v}" for k, v in sorted(homes.items())))
    for comp in cycles(edges):
        print("CYCLE", _describe(comp, edges))
    sys.exit(1 if cycles(edges) else 0)
