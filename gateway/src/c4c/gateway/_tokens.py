"""Bearer tokens issued by MOBIS, verified with the keys it publishes (a JWKS URL).

Only asymmetric algorithms are accepted, and each token only with the algorithm of the key
its ``kid`` names: ``alg=none`` and HS256-signed-with-the-public-key confusion fail before
any signature check. Signature, ``exp``, ``aud`` (and ``iss`` when configured) are checked.
An unknown ``kid`` refetches the key set (MOBIS rotated its keys), at most every 30 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

log = logging.getLogger("c4c.gateway.tokens")

ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_REFETCH_INTERVAL = 30.0


class InvalidToken(Exception):
    """Why a token was refused (said to the caller: it reveals nothing secret)."""


class TokenVerifier:
    def __init__(
        self,
        jwks_url: str,
        *,
        audience: str,
        issuer: str | None = None,
        cache_seconds: float = 300.0,
        timeout: float = 5.0,
    ) -> None:
        self.jwks_url = jwks_url
        self.audience = audience
        self.issuer = issuer
        self.cache_seconds = cache_seconds
        self._client = httpx.AsyncClient(timeout=timeout)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._expires = self._next_fetch = -float("inf")
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; :class:`InvalidToken` unless every check passes."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("The token is not a JWT.") from exc
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ASYMMETRIC:
            raise InvalidToken(f"Tokens signed with {algorithm!r} are not accepted.")
        key = await self._key(str(kid))
        if key is None or key.algorithm_name != algorithm:
            raise InvalidToken("The token is not signed with a key of the issuer.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("The token has expired.") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("The token is not meant for this API.") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"The token is not valid ({exc}).") from exc
        return claims

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        if self._should_fetch(kid):
            async with self._lock:
                if self._should_fetch(kid):  # nobody fetched while we waited
                    await self._fetch()
        return self._keys.get(kid)

    def _should_fetch(self, kid: str) -> bool:
        now = time.monotonic()
        return now >= self._next_fetch and (now >= self._expires or kid not in self._keys)

    async def _fetch(self) -> None:
        self._next_fetch = time.monotonic() + _REFETCH_INTERVAL
        try:
            answer = await self._client.get(self.jwks_url)
            answer.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(answer.json()).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWTError):
            # Keep the keys we have; try again after the interval.
            log.warning("JWKS unavailable", extra={"url": self.jwks_url}, exc_info=True)
            return
        self._keys = {k.key_id: k for k in keys if k.key_id and k.algorithm_name in ASYMMETRIC}
        self._expires = time.monotonic() + self.cache_seconds

    async def aclose(self) -> None:
        await self._client.aclose()
