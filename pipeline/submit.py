"""`launch.py submit`: run the pipeline as a Ray job on a running cluster, through the Jobs API.

    python launch.py submit configs/multinode-moe.yaml --address http://HEAD:8265 \
        --root s3://bucket/kiln --until pretrain

The project folder travels as the job's working directory (runs/, virtual environments, W&B
folders and caches left out); the job's driver runs `python launch.py run ... --address auto` on the
head, which joins the cluster it runs on. The config is checked here first, so a typo fails before
anything is uploaded. The job id is printed, its logs are streamed until it ends, and the exit code
is the job driver's. Ctrl-C stops the streaming only; the job goes on (`ray job logs -f ID`,
`ray job stop ID`). `launch.py status --root ...` reads the same shared root from anywhere.

Authentication: Ray 2.60 clusters require a token (on by default). It is read from RAY_AUTH_TOKEN,
the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and sent as `Authorization: Bearer`.
Secrets (S3 keys, WANDB_API_KEY) are never put in the job's runtime environment, which the Jobs API
shows to anyone who can list jobs: the cluster's nodes get them from their own environment
(instance roles, Kubernetes secrets, the batch system); see cluster/README.md.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT
from pipeline.files import is_remote

EXCLUDES = [
    "runs/", ".venv/", "venv/", "wandb/", ".git/", ".whl/", ".gpu/", "build/", "*.egg-info/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".cache/", ".mypy_cache/", "*.log",
]  # fmt: skip
"""Left out of the uploaded working directory (gitignore syntax; .gitignore is honoured too)."""


class SubmitError(ValueError):
    pass


def auth_headers() -> dict[str, str]:
    """The Jobs API's `Authorization` header from Ray's usual token places (none if disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token:
        for candidate in filter(None, [path, str(Path.home() / ".ray" / "auth_token")]):
            try:
                token = Path(candidate).read_text().strip()
                break
            except OSError:
                if candidate == path:
                    raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def entrypoint(args, cfg, python: str = "python") -> str:
    """The job's command: the same run, on the cluster it is started on."""
    config = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    try:
        rel = config.relative_to(PROJECT_ROOT)
    except ValueError:
        raise SubmitError(
            f"{args.config}: the config must be inside the project ({PROJECT_ROOT}), which is what "
            "travels to the cluster; copy it into configs/"
        ) from None
    root = cfg.run.root
    if not is_remote(root) and not Path(root.removeprefix("file://")).is_absolute():
        raise SubmitError(
            f"--root {root}: a job needs a root every node and this machine can reach, not a folder "
            "inside its temporary working directory: use s3://bucket/prefix or an absolute path on a "
            "shared filesystem"
        )
    cmd = [python, "launch.py", "run", rel.as_posix()]
    for kv in args.set:
        cmd += ["--set", kv]
    cmd += ["--root", root, "--name", cfg.run.name]
    for flag, value in (("--only", args.only), ("--from", args.start), ("--until", args.until)):
        if value:
            cmd += [flag, value]
    if args.wandb:
        cmd += ["--wandb", args.wandb]
    if getattr(args, "rebuild_changed", False):
        cmd += ["--rebuild-changed"]
    cmd += ["--address", "auto"]
    return shlex.join(cmd)


def runtime_env() -> dict:
    return {
        "working_dir": str(PROJECT_ROOT),
        "excludes": list(EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def submit(args, cfg, out=sys.stdout, err=sys.stderr) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    command = entrypoint(args, cfg, python=args.python)  # refuses what the cluster could not run
    address = args.address if "://" in args.address else f"http://{args.address}"
    client = JobSubmissionClient(address, headers=auth_headers())
    job_id = f"kiln-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client.submit_job(
        entrypoint=command,
        submission_id=job_id,
        runtime_env=runtime_env(),
        metadata={"kiln_run": cfg.run.name, "kiln_root": cfg.run.root},
    )
    print(f"job: {job_id}", file=out, flush=True)
    print(f"entrypoint: {command}", file=err, flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs -f --address {address} {job_id}", file=err)
        return 0
    try:
        asyncio.run(_stream(client, job_id, out))
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job goes on. `ray job logs -f --address {address} {job_id}` "
            f"follows it again, `ray job stop --address {address} {job_id}` stops it",
            file=err,
        )
        return 130
    deadline = time.time() + 60  # the log stream ends as the job does; its status may lag behind
    while (status := client.get_job_status(job_id)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ) and time.time() < deadline:
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        code = 0 if status == JobStatus.SUCCEEDED else 1
    print(f"job {job_id}: {status.value} (exit code {code})", file=err)
    if status == JobStatus.FAILED and info.message:
        print(info.message, file=err)
    return code


async def _stream(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
