"""The core's exceptions: each names one problem a user can act on.

The web layer maps them to HTTP statuses in one place and the CLI turns them into one line and a
distinct exit code (`exit_code`), so neither ever shows a traceback for a known failure.
"""

from __future__ import annotations

import re

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact_credentials(text: str) -> str:
    """`http://user:secret@host` → `http://***@host` wherever a URL with userinfo appears."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


class DigitflowError(Exception):
    """Base of every error digitflow raises on purpose; its text never shows URL credentials."""

    exit_code: int = 1

    def __str__(self) -> str:
        return redact_credentials(super().__str__())


class ConfigError(DigitflowError):
    """A configuration file or override is missing, malformed or unknown."""

    exit_code = 2


class DataNotFound(DigitflowError):
    """The prepared data folder or one of its tables does not exist."""

    exit_code = 3


class TrackingUnavailable(DigitflowError):
    """The MLflow tracking server does not answer."""

    exit_code = 4


class TrackingAuthError(DigitflowError):
    """The MLflow tracking server refused the credentials (401/403)."""

    exit_code = 5


class ExperimentNotFound(DigitflowError):
    """No experiment has that name."""

    exit_code = 6


class RunNotFound(DigitflowError):
    """No run has that UUID."""

    exit_code = 7


class ArtifactNotFound(DigitflowError):
    """The run exists but lacks the artifact asked for (e.g. `model/model.pt`)."""

    exit_code = 8


class StorageAuthError(DigitflowError):
    """The object store refused the access keys."""

    exit_code = 9


class StorageUnavailable(DigitflowError):
    """The object store endpoint does not answer."""

    exit_code = 10


class DestinationNotWritable(DigitflowError):
    """The local folder artifacts should land in cannot be written."""

    exit_code = 11


class ModelNotFound(DigitflowError):
    """The checkpoint file does not exist."""

    exit_code = 12


class InvalidCheckpoint(DigitflowError):
    """The checkpoint is corrupt, unsafe (carries code) or does not fit the network."""

    exit_code = 13


class SelfTestFailed(DigitflowError):
    """The loaded model does not reproduce the run's golden predictions."""

    exit_code = 14


class InvalidImage(DigitflowError):
    """The bytes are not a decodable image (empty, truncated, corrupt or not an image)."""

    exit_code = 15


class UnsupportedImageFormat(InvalidImage):
    """The bytes are an image, but in a format outside the allow-list."""


class ImageTooLarge(InvalidImage):
    """The image's header declares more pixels than the limit (a decompression bomb)."""


class ArtifactIntegrityError(DigitflowError):
    """A downloaded artifact does not match the size or checksum the store reported."""

    exit_code = 21


class UnsupportedArtifactLocation(DigitflowError):
    """The run's artifact location is neither s3://, mlflow-artifacts: nor a local folder."""

    exit_code = 22


class RegisteredModelNotFound(DigitflowError):
    """No registered model version matches `models:/<name>/<version>` or `@<alias>`."""

    exit_code = 23


class GraphMismatch(DigitflowError):
    """The exported ONNX graph does not give torch's answers on the check images."""

    exit_code = 24
