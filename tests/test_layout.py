"""The package's layout: one downward path from the API to each kernel, no import circle
(imports inside functions included), and the tools outside the package use its public names."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amdim_kernels"
_PACKAGE_MODULES = {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
    return {m for m in found if m and m.split(".")[0] == "amdim_kernels"}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # an import of a.b.c also runs a and a.b; edges to packages' __init__ are left out
        # (importing a submodule always runs its package first, which is no circle)
        graph[name] = {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")
                       and m != "amdim_kernels"}
    return graph


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_api_reaches_every_backend_downward():
    graph = _graph()
    assert "amdim_kernels.registry" in graph["amdim_kernels.api"]
    assert not graph["amdim_kernels.environment"], "environment.py is the bottom: it imports no other module"
    assert not graph["amdim_kernels.shared_constants"]


def test_tools_use_public_names():
    """tests/, benchmarks/ and amdim/ import no underscored name from the package."""
    private = []
    for folder in ("tests", "benchmarks", "amdim"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amdim_kernels"):
                    private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                        and isinstance(node.value, ast.Name) and node.value.id in _PACKAGE_MODULES:
                    private.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not private, private

