"""Shared test fixtures.

`ray_session`: one local Ray instance (2 CPUs, no dashboard) for the whole test session. The
runner's `_init_ray` reuses an initialised Ray, so tests that run the pipeline just ask for it.
"""

from __future__ import annotations

import os

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
