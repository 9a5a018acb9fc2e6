"""API keys on every route but the open ones, checked at the ASGI edge in constant time.

A key comes as `X-API-Key: <key>` or `Authorization: Bearer <key>`. No key: 401 with
`WWW-Authenticate: Bearer`; a wrong one: 403. Every configured key is compared with
`hmac.compare_digest` on every check, so the time taken says nothing about which key nearly
matched. Keys are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from digitflow_fastapi.responses import OrjsonResponse

API_KEY_HEADER = b"x-api-key"
AUTHORIZATION = b"authorization"
_BEARER = b"bearer "


def presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    """The key the client sent (`X-API-Key` first, else a Bearer token), or None."""
    key = headers.get(API_KEY_HEADER)
    if key is not None:
        return key.strip()
    authorization = headers.get(AUTHORIZATION)
    if authorization is not None and authorization[:7].lower() == _BEARER:
        return authorization[7:].strip()
    return None


class KeyChecker:
    """The configured keys; `refusal` answers 401/403 or None for a known key."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode("ascii") for key in keys)
        if not self._keys:
            raise ValueError("KeyChecker needs at least one key")

    def matches(self, key: bytes) -> bool:
        """True when `key` is one of the keys; compares against all of them every time."""
        found = False
        for known in self._keys:
            found |= hmac.compare_digest(known, key)
        return found

    def refusal(self, key: bytes | None) -> OrjsonResponse | None:
        """401 without a key, 403 with a wrong one, None when the key is known."""
        if not key:
            return OrjsonResponse(
                {"detail": "an API key is required: send X-API-Key or Authorization: Bearer"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.matches(key):
            return OrjsonResponse({"detail": "the API key is not valid"}, status_code=403)
        return None
