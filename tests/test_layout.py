"""The layout keeps its promises: no module reaches into another's private names, and nothing cites
a file outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess

from pipeline.config import PROJECT_ROOT
from pipeline.fingerprint import project_packages

FIRST_PARTY = {*project_packages(), "bench", "tests"}


def _sources(include_tests: bool = False):
    for path in sorted(PROJECT_ROOT.rglob("*.py")):
        rel = path.relative_to(PROJECT_ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] == "build":
            continue
        if rel.parts[0] == "tests" and not include_tests:
            continue
        yield rel, path.read_text()


def _private_uses(tree: ast.AST) -> list[str]:
    """`from project.mod import _name`, and `mod._name` where `mod` names an imported project module."""
    modules: set[str] = set()  # local names bound to project modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FIRST_PARTY:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FIRST_PARTY:
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    offenders = {
        str(rel): uses for rel, text in _sources() if (uses := _private_uses(ast.parse(text, str(rel))))
    }
    assert offenders == {}, "make these public where they belong, or move them:\n" + "\n".join(
        f"{f}: {u}" for f, uses in offenders.items() for u in uses
    )


def test_the_private_name_check_can_fail():
    tree = ast.parse("from stages.ppo import _engine\nfrom stages import ppo as S\nS._frozen(1)\n")
    assert _private_uses(tree) == ["line 1: from stages.ppo import _engine", "line 3: S._frozen"]


def _top_level_imports(rel, text) -> set[str]:
    """Project modules a module imports when it is imported (module-level statements only)."""
    package = ".".join(rel.with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in FIRST_PARTY}


def test_no_import_cycles():
    modules = {
        ".".join(rel.with_suffix("").parts).removesuffix(".__init__"): (rel, text) for rel, text in _sources()
    }
    graph = {m: {d for d in _top_level_imports(*rt) if d in modules and d != m} for m, rt in modules.items()}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_file_cites_a_file_outside_the_repository():
    """The project stands on its own: facts the code relies on are stated where they are used."""
    outside = re.compile(r"\.\./shared|\b(DESIGN|STYLE|ENVIRONMENT)\.md\b")
    tracked = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    texts = [
        f
        for f in tracked
        if (PROJECT_ROOT / f).is_file() and (PROJECT_ROOT / f).suffix not in (".zst", ".gz")
    ]
    cited = [f for f in texts if outside.search((PROJECT_ROOT / f).read_text())]
    assert cited == []
