"""Who is calling, and may they: an API key (``X-API-Key`` or ``api-key``), or a MOBIS
bearer token; none on public routes. Scopes are service names (``*`` = all)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers, QueryParams

from c4c.gateway._tokens import InvalidToken, TokenVerifier
from c4c.gateway.service import ApiKeys
from c4c.shared.auth import Principal, api_key_of
from c4c.shared.problems import ProblemError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="c4c", ApiKey realm="c4c" header="X-API-Key"'}


class Unauthorized(ProblemError):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers=_CHALLENGE)


class MissingScope(ProblemError):
    status, code, title = 403, "missing-scope", "Forbidden"


@dataclass(frozen=True)
class Caller:
    principal: Principal
    daily_quota: int | None = None

    @property
    def limit_key(self) -> str:
        return f"{self.principal.kind}:{self.principal.id}"


def _pattern(routes: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for all: ``/*/healthz`` → one path segment for each ``*``, the rest
    literal."""
    if not routes:
        return None
    each = ("[^/]+".join(re.escape(part) for part in route.split("*")) for route in routes)
    return re.compile("(?:" + "|".join(each) + ")$")


class Identity:
    def __init__(
        self, keys: ApiKeys, tokens: TokenVerifier | None, public_routes: Sequence[str]
    ) -> None:
        self.keys = keys
        self.tokens = tokens
        self._public = _pattern(public_routes)

    def is_public(self, path: str) -> bool:
        return self._public is not None and self._public.match(path) is not None

    async def authenticate(
        self, path: str, headers: Headers, query_string: bytes, client_ip: str
    ) -> Caller:
        """The caller of a proxied request: 401 when its credentials are missing or bad. On
        a public route credentials are not looked at (an app refreshing its session may
        well send an expired token): the caller is anonymous, known by its address."""
        if self.is_public(path):
            return Caller(Principal("anonymous", client_ip))
        key = api_key_of(headers, QueryParams(query_string) if query_string else {})
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        # A caller who names themselves wrongly is refused, even beside a good API key.
        user = await self._user(bearer) if bearer else None
        if key is not None:
            record = await self.keys.authenticate(key)
            if record is None:
                raise Unauthorized("The API key is unknown or revoked.")
            return Caller(
                Principal("api-key", record.id, record.name, record.scopes), record.daily_quota
            )
        if user is not None:
            return Caller(user)
        raise Unauthorized("Send an API key (X-API-Key header or api-key parameter) or a token.")

    async def _user(self, token: str) -> Principal:
        if self.tokens is None:
            raise Unauthorized("Bearer tokens are not accepted here (no JWKS configured).")
        try:
            claims = await self.tokens.verify(token)
        except InvalidToken as exc:
            raise Unauthorized(str(exc)) from exc
        scopes = claims.get("scope", "")
        return Principal(
            "user",
            str(claims["sub"]),
            claims.get("name") or claims.get("preferred_username"),
            frozenset(scopes.split() if isinstance(scopes, str) else ()),
        )

    @staticmethod
    def authorize(caller: Caller, service: str) -> None:
        if caller.principal.kind != "anonymous" and not caller.principal.allows(service):
            raise MissingScope(f"Your credentials do not include the scope {service!r}.")
