"""The package's layout: no import cycle between its modules, no module over 700 lines, one command table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "larimar"
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions (both can close a loop)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import larimar.x.y` names a module; keep the longest known prefix
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("larimar"):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_detects_a_loop() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph(_modules())
    assert graph["larimar.cli.main"], "the import graph found no edges: the parser is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("lower, upper", [
    ("larimar.memory", "larimar.model"),  # the memory knows nothing of models
    ("larimar.model", "larimar.editor"),
    ("larimar.editor", "larimar.eval"),
    ("larimar.editor", "larimar.serving"),
    ("larimar.eval", "larimar.cli"),
    ("larimar.serving", "larimar.cli"),
])
def test_data_flows_one_way(lower: str, upper: str) -> None:
    graph = import_graph(_modules())
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith(lower) for t in ts if t.startswith(upper))
    assert not bad, f"{lower} imports {upper}: {bad}"


def test_no_module_over_700_lines() -> None:
    sizes = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in _modules().items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}


def test_one_command_table() -> None:
    from larimar.cli.main import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    evals = next(a for a in sub.choices["eval"]._actions if a.dest == "eval_what")
    assert set(evals.choices) == {"counterfact", "zsre", "scope", "reconstruct", "facts", "sequential", "capacity",
                                  "forget", "leakage", "longcontext"}
