"""A JSON response rendered with orjson (FastAPI deprecates its own ORJSONResponse)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class OrjsonResponse(JSONResponse):
    """`application/json` body serialised by orjson.

    A `JSONResponse` subclass so FastAPI documents routes by their `response_model`.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
