"""Where a run's artifacts are read from: S3-compatible storage, MLflow's artifact proxy, a folder.

Each source lists the files under a run's `artifacts/` root (with sizes, and an MD5 where the store
gives one) and streams one file into an open local file. Network sources use short explicit
timeouts; their failures become digitflow's errors, and `TransientError` marks what is worth
retrying.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from requests.adapters import HTTPAdapter

from digitflow.errors import (
    ArtifactNotFound,
    StorageAuthError,
    StorageUnavailable,
    TrackingAuthError,
    TrackingUnavailable,
)

CHUNK_SIZE = 1 << 20
S3_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "403"}
)
S3_MISSING_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "404"})
PROXY_ROUTE = "/api/2.0/mlflow-artifacts/artifacts"
LIST_RETRY_PAUSE = 0.5

OnBytes = Callable[[int], None]


class TransientError(Exception):
    """A failure that may pass on its own (connection reset, timeout, 5xx): worth a retry."""

    def __init__(self, message: str, final: Exception) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class RemoteFile:
    """One artifact: its path under the run's `artifacts/` root, size, and MD5 if known."""

    path: str
    size: int
    md5: str | None = None
    modified: datetime | None = None


class ArtifactSource(Protocol):
    """Lists a run's artifacts and streams one of them."""

    description: str

    def list_files(self) -> list[RemoteFile]: ...

    def download(self, path: str, out: BinaryIO, on_bytes: OnBytes) -> None: ...


class S3Source:
    """Artifacts straight from S3-compatible storage (boto3 with a custom endpoint)."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        timeout: float,
        max_pool: int = 8,
        region: str | None = None,
    ) -> None:
        parsed = urllib.parse.urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint_url or "the default AWS endpoint"
        self.timeout = timeout
        self.attempts = 2
        self.description = f"{uri} (endpoint {self.endpoint})"
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region or "us-east-1",
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"total_max_attempts": self.attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
                max_pool_connections=max_pool,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def _error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, NoCredentialsError):
            return StorageAuthError(
                f"no S3 access keys for {self.endpoint}; set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in S3_AUTH_CODES or status == 403:
                return StorageAuthError(
                    f"S3 endpoint {self.endpoint} refused the access keys ({code or status}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                )
            if code in S3_MISSING_CODES:
                return ArtifactNotFound(f"{what}: {code} at {self.description}")
            if isinstance(status, int) and status >= 500:
                return TransientError(
                    f"{what}: S3 answered {status}",
                    StorageUnavailable(
                        f"S3 endpoint {self.endpoint} failed ({code or status}) for {what}"
                    ),
                )
            return StorageUnavailable(f"S3 endpoint {self.endpoint}: {code or status} for {what}")
        if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
            return TransientError(
                str(exc),
                StorageUnavailable(
                    f"S3 endpoint {self.endpoint} did not answer within {self.timeout:g} s "
                    f"({self.attempts} attempts)"
                ),
            )
        if isinstance(exc, EndpointConnectionError):
            return TransientError(
                str(exc),
                StorageUnavailable(f"S3 endpoint {self.endpoint} cannot be reached ({exc})"),
            )
        return TransientError(
            str(exc), StorageUnavailable(f"S3 endpoint {self.endpoint} failed for {what} ({exc})")
        )

    def list_files(self) -> list[RemoteFile]:
        """Every object under the run's prefix, recursively."""
        root = self.prefix + "/" if self.prefix else ""
        files: list[RemoteFile] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for item in page.get("Contents", []):
                    key = str(item["Key"])
                    if key.endswith("/"):
                        continue
                    etag = str(item.get("ETag", "")).strip('"')
                    md5 = etag if len(etag) == 32 and "-" not in etag else None
                    files.append(
                        RemoteFile(key[len(root) :], int(item["Size"]), md5, item["LastModified"])
                    )
        except (BotoCoreError, ClientError) as exc:
            error = self._error(exc, "listing")
            raise (error.final if isinstance(error, TransientError) else error) from None
        return files

    def download(self, path: str, out: BinaryIO, on_bytes: OnBytes) -> None:
        key = f"{self.prefix}/{path}" if self.prefix else path
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(CHUNK_SIZE):
                out.write(chunk)
                on_bytes(len(chunk))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, path) from None


