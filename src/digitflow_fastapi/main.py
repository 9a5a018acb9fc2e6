"""ASGI entry point for gunicorn/uvicorn: `digitflow_fastapi.main:APP`."""

from digitflow_fastapi.app import create_app

APP = create_app()
