"""Who is calling: API keys and the principal the gateway vouches for.

The gateway authenticates a caller (API key or MOBIS token) and passes the result on in the
``X-C4C-Principal`` header, HMAC-signed with a secret it shares with the services. A
service verifies it with :class:`PrincipalMiddleware` (every service app has it) and reads
it with :data:`PrincipalDep`; with ``require_principal`` set it refuses every call that did
not come through the gateway. A service run alone (self-hosted, no gateway in front) checks
API keys itself when given ``api_keys``. API keys are high-entropy random strings, so a
plain SHA-256 of the key is a safe stored form (a slow password hash would only cost time
per request).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

from fastapi import Depends, FastAPI, Request
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from c4c.shared.problems import ProblemError, Refusals
from c4c.shared.settings import ServiceSettings

PRINCIPAL_HEADER = "X-C4C-Principal"
API_KEY_HEADER = "X-API-Key"
API_KEY_QUERY = "api-key"
API_KEY_PREFIX = "c4c_"
ALL_SCOPES = "*"
PRINCIPAL_MAX_AGE = 300.0
"""Seconds a signed principal stays valid: it is made per request, so this only has to
cover clock skew between hosts, and it bounds how long a captured header can be replayed."""

SECRET_FILE = "principal-secret"  # noqa: S105  (a file name, not a secret)

Kind = Literal["api-key", "user", "service", "anonymous"]


@dataclass(frozen=True)
class Principal:
    """The caller: an API key, an app user, another service of the suite (``id`` is its
    name), or nobody (a public route)."""

    kind: Kind
    id: str
    name: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)

    def allows(self, scope: str) -> bool:
        return ALL_SCOPES in self.scopes or scope in self.scopes


class InvalidPrincipal(ProblemError):
    status, code, title = 401, "invalid-principal", "Not called through the gateway"


class InvalidApiKey(ProblemError):
    status, code, title = 401, "invalid-api-key", "Invalid API key"


def new_api_key() -> str:
    """A fresh API key: 256 random bits, URL-safe, recognisable by its prefix."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_of(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key a caller sent, in the ``X-API-Key`` header or the ``api-key`` query parameter
    (as Pl@ntNet clients send it)."""
    return headers.get(API_KEY_HEADER) or query.get(API_KEY_QUERY) or None


def query_without_key(query: bytes) -> bytes:
    """The query string less the ``api-key`` parameter: a credential goes no further (not to
    an upstream, not into a handler's parameters, links or logs)."""
    if API_KEY_QUERY.encode() not in query and b"%" not in query:  # api%2Dkey is one too
        return query
    kept = [
        part
        for part in query.split(b"&")
        if unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) != API_KEY_QUERY
    ]
    return b"&".join(kept)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_principal(principal: Principal, secret: bytes, *, now: float | None = None) -> str:
    """The header value: ``<base64url JSON>.<base64url HMAC-SHA256>``."""
    claims = {
        "k": principal.kind,
        "id": principal.id,
        "n": principal.name,
        "s": sorted(principal.scopes),
        "iat": int(time.time() if now is None else now),
    }
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def verify_principal(value: str, secret: bytes, *, now: float | None = None) -> Principal:
    """The principal in a header value; :class:`InvalidPrincipal` unless the gateway signed
    it in the last :data:`PRINCIPAL_MAX_AGE` seconds."""
    payload, _, signature = value.partition(".")
    expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    try:
        valid = hmac.compare_digest(_unb64(signature), expected)
        claims = json.loads(_unb64(payload)) if valid else None
    except (binascii.Error, ValueError):
        valid = False
    if not valid or not isinstance(claims, dict):
        raise InvalidPrincipal("The principal header is not signed by the gateway.")
    age = (time.time() if now is None else now) - float(claims.get("iat", 0))
    if not -PRINCIPAL_MAX_AGE <= age <= PRINCIPAL_MAX_AGE:
        raise InvalidPrincipal("The principal header has expired.")
    try:
        return Principal(
            kind=claims["k"],
            id=str(claims["id"]),
            name=claims.get("n"),
            scopes=frozenset(claims.get("s", ())),
        )
    except (KeyError, TypeError) as exc:
        raise InvalidPrincipal("The principal header is malformed.") from exc


