"""Security of local runs and of `submit`: what a local Ray listens on, how the Jobs API client
authenticates, and that `submit` refuses what a cluster could not use (checked before any upload)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from pipeline.config import PROJECT_ROOT, load_config

PROBE = r"""
import json, os, re, subprocess, sys
from pipeline.runner import _init_ray
ray = _init_ray(None)                      # exactly what `launch.py run` does without --address

@ray.remote(num_cpus=1)
def task():
    return os.getpid()

ray.get(task.remote())                     # a worker is up too
marker = os.environ["KILN_PROBE"].encode()
mine = set()
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if b"KILN_PROBE=" + marker in f.read():
                    mine.add(int(d))
        except OSError:
            pass
listening = []
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    if pids & mine:
        name = re.search(r'\(\("([^"]+)"', line)
        listening.append([line.split()[3], name.group(1) if name else "?"])
print("LISTENING " + json.dumps(listening))
ray.shutdown()
"""


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
def test_a_local_run_listens_on_loopback_only():
    """GCS, raylet, dashboard agent, runtime-env agent, workers: every listening socket of the
    local Ray that the runner starts is bound to 127.0.0.1 (Ray alone would bind its GCS and raylet
    to all interfaces and its agents to the machine's address). There is no dashboard or Jobs API."""
    ray_tmp = tempfile.mkdtemp(prefix="kp-", dir="/tmp")
    env = {**os.environ, "KILN_PROBE": os.path.basename(ray_tmp), "RAY_TMPDIR": ray_tmp}
    for k in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(k, None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("LISTENING ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    listening = json.loads(line.removeprefix("LISTENING "))
    names = {name for _, name in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    exposed = [(addr, name) for addr, name in listening if not _loopback(addr)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("*", "0.0.0.0", "::"):
        return False
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _submit_args(**kw):
    ns = argparse.Namespace(
        config=None, set=[], root=None, name=None, only=None, start=None, until=None, wandb=None,
        rebuild_changed=False, address="http://127.0.0.1:9", python="python", no_wait=False,
    )  # fmt: skip
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_submit_refuses_roots_and_configs_a_cluster_cannot_use(tmp_path):
    from pipeline.submit import SubmitError, entrypoint

    with pytest.raises(SubmitError, match="s3://bucket/prefix or an absolute path"):
        entrypoint(_submit_args(), load_config())  # the default root `runs` is relative
    outside = tmp_path / "mine.yaml"
    outside.write_text("run: {name: mine}\n")
    with pytest.raises(SubmitError, match="inside the project"):
        entrypoint(_submit_args(config=str(outside)), load_config(outside, ["run.root=s3://b/p"]))

    args = _submit_args(set=["pretrain.steps=3"], until="tokenize", wandb="offline", rebuild_changed=True)
    cmd = entrypoint(args, load_config(None, ["pretrain.steps=3", "run.root=s3://b/p"]))
    assert cmd == (
        "python launch.py run configs/tiny.yaml --set pretrain.steps=3 --root s3://b/p --name tiny "
        "--until tokenize --wandb offline --rebuild-changed --address auto"
    )
    # the CLI: a config error or an unknown stage fails before any connection (port 9 is closed)
    for extra, expected in (
        (["--set", "pretrain.stepz=3"], "pretrain.stepz"),
        (["--until", "pretrian"], "unknown stage"),
        (["--root", "runs"], "s3://bucket/prefix"),
    ):
        out = subprocess.run(
            [sys.executable, "launch.py", "submit", "--address", "http://127.0.0.1:9", "--root", "s3://b/p", *extra],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert expected in " ".join(out.stderr.split()), out.stderr


def test_submit_authenticates_with_rays_token_and_ships_no_secret(tmp_path, monkeypatch):
    from pipeline.submit import EXCLUDES, auth_headers, runtime_env

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_headers() == {"Authorization": "Bearer from-home"}
    token_file = tmp_path / "token"
    token_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-aws-secret-for-the-test")
    monkeypatch.setenv("WANDB_API_KEY", "fake-wandb-key-for-the-test")
    env = json.dumps(runtime_env())
    assert "fake-aws-secret" not in env and "fake-wandb-key" not in env
    for needed in ("runs/", ".venv/", "wandb/", "__pycache__/"):
        assert needed in EXCLUDES


def test_no_credential_in_the_cluster_recipes():
    for path in (PROJECT_ROOT / "cluster").iterdir():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert not re.search(
            r"(?i)(wandb_api_key|aws_secret_access_key|auth_token)\s*[=:]\s*['\"]?\w{16,}", text
        ), path
