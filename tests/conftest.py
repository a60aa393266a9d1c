"""Shared test fixtures.

`ray_session`: one local Ray instance (2 CPUs, no dashboard) for the whole test session. The
runner's `_init_ray` reuses an initialised Ray, so tests that run the pipeline just ask for it.
"""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.config import PROJECT_ROOT


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once per session: 2 CPUs, dashboard off, on loopback; shut it down at the end."""
    # As the runner does: workers must import the project (stages, tests.toy_stages).
    paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from pipeline.runner import _stay_on_loopback

    _stay_on_loopback()  # as the runner does: otherwise Ray listens on every interface
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to some other cluster on this machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


TINY_OVERRIDES = ("run.wandb=offline",)
"""The session's tiny pipeline runs with W&B offline, as a user without a key would."""


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory):
    """The default pipeline (configs/tiny.yaml), built once per session and reused as the reference
    for resume and re-run tests. Returns (root, cfg, outcome)."""
    from pipeline.config import load_config
    from pipeline.dag import PIPELINE
    from pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(overrides=[f"run.root={root}", *TINY_OVERRIDES])
    outcome = run_pipeline(cfg, PIPELINE)
    assert outcome.ok, f"the tiny pipeline failed: {outcome.errors} {outcome.blocked}"
    return root, cfg, outcome


SHORT_PRETRAIN = ("pretrain.steps=60", "pretrain.checkpoint_every=20", "pretrain.eval_every=20")
"""Pretraining cut short for the tests that kill it and compare with an uninterrupted run: the
preset's data, model and workers, three checkpoints. (`steps` shapes the learning-rate schedule, so
the session's 200-step run cannot be the reference of a 60-step one.)"""


@pytest.fixture(scope="session")
def short_pretrain(tiny_run, tmp_path_factory):
    """Pretraining with SHORT_PRETRAIN, uninterrupted, on the session run's data artifacts: the
    reference of the pretrain kill tests. Returns (root, cfg, outcome) as `tiny_run` does."""
    from pipeline.config import load_config
    from pipeline.dag import PIPELINE
    from pipeline.plan import Selection
    from pipeline.runner import run_pipeline
    from tests.pipeline_helpers import copy_upstream

    root = tmp_path_factory.mktemp("short-pretrain")
    cfg = load_config(overrides=[f"run.root={root}", "run.wandb=disabled", *SHORT_PRETRAIN])
    copy_upstream(tiny_run[1], cfg, ("ingest", "tokenizer", "tokenize"))
    outcome = run_pipeline(cfg, PIPELINE, Selection(until="pretrain"))
    assert outcome.ok, f"the short pretraining run failed: {outcome.errors} {outcome.blocked}"
    assert [p.name for p in outcome.plan if p.action == "run"] == ["pretrain"]
    return root, cfg, outcome


@pytest.fixture(scope="session")
def template(tmp_path_factory, ray_session):
    """Root of a complete run of the toy DAG (tests/toy_stages.py, name "toy"), made once per session."""
    from pipeline.runner import run_pipeline
    from tests.toy_stages import TOY_DAG, toy_config

    root = tmp_path_factory.mktemp("template")
    outcome = run_pipeline(toy_config(root), TOY_DAG)
    assert outcome.ok, outcome.errors
    assert set(outcome.results) == {"a", "b", "c", "d"}
    return root


@pytest.fixture
def done(template, tmp_path):
    """A private copy of the complete run: (root, cfg, store, plan)."""
    from pipeline.artifacts import ArtifactStore
    from tests.toy_stages import plan_of, toy_config

    shutil.copytree(template / "toy", tmp_path / "toy")
    cfg = toy_config(tmp_path)
    return tmp_path, cfg, ArtifactStore(str(tmp_path), "toy"), plan_of(cfg)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the runner starts Ray (a run with nothing to do never should)."""
    from pipeline import runner

    def refuse(address):
        raise AssertionError("Ray was started although nothing had to run")

    monkeypatch.setattr(runner, "_init_ray", refuse)
