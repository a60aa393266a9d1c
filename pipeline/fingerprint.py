"""Fingerprints: what decides whether a stage's artifact can be reused, and what its code was.

    fingerprint = hash(stage name, the config sections it reads minus placement keys,
                       its inputs' fingerprints, the stage's declared VERSION)

The code is not part of it: a comment in a shared module must not throw away days of pretraining.
Whoever changes what a stage produces bumps `VERSION = N` at the top of the stage's module (README,
"Changing a stage"). The code is still recorded: `code_files` hashes the stage module and every
project module it imports, found by reading `import` statements; the manifest keeps it, and planning
names the files that changed since an artifact was built. Nothing here imports a stage module, so
planning a run costs milliseconds, not the seconds `import torch` takes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tomllib
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def stage_fingerprint(stage: str, config: dict, inputs: dict[str, str], version: int) -> str:
    return digest({"stage": stage, "config": config, "inputs": inputs, "version": version})[:16]


@cache
def project_packages() -> tuple[str, ...]:
    """The project's top-level packages, as pyproject.toml lists them for packaging: one list, so a
    new package is hashed as soon as it is shipped."""
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    return tuple(sorted({pattern.rstrip("*").rstrip(".") for pattern in include}))


def stage_version(module: str) -> int:
    """The `VERSION = N` a stage module declares at its top level (read, not imported)."""
    path = _module_file(module)
    if path is None:
        raise ValueError(f"stage module {module} not found under {PROJECT_ROOT}")
    for node in ast.parse(path.read_text(), str(path)).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["VERSION"]
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) is int
        ):
            return node.value.value
    raise ValueError(
        f"{path.relative_to(PROJECT_ROOT)}: a stage module declares `VERSION = <int>` at its top level "
        "(bump it when what the stage produces changes)"
    )


def code_record(module: str) -> tuple[str, dict[str, str]]:
    """What a stage's manifest records of its code, each file read once: (one hash of `module`'s source
    and of every project module it imports, transitively; {project-relative path: sha256[:16]} of
    each of those files)."""
    h, files = hashlib.sha256(), {}
    for name in sorted(project_imports(module)):
        path = _module_file(name)
        data = path.read_bytes()
        h.update(name.encode() + b"\0" + data + b"\0")
        files[path.relative_to(PROJECT_ROOT).as_posix()] = hashlib.sha256(data).hexdigest()[:16]
    return h.hexdigest()[:16], dict(sorted(files.items()))


def code_version(module: str) -> str:
    return code_record(module)[0]


def code_files(module: str) -> dict[str, str]:
    return code_record(module)[1]


def changed_files(built: dict[str, str], now: dict[str, str]) -> list[str]:
    """Files whose hash differs between two `code_files` records (added and removed ones too)."""
    return sorted(f for f in built.keys() | now.keys() if built.get(f) != now.get(f))


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


_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))", re.M
)
"""Import statements, at any depth (in-function imports too), read as text: a regular expression
finds them in milliseconds where walking the syntax tree of every module took most of a second.
An import that only appears in a docstring counts too, which makes the record more cautious, not less."""


def _direct_imports(module: str) -> list[str]:
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for m in _IMPORT.finditer(path.read_text()):
        base, names, plain = m.groups()
        if plain is not None:
            found.extend(n.split()[0] for n in plain.split(",") if n.strip())
            continue
        if base.startswith("."):  # relative import
            level = len(base) - len(base.lstrip("."))
            parts = package.split(".")
            rest = base[level:]
            base = ".".join(parts[: len(parts) - level + 1] + ([rest] if rest else []))
        found.append(base)
        for n in re.sub(r"#[^\n]*", "", names).strip("() \n").split(","):
            if n.split():
                found.append(f"{base}.{n.split()[0]}")  # `from pkg import module`
    packages = project_packages()
    return [m for m in found if m.split(".")[0] in packages]


@cache
def _module_file(module: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None
