"""The ``stllava`` package has no import circle, not even one closed by a function-local import.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` anywhere in
a module (module level and inside functions), relative imports resolved, and ``from x import y``
pointing at the submodule ``x.y`` when ``y`` is one (else at ``x``). A circle is reported as the
chain of modules that closes it, with the file and line of each import.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stllava"


def module_files() -> dict[str, pathlib.Path]:
    """``{"stllava.data.sft": path, "stllava.data": .../__init__.py, ...}``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported stllava module: line of the first such import}}``."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node, module, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            for target in targets:
                if target in files and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One closed chain ``[a, b, ..., a]`` per strongly connected component of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
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
                        components.append(sorted(component))
    return [_chain(graph, set(c)) for c in components]


def _chain(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest closed path through the first module of ``component`` (breadth-first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def describe(graph: dict[str, dict[str, int]], chain: list[str]) -> str:
    files = module_files()
    steps = [f"{a} ({files[a].relative_to(REPO)}:{graph[a][b]})" for a, b in zip(chain, chain[1:])]
    return " → ".join(steps + [chain[-1]])


def test_the_graph_sees_function_local_imports_and_submodules():
    graph = import_graph()
    # tooling imports the model loader inside load_model only
    assert "stllava.model.builder" in graph["stllava.tooling"]
    # `from stllava.model import checkpoint_layouts as cl` is an edge to the submodule
    assert "stllava.model.checkpoint_layouts" in graph["stllava.model.export_hf"]


def test_the_cycle_finder_names_a_circle():
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 1}, "d": {"a": 2}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    cycles = [describe(graph, chain) for chain in find_cycles(graph)]
    assert not cycles, "import circles in stllava:\n" + "\n".join(cycles)
