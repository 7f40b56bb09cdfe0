"""Bearer tokens and signed tile URLs.

With a token file, every /v1 route needs `Authorization: Bearer <token>` (compared with
hmac.compare_digest). A browser's tile loader cannot send headers, so Deep Zoom and legend URLs
accept instead `?exp=<unix seconds>&sig=<hex HMAC-SHA256 of "<prefix>|<exp>">`, where the prefix is
`/v1/slides/{path}` (the .dzi and all its tiles), `/v1/jobs/{id}/heatmap` or `/v1/jobs/{id}/legend`.
The signing key is derived from the token (HMAC of a fixed label), so URLs survive a restart but
never reveal the token; the API hands out signed URLs to authenticated clients only. The token is
never put in a URL and never logged. `/`, `/page/*` and `/v1/jobs/{id}/view` hold no data and are open.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, quote

from mil_runtime.errors import InputNotFoundError
from mil_runtime.serve.errors import error_body

SIGNED_TTL_S = 3600  # how long a signed tile URL stays valid
_LABEL = b"milkit-serve tile url signing v1"
_SLIDE_TILES = re.compile(r"^(/v1/slides/.+?)(?:\.dzi|_files/\d+/\d+_\d+\.jpeg)$", re.S)
_JOB_TILES = re.compile(r"^(/v1/jobs/[^/]+/(?:heatmap|legend))(?:\.dzi|_files/\d+/\d+_\d+\.png|\.png)$")
_OPEN = re.compile(r"^/v1/jobs/[^/]+/view$")


def route_path(scope) -> str:
    """The request's path inside this app: without the prefix a mount (or a proxy's root_path) adds."""
    path, root = scope.get("path", ""), scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputNotFoundError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(token) < 16:
        raise InputNotFoundError(f"--token-file {path}: the token must have at least 16 characters")
    return token


def signed_prefix(path: str) -> str | None:
    """The signed prefix a tile/DZI/legend path belongs to; None for every other path."""
    for pattern in (_SLIDE_TILES, _JOB_TILES):
        match = pattern.match(path)
        if match:
            return match.group(1)
    return None


class Auth:
    """The server's token (None: authentication off) and the URL signer derived from it."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self._key = hmac.new(token.encode(), _LABEL, hashlib.sha256).digest() if token else None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def signature(self, prefix: str, exp: int) -> str:
        return hmac.new(self._key, f"{prefix}|{exp}".encode(), hashlib.sha256).hexdigest()

    def sign(self, prefix: str, suffix: str, ttl: int = SIGNED_TTL_S, query: str = "", root: str = "") -> str:
        """URL of `root + prefix + suffix` (decoded path; quoted here) with its signature when auth is on.

        `root`: where the app is mounted (the ASGI root_path); the signature covers `prefix` only."""
        url = quote(root + prefix + suffix, safe="/")
        params = [query] if query else []
        if self.enabled:
            exp = int(time.time()) + ttl
            params.append(f"exp={exp}&sig={self.signature(prefix, exp)}")
        return url + ("?" + "&".join(params) if params else "")

    def bearer_ok(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, value = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def signature_ok(self, path: str, query: bytes) -> str | None:
        """None when `path` carries a valid signature, else why not (one line)."""
        prefix = signed_prefix(path)
        if prefix is None:
            return "this URL needs the bearer token"
        params = parse_qs(query.decode("latin-1"))
        exp, sig = params.get("exp", [""])[-1], params.get("sig", [""])[-1]
        if not exp or not sig:
            return "missing token: send Authorization: Bearer <token>, or use a signed URL from the API"
        try:
            when = int(exp)
        except ValueError:
            return "malformed signature expiry"
        if not hmac.compare_digest(sig.encode(), self.signature(prefix, when).encode()):
            return "bad signature: ask the API for a fresh URL"
        if when < time.time():
            return "the signed URL has expired: ask the API for a fresh one"
        return None


class AuthMiddleware:
    """ASGI middleware: /v1 requests need the bearer token or, for tile URLs, a valid signature."""

    def __init__(self, app, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.auth.enabled or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if not (path == "/v1" or path.startswith("/v1/")) or _OPEN.match(path):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.auth.bearer_ok(headers.get(b"authorization")):
            return await self.app(scope, receive, send)
        why = self.auth.signature_ok(path, scope.get("query_string", b""))
        if why is None:
            return await self.app(scope, receive, send)
        status = 401 if b"authorization" not in headers and "bad signature" not in why and "expired" not in why else 403
        if b"authorization" in headers:
            why = "wrong token"
        await _send_json(send, status, error_body(0, why), {b"www-authenticate": b'Bearer realm="mil-serve"'})


async def _send_json(send, status: int, body: dict, extra: dict[bytes, bytes] | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += list((extra or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
