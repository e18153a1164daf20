"""The package's shape (DESIGN.md, issue 21): data flows CLI -> runners -> workloads/profiler/results,
kernels below workloads; no module imports a higher layer, and no two modules import each other,
directly or around a circle, counting the imports made inside functions too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmprof"
# what each subpackage may import from mmprof besides itself (the top-level modules: errors, settings, __version__)
ALLOWED = {
    "kernels": set(),
    "profiler": set(),
    "results": set(),
    "workloads": {"kernels"},
    "runners": {"kernels", "workloads", "profiler", "results"},
}
TOP_LEVEL = {"mmprof", "mmprof.errors", "mmprof.settings"}


def _modules():
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def _imports(name, path, modules):
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            plain = [a for a in node.names if f"{target}.{a.name}" not in modules]
            found |= submodules
            if plain and target in modules:
                found.add(target)
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_no_module_imports_itself_around_a_circle():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items() if _layer(name) == layer
        for target in targets
        if target not in TOP_LEVEL and _layer(target) not in {layer, *ALLOWED[layer]}
    )  # fmt: skip
    assert wrong == []


def test_the_checker_sees_a_circle_and_a_lazy_import(tmp_path):
    """The parser on two modules that import each other, one inside a function."""
    (tmp_path / "a.py").write_text("from mmprof.kernels import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from mmprof.kernels.a import g\n")
    modules = {"mmprof.kernels.a": tmp_path / "a.py", "mmprof.kernels.b": tmp_path / "b.py"}
    assert _imports("mmprof.kernels.a", modules["mmprof.kernels.a"], modules) == {"mmprof.kernels.b"}
    assert _imports("mmprof.kernels.b", modules["mmprof.kernels.b"], modules) == {"mmprof.kernels.a"}
