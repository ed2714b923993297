"""The source layout a newcomer can carry on: data flows one way (no module imports one that imports it back), no
function over 60 lines, no class over 250 (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softprompt"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """softprompt modules `name` imports anywhere, deferred imports included; `if TYPE_CHECKING:` blocks are not
    run, so they do not count."""
    package = name if name in {"softprompt", "softprompt.serve"} else name.rsplit(".", 1)[0]
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in known and candidate != name}
    return found - {"softprompt"}


def test_runtime_imports_resolve_relative_imports():
    tree = ast.parse("from .backbone import A\nfrom . import routes\nfrom ..bank import B\n"
                     "if TYPE_CHECKING:\n    from .causal import C\n")
    known = {"softprompt.backbone", "softprompt.routes", "softprompt.bank", "softprompt.causal"}
    assert runtime_imports("softprompt.train", tree, known) == {"softprompt.backbone", "softprompt.routes"}
    assert runtime_imports("softprompt.serve.app", tree, known) == {"softprompt.bank"}


def test_no_module_imports_one_that_imports_it_back():
    trees = sources()
    graph = {name: runtime_imports(name, tree, set(trees)) for name, tree in trees.items()}
    assert graph["softprompt.causal"] >= {"softprompt.backbone", "softprompt.routes"}  # the walk sees imports

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo += graph.get(current, ())
        return False

    # the package's __init__ imports the public API on purpose; no module inside imports the package itself
    cycles = [(name, imported) for name, imports in graph.items() if name != "softprompt"
              for imported in imports if imported != "softprompt" and reaches(imported, name)]
    assert cycles == []


def definitions(kind: type) -> list[tuple[str, int]]:
    return [(f"{name}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
            for name, tree in sources().items() for node in ast.walk(tree) if isinstance(node, kind)]


@pytest.mark.parametrize("kind, limit", [((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES),
                                         (ast.ClassDef, MAX_CLASS_LINES)])
def test_functions_and_classes_stay_short(kind, limit):
    found = definitions(kind)
    assert len(found) > 20  # the walk sees the package
    assert [(where, lines) for where, lines in found if lines > limit] == []


def test_each_module_imports_alone():
    """Each module imported first, in a fresh set of softprompt modules: an import cycle kept alive only by the
    order modules happen to be imported in fails here. In a child process: the re-imports would re-register the
    attention function this process's models use."""
    import subprocess
    import sys

    script = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [loaded for loaded in sys.modules if loaded.startswith("softprompt")]:
        del sys.modules[loaded]
    assert importlib.import_module(name).__name__ == name
print("imported", len(sys.argv) - 1)
"""
    names = sorted(name for name in sources() if name != "softprompt.__main__")  # that one runs the CLI
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"imported {len(names)}"
