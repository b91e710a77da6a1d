"""No import cycles inside rome_fast, counting imports inside functions too (a late import hides a
cycle from the interpreter, not from a reader): the package's modules form layers
(docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rome_fast"
# cycles another change is removing; each entry must still be a cycle (or be deleted from here)
PENDING: list[set] = []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _init_names(package: str) -> set[str]:
    """Names a package's __init__ defines or imports at its top level."""
    path = PACKAGE.parent / Path(*package.split(".")) / "__init__.py"
    names = set()
    for node in ast.parse(path.read_text()).body if path.is_file() else ():
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _target(base: str, name: str) -> str | None:
    """What `from base import name` imports: the submodule base.name, else the package base when
    its __init__ defines the name, else nothing we can see (a compiled submodule such as _C)."""
    if _is_module(f"{base}.{name}"):
        return f"{base}.{name}"
    if _is_module(base) and (PACKAGE.parent / Path(*base.split(".")) / "__init__.py").is_file():
        return base if name in _init_names(base) else None
    return base


def _runtime_imports(tree: ast.AST):
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:` (read by type
    checkers only, never run)."""
    if isinstance(tree, (ast.Import, ast.ImportFrom)):
        yield tree
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                yield from _runtime_imports(other)
            continue
        yield from _runtime_imports(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the rome_fast modules it imports anywhere in its text."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [_target(base, a.name) for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t and t.split(".")[0] == "rome_fast" and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    graph = import_graph()
    assert "rome_fast.models.base" in graph["rome_fast.models.llama"]
    assert "rome_fast.hooks" in graph["rome_fast.trace.engine"]
    typing_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import rome_fast.x\nimport rome_fast.y")
    assert [n.names[0].name for n in _runtime_imports(typing_only)] == ["TYPE_CHECKING", "rome_fast.y"]


def test_no_import_cycles():
    graph = import_graph()
    for pending in PENDING:
        assert any(pending <= c for c in cycles(graph)), f"{sorted(pending)} is no longer a cycle: remove it from PENDING"
        for a in pending:  # set the pending cycle aside: its own edges only
            graph[a] -= pending
    found = cycles(graph)
    assert not found, f"import cycles: {[sorted(c) for c in found]}"
