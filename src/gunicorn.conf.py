"""Read by gunicorn when the seed's command runs from `src/`; the settings live in the package."""

from digitflow_fastapi.lifecycle.gunicorn_conf import *  # noqa: F403
