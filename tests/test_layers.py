"""The server's modules form one-way layers (docs/ARCHITECTURE.md, "Layers"): no module
imports one of a higher layer, at module level or inside a function, and the import
graph has no cycle. Where a lower layer reports on a higher one, the higher one registers
itself (``pool.register``). Run ``python tests/test_layers.py`` to print the graph's
layers, its edges and its cycles."""
from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ("project", "events_app", "sessions_app")
CLIENTS = ("tandem_client", "bench")

# Lowest first. A module may import its own layer and the ones before it. Keep in step
# with the list in docs/ARCHITECTURE.md.
LAYERS: list[tuple[str, list[str]]] = [
    ("project core", [
        "project.settings", "project.secretkey", "project.rates", "project.redisconn",
        "project.errors", "project.auth", "project.runtime", "project.liveness",
        "project.limits", "project.logfilters", "project.db", "project.sql", "project.thirdparty",
        "project.batch",
    ]),
    ("agent definitions", [
        "sessions_app.agents.base", "sessions_app.agents.registry", "sessions_app.agents.echo",
        "sessions_app.agents.tools_agent", "sessions_app.agents.openai",
        "sessions_app.agents.tools", "sessions_app.agents.calculator", "sessions_app.agents.mcp_tools",
    ]),
    ("schema", ["sessions_app.models", "events_app.models"]),
    ("event log", [
        "events_app.types", "events_app.groups", "events_app.metrics",
        "events_app.history", "events_app.cursors", "events_app.fanout", "events_app.services",
        "events_app.admin",
    ]),
    ("sessions domain", [
        "sessions_app.access", "sessions_app.serializers", "sessions_app.permissions",
        "sessions_app.runs", "sessions_app.services", "sessions_app.search",
        "sessions_app.signals", "sessions_app.admin", "sessions_app.doc", "sessions_app.doc_tools",
        "sessions_app.keys",
    ]),
    ("live transport", [
        "events_app.presence", "events_app.streams", "events_app.commands",
        "events_app.consumers", "events_app.docsocket", "events_app.routing", "events_app.publishing",
        "events_app.ingest", "events_app.management.commands.ingest_redis",
    ]),
    ("HTTP surface", [
        "project.openapi", "project.views", "project.probes", "project.middleware", "project.handler",
        "sessions_app.views", "sessions_app.pages", "sessions_app.urls", "events_app.views",
        "sessions_app.mcp_server", "sessions_app.management.commands.mcp_server",
    ]),
    ("agents", [
        "sessions_app.agents.runner", "sessions_app.agents.pool",
        "sessions_app.management.commands.run_agents",
    ]),
    ("composition roots", ["project.asgi", "project.urls", "sessions_app.apps", "events_app.apps"]),
]


def modules(packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` by dotted name; migrations and (empty) package
    ``__init__`` files are left out."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts or path.name == "__init__.py":
                continue
            found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return found


def _imported_names(name: str, path: Path) -> Iterator[str]:
    # ast.walk reaches imports inside functions, classes and `if TYPE_CHECKING:` too.
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                yield f"{base}.{alias.name}"  # a module, or a name in module `base`
                yield base


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports anywhere in its text."""
    known = modules(packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in _imported_names(name, path):
            if imported in known and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of() -> dict[str, int]:
    return {module: rank for rank, (_, members) in enumerate(LAYERS) for module in members}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = layer_of()
    return [
        f"{source} ({LAYERS[rank[source]][0]}) imports {target} ({LAYERS[rank[target]][0]})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if rank[target] > rank[source]
    ]


def test_every_server_module_has_one_layer() -> None:
    listed = [module for _, members in LAYERS for module in members]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    assert sorted(modules(SERVER)) == sorted(listed)


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(import_graph(SERVER)) == []


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph(SERVER + CLIENTS)) == []


def test_the_client_and_the_bench_import_nothing_of_the_server() -> None:
    graph = import_graph(SERVER + CLIENTS)
    server = set(modules(SERVER))
    for name in modules(CLIENTS):
        assert not graph[name] & server, name


def test_the_checks_see_function_level_imports_and_cycles(tmp_path: Path) -> None:
    # The checks must be able to fail: a cycle made only of function-level imports.
    global ROOT
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high\n")
    (package / "high.py").write_text("from pkg.low import f\n")
    saved, ROOT = ROOT, tmp_path
    try:
        graph = import_graph(("pkg",))
    finally:
        ROOT = saved
    assert graph == {"pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]


def test_where_code_lives_names_every_module() -> None:
    # A bare file name in a row is in the folder of the last full path before it.
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Where code lives", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in table.splitlines():
        folder = ""
        for span in re.findall(r"`([^`]+)`", row.split("|")[1] if "|" in row else ""):
            if "/" in span:
                folder = span.rsplit("/", 1)[0]
                named.add(span)
            elif folder:
                named.add(f"{folder}/{span}")
    paths = {str(path.relative_to(ROOT)) for path in modules(SERVER).values()}
    assert paths - named == set()
    assert {"static/", "tandem_client/", "bench/"} <= named


if __name__ == "__main__":
    graph = import_graph(SERVER + CLIENTS)
    for rank, (layer, members) in enumerate(LAYERS):
        print(f"{rank} {layer}: {', '.join(members)}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    print("upward imports:", upward_imports(import_graph(SERVER)) or "none")
    print("cycles:", cycles(graph) or "none")
