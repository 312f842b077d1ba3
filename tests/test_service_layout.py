"""The service package's layering (issue 14, service split): server.py keeps the life cycle
and the dispatch, the parts below it (connections, ceremonies, cards, request handlers)
never import it, not even for type hints, and no two of its modules import each other."""

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "token_agent" / "service"
#: a pre-existing pair of lazy imports between the log handlers, outside this layering
KNOWN_CYCLES = {frozenset({"journal", "logs"})}


def imports() -> dict[str, set[str]]:
    """module (``handlers.login``) -> the modules of the package it imports, anywhere in
    it (top level, functions, ``if TYPE_CHECKING``)."""
    modules = {}
    for path in SERVICE.rglob("*.py"):
        name = ".".join(path.relative_to(SERVICE).with_suffix("").parts)
        modules[name.removesuffix(".__init__").removesuffix("__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        package = [p for p in package if p]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            up = node.level - 1
            if up > len(package):
                continue  # above the service package
            base = package[:len(package) - up] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                for candidate in (".".join(base + [alias.name]), ".".join(base)):
                    if candidate in modules:
                        deps.add(candidate)
                        break
        graph[name] = deps - {name}
    return graph


def test_nothing_in_the_service_imports_server():
    importers = sorted(name for name, deps in imports().items() if "server" in deps)
    assert importers == []


def test_no_import_circles_in_the_service():
    graph = imports()
    cycles = set()

    def walk(name, path):
        for dep in graph[name]:
            if dep in path:
                cycles.add(frozenset(path[path.index(dep):]))
            elif len(path) < len(graph):
                walk(dep, path + [dep])

    for name in graph:
        walk(name, [name])
    assert cycles - KNOWN_CYCLES == set()


def test_no_service_module_is_over_600_lines():
    sizes = {str(p.relative_to(SERVICE)): len(p.read_text().splitlines())
             for p in SERVICE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}
