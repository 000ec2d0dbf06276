"""Optional API keys: `Authorization: Bearer <key>` (RFC 6750), checked before anything else runs.

Keys come from SAIKYO_API_KEYS (comma-separated) and/or a file named by api_keys_file (one key per line,
blank lines and `#` comments ignored). With no keys configured the middleware is not installed at all.
Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key, so neither
the position of the first wrong byte nor the key's length shows in the timing. No response and no log
line ever contains a key, configured or presented.

Admin keys (SAIKYO_ADMIN_KEYS) are separate: model control (/v2/repository/*) changes what every client
gets, so it takes an admin key and refuses client keys (403); with client keys and no admin key it is
refused to everyone. Admin keys also work wherever a client key does. With admin keys only, the other
routes stay open. A request to an open route that carries no valid key is anonymous: its 404s do not
list the server's models (server/errors.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from saikyo.server.path_groups import GROUPS, endpoint_group, is_control
from saikyo.server.errors import send_json
from saikyo.settings import Settings

REALM = "saikyo"
# RFC 6750 b64token: what a Bearer credential may contain.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class AuthConfigError(ValueError):
    """The key settings are unusable; the server refuses to start rather than run unprotected."""


def load_admin_keys(settings: Settings) -> list[str]:
    keys = [k.strip() for k in settings.admin_keys if k.strip()]
    for i, key in enumerate(keys):
        if not _TOKEN.match(key):
            raise AuthConfigError(f"admin key #{i + 1} has characters a Bearer token cannot carry")
    return keys


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


def _matches(presented: bytes, digests: list[bytes]) -> bool:
    ok = False
    for key in digests:  # no early exit: the time does not say which key matched
        ok |= hmac.compare_digest(presented, key)
    return ok


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str], public: Iterable[str], admin_keys: Iterable[str] = ()) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]
        self._admin = [_digest(k) for k in admin_keys]
        if not self._digests and not self._admin:
            raise AuthConfigError("ApiKeyMiddleware needs at least one key")
        self.public = frozenset(public)

    def valid(self, presented: str) -> bool:
        """A key that may use the server: a client key or an admin key."""
        d = _digest(presented)
        return _matches(d, self._digests) | _matches(d, self._admin)

    def admin(self, presented: str) -> bool:
        return _matches(_digest(presented), self._admin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        control = is_control(path)
        if not control and (endpoint_group(path) in self.public or not self._digests):
            if self._digests:
                token = Headers(scope=scope).get("authorization", "").strip().partition(" ")[2].strip()
                scope.setdefault("state", {})["anonymous"] = not (token and self.valid(token))
            await self.app(scope, receive, send)
            return
        if control and not self._admin:
            await self._refuse(scope, receive, send, "model control needs an admin key: set SAIKYO_ADMIN_KEYS "
                               "(client keys cannot load or unload models)", "insufficient_scope", 403)  # fmt: skip
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
        if control and not self.admin(token):
            await self._refuse(scope, receive, send, "model control needs an admin key; this is a client key",
                               "insufficient_scope", 403)  # fmt: skip
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, error: str, code: str | None, status: int = 401
    ) -> None:
        headers = {"WWW-Authenticate": f'Bearer realm="{REALM}"' + (f', error="{code}"' if code else "")}
        h = Headers(scope=scope)
        if h.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in h:
            headers["Connection"] = "close"  # do not read an unauthenticated upload just to discard it
        await send_json(scope, receive, send, status, error, headers=headers)
