"""W&B tracking, offline: the toy DAG's runs are read back from W&B's own `.wandb` record logs.

The pipeline runs in a subprocess with its own Ray instance, so its stage workers see the
WANDB_API_KEY of the environment the way a user's would (Ray workers inherit the environment of
the Ray instance, not later changes to the test process's).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT

SECRET = "kiln-test-secret-0123456789"

DRIVER = """
import json, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
         _node_ip_address="127.0.0.1")
from pipeline.artifacts import ArtifactStore
from pipeline.plan import Selection, make_plan
from pipeline.runner import run_pipeline
from tests.toy_stages import TOY_DAG, toy_config

cfg = toy_config(sys.argv[1], "run.wandb=offline", name="wb")
sel = Selection(until="b")
outcome = run_pipeline(cfg, TOY_DAG, sel)
plan = make_plan(cfg, TOY_DAG, ArtifactStore(cfg.run.root, cfg.run.name), sel)
print("RESULT " + json.dumps({
    "ok": outcome.ok, "errors": outcome.errors,
    "fingerprints": {p.name: p.fingerprint for p in plan},
    "work_dirs": {p.name: str(ArtifactStore(cfg.run.root, cfg.run.name).work_dir(p.name, p.work_key))
                  for p in plan},
}))
ray.shutdown()
"""

# LevelDB log format as W&B writes it: a 7-byte file header (":W&B", magic 0xBEE1, version),
# then 32 KiB blocks of records, each with a 7-byte header: crc32 (of type + data), length, type.
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B record log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's trailer: too short for a header
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def summarise(records) -> dict:
    """The run record, its config (run record + config updates), history rows and artifacts."""
    out = {"run": None, "config": {}, "history": [], "artifacts": []}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            items = r.run.config.update
        elif kind == "config":
            items = r.config.update
        else:
            items = []
        for item in items:
            key = item.key or ".".join(item.nested_key)
            out["config"][key] = json.loads(item.value_json)
        if kind == "history":
            out["history"].append(
                {
                    item.key or ".".join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item
                }
            )
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
    return out


@pytest.mark.timeout(240)
def test_offline_wandb_runs_record_stage_metrics_artifacts_and_lineage(tmp_path):
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_ADDRESS"))}
    home = tmp_path / "wandb-home"  # W&B's own caches and settings, away from the user's
    env.update(
        WANDB_API_KEY=SECRET,
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(root)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["ok"], result["errors"]
    fps = result["fingerprints"]

    # the key is in every stage's environment, and in no file the run wrote
    for stage in "ab":
        [start] = [
            json.loads(x) for x in Path(result["work_dirs"][stage], "events.jsonl").open() if "start" in x
        ]
        assert start["wandb_key_set"] is True
    leaked = [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the W&B key was written to {leaked}"
    assert SECRET not in proc.stdout + proc.stderr

    logs = sorted((root / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2, logs
    runs = {}
    for path in logs:
        s = summarise(read_records(path))
        assert s["run"] is not None, f"{path} has no run record"
        runs[s["run"].job_type] = s
    assert set(runs) == {"a", "b"}  # job_type = stage

    for stage, s in runs.items():
        run = s["run"]
        assert run.run_group == "wb"  # group = pipeline run
        assert run.display_name == f"wb/{stage}"
        assert run.project == "kiln"
        kiln = s["config"]["kiln"]
        assert kiln["stage"] == stage and kiln["fingerprint"] == fps[stage]
        assert s["config"][stage]["value"] == 1  # the stage's config section
        rows = [h for h in s["history"] if "loss" in h]
        assert [(h["step"], h["loss"]) for h in rows] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        [art] = s["artifacts"]
        assert art.name == f"wb-{stage}" and art.type == stage
        assert fps[stage] in art.aliases
        assert json.loads(art.metadata)["fingerprint"] == fps[stage]
        refs = [c.ref for c in art.manifest.contents]
        assert refs and all(r.startswith(f"file://{root.resolve()}/wb/{stage}-{fps[stage]}/") for r in refs)

    # offline, the downstream run records its inputs' artifact names and digests in its config
    assert runs["a"]["config"]["kiln"]["inputs"] == {}
    assert runs["b"]["config"]["kiln"]["inputs"] == {
        "a": {"artifact": f"wb-a:{fps['a']}", "digest": fps["a"]}
    }

    # the run id is kept with the stage's work and in its manifest (a resumed stage continues it)
    manifest = json.loads((root / "wb" / f"b-{fps['b']}" / "manifest.json").read_text())
    assert manifest["wandb_run_id"] == runs["b"]["run"].run_id
