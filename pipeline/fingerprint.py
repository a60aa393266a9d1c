"""Fingerprints: what decides whether a stage's artifact can be reused.

fingerprint = hash(stage name, the config sections it reads minus budget keys, its inputs'
fingerprints, its code version). The code version hashes the source of the stage module and of
every project module it imports, found by reading `import` statements (no module is imported here,
so planning a run costs milliseconds, not the seconds `import torch` takes).
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "stages", "data_prep")


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def stage_fingerprint(stage: str, config: dict, inputs: dict[str, str], code: str) -> str:
    return digest({"stage": stage, "config": config, "inputs": inputs, "code": code})[:16]


def code_version(module: str) -> str:
    """Hash of `module`'s source and of every project module it imports, transitively."""
    h = hashlib.sha256()
    for name in sorted(project_imports(module)):
        path = _module_file(name)
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@cache
def project_imports(module: str) -> frozenset[str]:
    """`module` and all project modules reachable from its imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(_direct_imports(name))
    return frozenset(seen)


def _direct_imports(module: str) -> list[str]:
    path = _module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append(base)
            found.extend(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return [m for m in found if m.split(".")[0] in PROJECT_PACKAGES]


@cache
def _module_file(module: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None
