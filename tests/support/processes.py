"""Starting and stopping real server processes for tests: free ports, readiness, stop by PID."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, below: int = 55000) -> list[int]:
    """`count` distinct free ports, each below `below` (SeaweedFS adds 10000 for gRPC)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port < below and port not in ports:
            ports.append(port)
    return ports


def free_port_block(count: int, low: int = 20000, high: int = 32000) -> list[int]:
    """`count` consecutive ports that are free now, from below the kernel's ephemeral range so
    that outgoing connections do not take them meanwhile (Ray wants a worker port range that no
    other of its listeners falls in)."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(low, high - count)
        block = list(range(start, start + count))
        if all(_is_free(port) for port in block):
            return block
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class ServerProcess:
    """A started server: its process, log file and base URL."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None


def start_process(
    command: Sequence[str],
    log_path: Path,
    url: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start `command` in its own process group with output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("wb")
    process = subprocess.Popen(
        list(command),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    handle.close()
    return ServerProcess(process=process, log_path=log_path, url=url)


def wait_for_http(server: ServerProcess, path: str = "/", timeout: float = 60.0) -> None:
    """Poll `server.url + path` until it answers any HTTP status; fail with the log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"{server.url}{path} did not answer within {timeout} s:\n{server.log()}")


def stop_process(server: ServerProcess, timeout: float = 15.0) -> None:
    """SIGTERM the process group by PID, then SIGKILL if it lingers."""
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.process.wait(timeout=5)


@contextlib.contextmanager
def running(
    server: ServerProcess, path: str = "/", timeout: float = 60.0
) -> Iterator[ServerProcess]:
    """Wait for `server` to answer, yield it, and stop it by PID afterwards."""
    try:
        wait_for_http(server, path, timeout)
        yield server
    finally:
        stop_process(server)
