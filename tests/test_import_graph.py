"""The layers import one way: no cycles in `api`, and no HTTP or database below the edge."""

from __future__ import annotations

import ast
from pathlib import Path

API = Path(__file__).resolve().parent.parent / "api"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(API.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, TYPE_CHECKING blocks included (a cycle there is one too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in API.rglob("*.py")}
    return {
        name: {target for target in _imports(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_api_has_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _all_imports(package: str) -> dict[str, set[str]]:
    root = API.parent.joinpath(*package.split("."))
    paths = [root.with_suffix(".py")] if root.with_suffix(".py").exists() else root.rglob("*.py")
    return {_module_name(path): _imports(path, _module_name(path)) for path in paths}


def _offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        module: sorted(i for i in imports if i.startswith(forbidden))
        for module, imports in _all_imports(package).items()
        if any(i.startswith(forbidden) for i in imports)
    }


def test_redis_core_takes_plain_values() -> None:
    """No request, no token decoding, no database, no app state below the edge."""
    forbidden = (
        "fastapi",
        "starlette",
        "api.state",
        "api.database",
        "api.dependencies",
        "api.helpers.auth",
        "api.routers",
    )
    assert _offenders("api.redis_core", forbidden) == {}


def test_the_token_module_imports_no_database_and_no_request() -> None:
    forbidden = ("api.database", "api.state", "fastapi", "starlette", "sqlalchemy")
    assert _offenders("api.helpers.auth", forbidden) == {}


def test_the_reported_cycle_is_gone() -> None:
    """database/connection -> state -> redis_core/rate_limiter -> helpers/auth -> database."""
    graph = _graph()
    assert "api.database.connection" not in _reachable(graph, "api.helpers.auth")
    assert "api.state" not in _reachable(graph, "api.redis_core.rate_limiter")


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen
