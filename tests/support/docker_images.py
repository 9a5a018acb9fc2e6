"""Docker for the container tests: the daemon, a local base image, the project's image, containers.

No registry is reachable here, so the stand-in for `python:3.11-slim` is built from Debian
packages (`debootstrap --variant=minbase bookworm` + Python 3.11) and `docker import`ed once; it is
reused by tag on later runs. Containers use the host network, so all traffic stays on 127.0.0.1,
and each is removed by id afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from digitflow import paths

REPO_ROOT = paths.PACKAGE_DIR.parents[1]
BASE_TAG = "digitflow-test-base:bookworm-py311"
IMAGE_TAG = "digitflow:test"  # the slim image (`make image`)
IMAGE_FULL_TAG = "digitflow:test-full"  # with torch and full MLflow (`make image-full`)
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"]
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
DOCKERD_LOG = Path(tempfile.gettempdir()) / "digitflow-test-dockerd.log"


def run(command: Sequence[str], timeout: float = 600, check: bool = True, **kwargs: object) -> str:
    """Run a command and return its stdout; on failure raise with its output."""
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def docker_available() -> bool:
    """True when the `docker` client can reach a daemon."""
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


@contextlib.contextmanager
def docker_daemon() -> Iterator[None]:
    """A reachable Docker daemon: the running one, else `dockerd` started here (and stopped by
    PID afterwards), its data under /var/lib/docker so images survive between runs."""
    if docker_available():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("no Docker daemon and no dockerd: install docker.io (see .ci/run)")
    with DOCKERD_LOG.open("wb") as log:
        process = subprocess.Popen(
            [dockerd, "--data-root", "/var/lib/docker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not docker_available():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{DOCKERD_LOG.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.poll() is None:
            process.kill()
            process.wait()


def image_exists(tag: str) -> bool:
    """True when the daemon has an image with this tag."""
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return result.returncode == 0


def ensure_base_image(tag: str = BASE_TAG) -> str:
    """The Debian bookworm + Python 3.11 stand-in for python:3.11-slim (built once, then reused)."""
    if image_exists(tag):
        return tag
    rootfs = Path(tempfile.mkdtemp(prefix="digitflow-rootfs-"))
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            timeout=1800,
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(
            [
                "docker",
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "-",
                tag,
            ],
            stdin=tar.stdout,
        )
        tar.wait()
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


def build_image(tag: str, base_image: str) -> str:
    """`make image` (the slim image) with the given tag and base image: the command a user runs."""
    run(["make", "-C", str(REPO_ROOT), "image", f"IMAGE={tag}", f"BASE_IMAGE={base_image}"], 1800)
    return tag


def build_image_full(tag: str, base_image: str) -> str:
    """`make image-full` (torch and full MLflow too) with the given tag and base image."""
    command = ["make", "-C", str(REPO_ROOT), "image-full", f"IMAGE_FULL={tag}"]
    run([*command, f"BASE_IMAGE={base_image}"], 1800)
    return tag


def image_size(tag: str) -> int:
    """The image's size in bytes, as `docker image inspect` reports it."""
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).strip())


def inspect(name: str) -> dict[str, object]:
    """`docker inspect` of one image or container."""
    data = json.loads(run(["docker", "inspect", name]))
    assert isinstance(data, list) and len(data) == 1
    item = data[0]
    assert isinstance(item, dict)
    return item


@dataclass
class Container:
    """A started container, known by its id."""

    id: str

    def logs(self) -> str:
        result = subprocess.run(
            ["docker", "logs", self.id], capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr

    def state(self) -> dict[str, object]:
        state = inspect(self.id)["State"]
        assert isinstance(state, dict)
        return state

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def wait(self, timeout: float = 120) -> int:
        """Wait for the container to exit; its exit code."""
        return int(run(["docker", "wait", self.id], timeout=timeout).strip())

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.id], capture_output=True, check=False)


def start_container(
    image: str,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
) -> Container:
    """`docker run -d --network host` with the given environment and extra options."""
    env_args = [item for key, value in (env or {}).items() for item in ("-e", f"{key}={value}")]
    command = ["docker", "run", "-d", "--network", "host", *env_args, *options, image, *args]
    return Container(run(command).strip())


@contextlib.contextmanager
def container(
    image: str,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
) -> Iterator[Container]:
    """A container removed (by id) when the block ends."""
    started = start_container(image, args, env, options)
    try:
        yield started
    finally:
        started.remove()


# How Kubernetes runs the image (deploy/k8s/deployment.yaml's securityContext), said to docker.
RESTRICTED = [
    "--read-only",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,size=256m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]