class ProxySource:
    """Artifacts through the MLflow server's artifact proxy (`mlflow-artifacts:` locations)."""

    def __init__(
        self,
        uri: str,
        tracking_uri: str,
        username: str | None,
        password: str | None,
        timeout: float,
        max_pool: int = 8,
    ) -> None:
        parsed = urllib.parse.urlparse(uri)
        tracking = urllib.parse.urlparse(tracking_uri)
        netloc = parsed.netloc or tracking.netloc
        self.base = f"{tracking.scheme}://{netloc}{tracking.path.rstrip('/')}{PROXY_ROUTE}"
        self.root = parsed.path.strip("/")
        self.timeout = timeout
        self.description = f"{uri} (via {tracking.scheme}://{netloc})"
        self.session = requests.Session()
        if username:
            self.session.auth = (username, password or "")
        adapter = HTTPAdapter(pool_connections=max_pool, pool_maxsize=max_pool)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _get(self, url: str, what: str, **kwargs: Any) -> Any:
        try:
            response = self.session.get(url, timeout=self.timeout, **kwargs)
        except requests.Timeout:
            raise TransientError(
                what,
                TrackingUnavailable(
                    f"MLflow artifact proxy {self.base} did not answer within {self.timeout:g} s"
                ),
            ) from None
        except requests.RequestException as exc:
            raise TransientError(
                what,
                TrackingUnavailable(
                    f"MLflow artifact proxy {self.base} cannot be reached "
                    f"({exc.__class__.__name__})"
                ),
            ) from None
        if response.status_code in (401, 403):
            response.close()
            if self.session.auth is None:
                # The tracking API took us without credentials, so the refusal is the storage
                # behind the proxy refusing the server itself (e.g. its S3 keys are wrong).
                raise StorageAuthError(
                    f"the MLflow server's artifact store refused the server for {what} "
                    f"(HTTP {response.status_code}); the server's own storage credentials are "
                    "wrong or lack access (see the mlflow server's log)"
                )
            raise TrackingAuthError(
                f"MLflow server refused the credentials for {what} (HTTP {response.status_code}); "
                "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or, if they are "
                "right, the server's own storage credentials)"
            )
        if response.status_code == 404:
            response.close()
            raise ArtifactNotFound(f"{what} not found at {self.description}")
        if response.status_code >= 500 or response.status_code == 429:
            detail = response.text[:200] if not kwargs.get("stream") else ""
            response.close()
            raise TransientError(
                what,
                StorageUnavailable(
                    f"MLflow artifact proxy failed for {what} (HTTP {response.status_code}; "
                    f"the server could not read its artifact store) {detail}".strip()
                ),
            )
        if response.status_code != 200:
            response.close()
            raise TrackingUnavailable(
                f"MLflow artifact proxy answered HTTP {response.status_code} for {what}"
            )
        return response

    def _list(self, path: str) -> list[RemoteFile]:
        response = self._get(self.base, f"listing {path or '/'}", params={"path": path})
        files: list[RemoteFile] = []
        for entry in response.json().get("files", []):
            child = f"{path}/{entry['path']}" if path else str(entry["path"])
            if entry.get("is_dir"):
                files.extend(self._list(child))
            else:
                files.append(RemoteFile(child, int(entry.get("file_size", 0))))
        return files

    def list_files(self) -> list[RemoteFile]:
        """Every file under the run's artifact root, walking folders one request each.

        A transient failure (connection reset, 5xx) is retried once after a short pause.
        """
        try:
            files = self._list(self.root)
        except TransientError:
            time.sleep(LIST_RETRY_PAUSE)
            try:
                files = self._list(self.root)
            except TransientError as exc:
                raise exc.final from None
        cut = len(self.root) + 1 if self.root else 0
        return [RemoteFile(f.path[cut:], f.size) for f in files]

    def download(self, path: str, out: BinaryIO, on_bytes: OnBytes) -> None:
        remote = f"{self.root}/{path}" if self.root else path
        url = f"{self.base}/{urllib.parse.quote(remote)}"
        response = self._get(url, path, stream=True)
        try:
            for chunk in response.iter_content(CHUNK_SIZE):
                out.write(chunk)
                on_bytes(len(chunk))
        except requests.RequestException as exc:
            raise TransientError(
                path,
                TrackingUnavailable(
                    f"MLflow artifact proxy broke off while sending {path} "
                    f"({exc.__class__.__name__})"
                ),
            ) from None
        finally:
            response.close()


class LocalSource:
    """Artifacts in a local folder (the embedded store, or a `file://` root on this machine)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def list_files(self) -> list[RemoteFile]:
        if not self.root.is_dir():
            raise ArtifactNotFound(f"artifact folder {self.root} does not exist on this machine")
        # Links are skipped: a link in a store could point anywhere on this machine.
        return [
            RemoteFile(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        ]

    def download(self, path: str, out: BinaryIO, on_bytes: OnBytes) -> None:
        try:
            fd = os.open(self.root / path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ArtifactNotFound(f"{self.root / path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                out.write(chunk)
                on_bytes(len(chunk))


def copy_file(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (same file system), else copy it."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)
