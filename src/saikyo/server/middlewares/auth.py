"""Optional API keys: `Authorization: Bearer <key>` (RFC 6750), checked before anything else runs.

Keys come from SAIKYO_API_KEYS (comma-separated) and/or a file named by api_keys_file (one key per line,
blank lines and `#` comments ignored). With no keys configured the middleware is not installed at all.
Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key, so neither
the position of the first wrong byte nor the key's length shows in the timing. No response and no log
line ever contains a key, configured or presented.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from saikyo.server.middlewares.path_groups import GROUPS, endpoint_group
from saikyo.server.errors import send_json
from saikyo.settings import Settings

REALM = "saikyo"
# RFC 6750 b64token: what a Bearer credential may contain.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class AuthConfigError(ValueError):
    """The key settings are unusable; the server refuses to start rather than run unprotected."""


def load_keys(settings: Settings) -> list[str]:
    keys = [k.strip() for k in settings.api_keys if k.strip()]
    if settings.api_keys_file is not None:
        try:
            text = settings.api_keys_file.read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read the API keys file {str(settings.api_keys_file)!r}: {exc.strerror}") from None
        from_file = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise AuthConfigError(f"the API keys file {str(settings.api_keys_file)!r} holds no keys")
        keys += from_file
    for i, key in enumerate(keys):
        if not _TOKEN.match(key):
            # Say which key by position only: the key itself must not reach a log.
            raise AuthConfigError(f"API key #{i + 1} has characters a Bearer token cannot carry")
    unknown = set(settings.public_endpoints) - set(GROUPS)
    if unknown:
        raise AuthConfigError(f"public_endpoints: unknown group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("latin-1", errors="replace")).digest()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str], public: Iterable[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise AuthConfigError("ApiKeyMiddleware needs at least one key")
        self.public = frozenset(public)

    def valid(self, presented: str) -> bool:
        d = _digest(presented)
        ok = False
        for key in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(d, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or endpoint_group(scope["path"]) in self.public:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        if header is None:
            await self._refuse(scope, receive, send, "missing API key: send the header 'Authorization: Bearer <key>'", None)
            return
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await self._refuse(
                scope, receive, send, "malformed Authorization header: expected 'Bearer <key>'", "invalid_request"
            )
            return
        if not self.valid(token):
            await self._refuse(scope, receive, send, "invalid API key", "invalid_token")
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: str, code: str | None) -> None:
        headers = {"WWW-Authenticate": f'Bearer realm="{REALM}"' + (f', error="{code}"' if code else "")}
        h = Headers(scope=scope)
        if h.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in h:
            headers["Connection"] = "close"  # do not read an unauthenticated upload just to discard it
        await send_json(scope, receive, send, 401, error, headers=headers)
