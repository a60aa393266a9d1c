"""Fingerprints: a stage's code version follows the project modules it imports, nothing else."""

from __future__ import annotations

import pytest

from pipeline import fingerprint
from pipeline.fingerprint import code_version, project_imports, stage_fingerprint


def _clear_caches():
    fingerprint.project_imports.cache_clear()
    fingerprint._module_file.cache_clear()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throwaway project tree that fingerprint.py reads instead of the real one."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/helper.py": "def helper():\n    return 1\n",
        "pipeline/unrelated.py": "X = 1\n",
        "stages/__init__.py": "",
        "stages/foo.py": "import json\n\nfrom pipeline import helper\n\nfrom . import sibling\n",
        "stages/sibling.py": "from .deep import thing\n",
        "stages/deep.py": "thing = 1\n",
        "stages/other.py": "import numpy\n",
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
    assert project_imports("stages.other") == {"stages.other"}  # third-party imports are not followed


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


def test_stage_fingerprint_depends_on_name_config_inputs_and_code():
    base = stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, "c0de")
    assert base == stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, "c0de")
    others = {
        stage_fingerprint("c", {"b": {"value": 1}}, {"a": "f00"}, "c0de"),
        stage_fingerprint("b", {"b": {"value": 2}}, {"a": "f00"}, "c0de"),
        stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f01"}, "c0de"),
        stage_fingerprint("b", {"b": {"value": 1}}, {"a": "f00"}, "c0df"),
    }
    assert base not in others and len(others) == 4
