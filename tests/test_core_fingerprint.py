"""Fingerprints: a stage's identity is its name, config, inputs and declared version; its code is
recorded file by file (the project modules it imports, nothing else)."""

from __future__ import annotations

import pytest

from pipeline import fingerprint
from pipeline.fingerprint import (
    changed_files,
    code_files,
    code_version,
    project_imports,
    project_packages,
    stage_fingerprint,
    stage_version,
)


def _clear_caches():
    fingerprint.project_imports.cache_clear()
    fingerprint.project_packages.cache_clear()
    fingerprint._module_file.cache_clear()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway project tree that fingerprint.py reads instead of the real one."""
    files = {
        "pyproject.toml": '[tool.setuptools.packages.find]\ninclude = ["pipeline*", "stages*"]\n',
        "pipeline/__init__.py": "",
        "pipeline/helper.py": "def helper():\n    return 1\n",
        "pipeline/unrelated.py": "X = 1\n",
        "stages/__init__.py": "",
        "stages/foo.py": "VERSION = 3\nimport json\n\nfrom pipeline import helper\n\ndef f():\n    from . import sibling\n",
        "stages/sibling.py": "from .deep import thing\n",
        "stages/deep.py": "thing = 1\n",
        "stages/other.py": "import numpy\nfrom pipeline import (  # a comment\n    helper,\n)\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(fingerprint, "PROJECT_ROOT", tmp_path)
    _clear_caches()
    yield tmp_path
    _clear_caches()  # the caches hold paths of this tree: drop them before the real tree is used


def test_project_imports_follow_absolute_and_relative_imports(project):
    assert project_imports("stages.foo") == {
        "stages.foo",
        "pipeline",
        "pipeline.helper",
        "stages",
        "stages.sibling",
        "stages.deep",
    }
    # third-party imports are not followed; a parenthesised import with a comment is read
    assert project_imports("stages.other") == {"stages.other", "pipeline", "pipeline.helper"}


def test_project_packages_are_the_ones_pyproject_ships(project):
    assert project_packages() == ("pipeline", "stages")
    (project / "extra").mkdir()
    (project / "extra" / "lib.py").write_text("X = 1\n")
    (project / "stages" / "uses_extra.py").write_text("from extra import lib\n")
    assert project_imports("stages.uses_extra") == {"stages.uses_extra"}  # not shipped, not hashed
    (project / "pyproject.toml").write_text(
        '[tool.setuptools.packages.find]\ninclude = ["pipeline*", "stages*", "extra*"]\n'
    )
    _clear_caches()
    assert "extra.lib" in project_imports("stages.uses_extra")


def test_the_real_package_list_covers_every_package_with_code():
    """A top-level folder of importable project code that pyproject does not ship would be left
    out of the code record: every one is listed."""
    shipped = set(project_packages())
    root = fingerprint.PROJECT_ROOT
    packages = {p.parent.name for p in root.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= shipped, f"add {sorted(packages - shipped)} to pyproject's packages.find include"


def test_stage_version_is_read_from_the_module_without_importing_it(project):
    assert stage_version("stages.foo") == 3
    with pytest.raises(ValueError, match=r"stages/deep.py: a stage module declares `VERSION = <int>`"):
        stage_version("stages.deep")


def test_code_files_name_the_files_that_changed(project):
    before = code_files("stages.foo")
    assert set(before) == {
        "stages/foo.py", "pipeline/__init__.py", "pipeline/helper.py", "stages/__init__.py",
        "stages/sibling.py", "stages/deep.py",
    }  # fmt: skip
    (project / "stages" / "deep.py").write_text("thing = 1  # a comment\n")
    assert changed_files(before, code_files("stages.foo")) == ["stages/deep.py"]


def test_code_version_changes_with_an_imported_module_only(project):
    before = code_version("stages.foo")
    assert code_version("stages.foo") == before  # stable

    (project / "pipeline" / "unrelated.py").write_text("X = 2\n")
    (project / "stages" / "other.py").write_text("import numpy  # edited\n")
    assert code_version("stages.foo") == before

    (project / "stages" / "deep.py").write_text("thing = 2\n")  # imported through a relative import
    after_deep = code_version("stages.foo")
    assert after_deep != before

    (project / "pipeline" / "helper.py").write_text("def helper():\n    return 2\n")
    assert code_version("stages.foo") not in (before, after_deep)


def test_real_stage_modules_include_the_pipeline_modules_they_use():
    toy = project_imports("tests.toy_stages")
    assert {"tests.toy_stages", "pipeline.config", "pipeline.configlib", "pipeline.dag"} <= toy
    assert {"pipeline.context", "pipeline.artifacts"} <= toy  # reached through pipeline.dag
    assert "pipeline.runner" not in toy
    assert {"pipeline.execute", "pipeline.plan", "pipeline.artifacts"} <= project_imports("pipeline.runner")


def test_code_version_is_stable_across_calls_and_cache_clears():
    first = code_version("tests.toy_stages")
    _clear_caches()
    assert code_version("tests.toy_stages") == first
    assert len(first) == 16


def test_stage_fingerprint_depends_on_name_config_inputs_and_version():
    base = stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, 1)
    assert base == stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, 1)
    others = {
        stage_fingerprint("c", {"b": {"value": 1}}, {"a": "f00"}, 1),
        stage_fingerprint("b", {"b": {"value": 2}}, {"a": "f00"}, 1),
        stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f01"}, 1),
        stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, 2),
    }
    assert base not in others and len(others) == 4
