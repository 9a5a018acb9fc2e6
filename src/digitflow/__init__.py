"""digitflow: the MNIST pipeline (data, training, MLflow tracking, artifacts, inference)."""

__version__ = "0.1.0"
