"""Open Inference Protocol v2 routes."""
