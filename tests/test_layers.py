"""The layers of kme/, read from the code's own imports (an AST walk, function-level imports included).

From the top: the app factory; interfaces (HTTP, the flask commands, the ingestion worker); the domain (with
the operations that mean something: ingestion, health, metrics); the peers; storage; shared leaves
(configuration, errors, clock, text, SAE and KME IDs, key IDs, key math). A module imports only from its own layer or those
below, and no modules import each other in a circle.
"""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine_independent

PACKAGE = Path(__file__).resolve().parent.parent / "kme"

# (module prefix, layer): the longest matching prefix decides; higher layers may import lower ones. The package
# itself (the app factory) is the top; a module no prefix names has no layer.
TOP = ("kme", 6)
LAYERS = [
    ("kme.interfaces", 5),
    ("kme.operations.cli", 5),
    ("kme.operations.command_support", 5),
    ("kme.operations.key_encryption_cli", 5),
    ("kme.operations.recovery_cli", 5),
    ("kme.operations.schema_cli", 5),
    ("kme.operations.watch", 5),
    ("kme.domain", 4),
    ("kme.operations", 4),
    ("kme.peers", 3),
    ("kme.storage", 2),
    ("kme.config", 1),
    ("kme.config_schema", 1),
    ("kme.config_checks", 1),
    ("kme.errors", 1),
    ("kme.clock", 1),
    ("kme.text", 1),
    ("kme.key_ids", 1),
    ("kme.ids", 1),
    ("kme.key_math", 1),
    ("kme.database_uris", 1),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py") if "migrations" not in path.parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kme modules ``name`` imports (a name imported from a package counts as its module when it is one)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {module for module in found if module in known and module != name}


def _layer(module: str) -> int | None:
    if module == TOP[0]:
        return TOP[1]
    matching = [prefix for prefix in LAYERS if module == prefix[0] or module.startswith(prefix[0] + ".")]
    return max(matching, key=lambda prefix: len(prefix[0]))[1] if matching else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> set[frozenset]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), set()

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    assert [module for module in sorted(_modules()) if _layer(module) is None] == []


def test_imports_run_down_the_layers_only():
    graph = _graph()
    upward = {(importer, imported) for importer, imports in graph.items() for imported in imports
              if _layer(imported) > _layer(importer)}
    assert upward == set()


def test_no_modules_import_each_other_in_a_circle():
    assert _circles(_graph()) == set()


# The functions that may import when they run: the app factory (gunicorn's master imports the app's modules,
# never builds the app) and the entry point of `flask db` (Alembic is loaded only when one of its commands runs).
IMPORTING_FUNCTIONS = {"kme.create_app", "kme.operations.schema_cli.make_context"}


def test_imports_are_at_the_top_of_modules_but_in_the_app_factory_and_a_command():
    inside = set()
    for name, path in _modules().items():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(function)):
                inside.add(f"{name}.{function.name}")
    assert inside == IMPORTING_FUNCTIONS
