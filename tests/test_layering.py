"""The import graph of the project's own modules, read with ``ast`` (every import, at module level,
inside functions and under ``TYPE_CHECKING`` alike): no cycles, and a layer imports only the
layers below it, so each layer can be read, tested and reused without the ones above.

    protos < worker < planner < server < loadtest, bench

(``worker`` holds the model, the rank runtime and the hub's executor; ``planner`` sizes a cluster
from ``worker``'s budgets and probes; ``server`` is the coordinator process; the benches and the
load test drive any of them.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["protos", "worker", "planner", "server", "loadtest", "bench"]  # lowest first
TOOLS = {"loadtest", "bench"}  # the top: neither imports the other


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every Python file of the layers, by its dotted name (generated gRPC code left out)."""
    found: dict[str, Path] = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                found[_module_name(path)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of ``name`` loads: ``name`` itself, or the longest project
    module it starts with (``from worker.models import model_class`` -> ``worker.models``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports, wherever in the file the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # "from worker.kernels import quant" imports the module worker.kernels.quant, "from x import name" x
            for alias in node.names:
                names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    found = {resolved for n in names if n and (resolved := _resolve(n, modules))}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to each package above the
    # target that the importer is not itself inside (a package may import its own modules)
    for target in list(found):
        parts = target.split(".")
        for end in range(1, len(parts)):
            package = ".".join(parts[:end])
            if package in modules and not f"{module}.".startswith(f"{package}."):
                found.add(package)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[0]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            here, there = _layer(module), _layer(target)
            if here == there:
                continue
            if rank[there] > rank[here] or (here in TOOLS and there in TOOLS):
                bad.append(f"{module} imports {target} ({there} is not below {here})")
    return bad


def test_the_project_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)  # the walk found the project
    assert find_cycles(graph) == []


def test_each_layer_imports_only_the_layers_below_it() -> None:
    graph = import_graph()
    assert layering_violations(graph) == []
    assert not any(_layer(t) == "server" for m, ts in graph.items() if _layer(m) in ("worker", "planner") for t in ts)


def test_the_checks_see_what_they_must_refuse(tmp_path: Path) -> None:
    """The walk resolves every import form, and a cycle or an upward import is reported. (The
    modules named are ones that keep their place in any worker/ layout: restructure.sh.)"""
    modules = project_modules()
    source = tmp_path / "probe.py"
    source.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                      "from worker import cli\nimport worker.config as config\n"
                      "if TYPE_CHECKING:\n    from server.engine import Engine\n"
                      "def late():\n    from planner.plan import Plan  # noqa\n")
    assert imports_of("worker.probe", source, modules) == {"worker.cli", "worker.config", "server.engine",
                                                          "planner.plan", "server", "planner"}
    relative = tmp_path / "__init__.py"
    relative.write_text("from . import llama\nfrom ..arguments import positive_int\n")
    assert imports_of("worker.models", relative, modules) == {"worker.models.llama", "worker.arguments"}
    # a module outside worker.models importing one of its modules runs worker/models/__init__ too
    outside = tmp_path / "outside.py"
    outside.write_text("from worker.models.llama import RankModel\n")
    assert imports_of("worker.kernels.quant", outside, modules) == {"worker.models.llama", "worker.models"}

    graph = {"worker.a": {"worker.b"}, "worker.b": {"worker.c"}, "worker.c": {"worker.a"}, "worker.d": set()}
    assert find_cycles(graph) == [["worker.a", "worker.b", "worker.c"]]
    assert layering_violations({"planner.x": {"server.y", "worker.z"}, "bench.b": {"loadtest.l"}}) == [
        "bench.b imports loadtest.l (loadtest is not below bench)",
        "planner.x imports server.y (server is not below planner)"]


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_walked(layer: str) -> None:
    assert any(_layer(m) == layer for m in import_graph()), layer