def principal_secret(settings: ServiceSettings) -> bytes | None:
    """The shared secret: the ``principal_secret`` setting, else the gateway's secret file
    under the data directory (embedded mode, or services sharing the gateway's data dir)."""
    if settings.principal_secret is not None:
        return settings.principal_secret.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    return path.read_bytes().strip() if path.is_file() else None


def ensure_principal_secret(settings: ServiceSettings) -> bytes:
    """The gateway's side: the configured secret, or a random one kept in the data
    directory (mode 600) so that embedded services and restarts agree on it."""
    secret = principal_secret(settings)
    if secret is None:
        path: Path = settings.data_dir / SECRET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        secret = secrets.token_urlsafe(32).encode()
        with os.fdopen(fd, "wb") as file:
            file.write(secret)
    return secret


class PrincipalMiddleware:
    """Verifies the gateway's principal header and keeps the principal in the request
    state. A forged or stale header is refused (401), and so is any header when this service
    has no secret to check it with (a gateway in front that does not share its secret: its
    callers would all pass for anonymous). Without the header, ``public_paths`` (health,
    metrics, docs) are open to all; elsewhere a service with ``require_principal`` refuses
    the call, whatever key it carries, and one given ``api_keys`` (run alone) takes one of
    them instead."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: ServiceSettings,
        public_paths: Collection[str] = (),
        refusals: Refusals | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.require = settings.require_principal
        # Digests, looked up in a set: how long a lookup takes tells only of a SHA-256.
        self.keys = frozenset(hash_api_key(key.get_secret_value()) for key in settings.api_keys)
        self.public_paths = frozenset(public_paths)
        self.refusals = refusals or Refusals()
        self._secret: bytes | None = None

    def _get_secret(self) -> bytes | None:
        # Read on first use: in embedded mode the gateway writes the file after this app is
        # built.
        if self._secret is None:
            self._secret = principal_secret(self.settings)
        return self._secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = PRINCIPAL_HEADER.lower().encode()
        value = next((v for k, v in scope["headers"] if k == header), None)
        public = scope["path"] in self.public_paths
        principal: Principal | None = None
        try:
            if value is not None:
                secret = self._get_secret()
                if secret is not None:
                    principal = verify_principal(value.decode("latin-1"), secret)
                elif not public:
                    raise InvalidPrincipal(
                        f"This service has no secret to check the gateway's {PRINCIPAL_HEADER} "
                        "with: give it the gateway's C4C_PRINCIPAL_SECRET."
                    )
            elif public:
                pass
            elif self.require:  # before keys: a service behind the gateway is reached by it alone
                raise InvalidPrincipal("Call this service through the gateway.")
            elif self.keys:
                principal = self._key_holder(scope)
        except ProblemError as exc:
            await self.refusals.response(exc, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _key_holder(self, scope: Scope) -> Principal:
        key = api_key_of(Headers(scope=scope), QueryParams(scope["query_string"]))
        digest = None if key is None else hash_api_key(key)
        if digest not in self.keys:
            raise InvalidApiKey(
                f"Send one of this service's API keys ({API_KEY_HEADER} header or "
                f"{API_KEY_QUERY} query parameter)."
            )
        scope["query_string"] = query_without_key(scope["query_string"])
        # Named by its hash: ingest records it as the creator, plantid counts its quota.
        return Principal("api-key", digest[:32], scopes=frozenset({ALL_SCOPES}))


def document_api_keys(app: FastAPI) -> None:
    """Make the app's OpenAPI document say that a call sends an API key (a service run alone
    with ``api_keys``), so that /docs asks for one and sends it."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            document = plain()
            document.setdefault("components", {})["securitySchemes"] = {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": API_KEY_QUERY},
            }
            document["security"] = [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def current_principal(request: Request) -> Principal | None:
    """The caller the gateway vouched for, or None when called without the gateway."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    return principal


async def _principal(request: Request) -> Principal | None:
    # Async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop (and the
    # GIL handed over and back) on every request for a dictionary lookup.
    return current_principal(request)


PrincipalDep = Annotated[Principal | None, Depends(_principal)]
