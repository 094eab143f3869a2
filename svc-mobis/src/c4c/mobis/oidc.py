"""The OpenID Connect provider as MOBIS sees it: its metadata (discovery), its keys (JWKS),
its token endpoint, and the verification of the ID tokens it signs.

The issuer is operator configuration, so it is trusted and reached directly (no SSRF guard).
Metadata and keys are cached; a token naming an unknown key refetches the keys, at most once
a minute, so a provider's key rotation is picked up without letting forged ``kid`` values
make MOBIS hammer the provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jwt
from pydantic import SecretStr

from c4c.mobis.settings import MobisSettings
from c4c.shared.problems import ProblemError

DISCOVERY_PATH = "/.well-known/openid-configuration"
# Asymmetric only: with a public key in hand, accepting HS* would let anyone sign with that
# public key as the HMAC secret, and "none" would accept unsigned tokens.
SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
KEY_REFETCH_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 60


class OidcNotConfigured(ProblemError):
    status, code, title = 404, "oidc-not-configured", "OpenID Connect login is not offered"


class OidcProviderUnavailable(ProblemError):
    status, code, title = 503, "oidc-provider-unavailable", "The identity provider is unreachable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "30"})


class OidcProviderFailed(ProblemError):
    status, code, title = 502, "oidc-provider-failed", "The identity provider answered wrongly"


class OidcRefused(ProblemError):
    status, code, title = 401, "oidc-login-refused", "The identity provider refused the login"


class InvalidIdToken(ProblemError):
    status, code, title = 401, "invalid-id-token", "The ID token is not valid"


@dataclass(frozen=True)
class Metadata:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: frozenset[str]
    client_secret_post_only: bool


@dataclass(frozen=True)
class ProviderKey:
    key: jwt.PyJWK
    algorithm: str | None
    """The one algorithm the provider named for the key, if it did."""


KeySet = dict[str | None, list[ProviderKey]]
"""The provider's signing keys by ``kid``."""


@dataclass(frozen=True)
class Identity:
    """Who the provider says signed in: ``email`` only when the provider verified it;
    ``auth_time`` when the person last authenticated at the provider (its ``auth_time``
    claim, else the token's issue time)."""

    issuer: str
    subject: str
    email: str | None
    name: str | None
    auth_time: datetime


def code_challenge(verifier: str) -> str:
    """PKCE S256 (RFC 7636)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class OidcProvider:
    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        issuer: str,
        client_id: str,
        client_secret: SecretStr | None,
        redirect_uri: str,
        scopes: str,
        cache_seconds: float,
    ) -> None:
        self.client = client
        self.issuer = issuer
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.cache_seconds = cache_seconds
        self._metadata: tuple[float, Metadata] | None = None
        self._keys: tuple[float, KeySet] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: MobisSettings) -> OidcProvider | None:
        """The configured provider, or None when OpenID Connect login is not offered."""
        if not (settings.oidc_issuer and settings.oidc_client_id and settings.oidc_redirect_uri):
            return None
        return cls(
            httpx.AsyncClient(timeout=settings.oidc_timeout_seconds, follow_redirects=False),
            issuer=settings.oidc_issuer,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret,
            redirect_uri=settings.oidc_redirect_uri,
            scopes=settings.oidc_scopes,
            cache_seconds=settings.oidc_metadata_seconds,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- talking to the provider ----------------------------------------------------------

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            answer = await self.client.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as error:
            raise OidcProviderUnavailable(f"Its {what} could not be read ({error!r}).") from None
        return _json_of(answer, what)

    async def metadata(self) -> Metadata:
        cached = self._metadata
        if cached and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        async with self._lock:
            if self._metadata is not None and self._metadata is not cached:
                return self._metadata[1]  # another request just read it
            url = self.issuer.rstrip("/") + DISCOVERY_PATH
            document = await self._get_json(url, "metadata")
            metadata = _metadata(document, self.issuer)
            self._metadata = (time.monotonic(), metadata)
            return metadata

    async def _key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        metadata = await self.metadata()
        keys = self._keys
        age = time.monotonic() - keys[0] if keys else float("inf")
        found = _pick(keys[1], kid, algorithm) if keys and age < self.cache_seconds else None
        if found is None and age >= min(KEY_REFETCH_SECONDS, self.cache_seconds):
            async with self._lock:
                if self._keys is keys:
                    document = await self._get_json(metadata.jwks_uri, "keys")
                    self._keys = (time.monotonic(), _key_set(document))
            keys = self._keys
            found = _pick(keys[1], kid, algorithm) if keys else None
        if found is None:
            raise InvalidIdToken("It is signed with a key the provider does not publish.")
        return found.key

    def authorization_url(
        self, metadata: Metadata, state: str, nonce: str, verifier: str, max_age: int | None
    ) -> str:
        """``max_age``: the person must have authenticated at most this many seconds ago
        (OpenID Connect Core §3.1.2.1; the provider then names ``auth_time``), and is asked
        to sign in again (``prompt=login``) rather than pass on a single-sign-on session."""
        query: dict[str, str | int] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        if max_age is not None:
            query |= {"prompt": "login", "max_age": max_age}
        separator = "&" if "?" in metadata.authorization_endpoint else "?"
        return f"{metadata.authorization_endpoint}{separator}{urlencode(query)}"

    async def exchange(self, code: str, verifier: str) -> str:
        """The ID token the token endpoint gives for an authorization code."""
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
            "client_id": self.client_id,
        }
        headers = {"Accept": "application/json"}
        if self.client_secret is not None:
            secret = self.client_secret.get_secret_value()
            if metadata.client_secret_post_only:
                form["client_secret"] = secret
            else:
                # RFC 6749 §2.3.1: id and secret are form-encoded before going into Basic.
                pair = f"{quote(self.client_id, safe='')}:{quote(secret, safe='')}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        try:
            answer = await self.client.post(metadata.token_endpoint, data=form, headers=headers)
        except httpx.HTTPError as error:
            raise OidcProviderUnavailable(f"Its token endpoint failed ({error!r}).") from None
        if 400 <= answer.status_code < 500:
            reason = _error_of(answer)
            raise OidcRefused(f"The provider refused the code ({reason}); sign in again.")
        body = _json_of(answer, "token response")
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise OidcProviderFailed("Its token response carries no ID token.")
        return id_token

    # --- ID tokens --------------------------------------------------------------------------

    async def verify(self, id_token: str, nonce: str | None) -> Identity:
        """The identity an ID token vouches for: signed by the provider with an asymmetric
        key it publishes, issued by it, for MOBIS (``aud``), unexpired, and carrying
        ``nonce`` when one is expected."""
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise InvalidIdToken("It is not a JSON Web Token.") from None
        algorithm = header.get("alg")
        metadata = await self.metadata()
        if algorithm not in SIGNING_ALGORITHMS or algorithm not in metadata.algorithms:
            raise InvalidIdToken(f"Its algorithm {algorithm!r} is not accepted.")
        kid = header.get("kid")
        key = await self._key(kid if isinstance(kid, str) else None, algorithm)
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[algorithm],
                audience=self.client_id,
                issuer=self.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.PyJWTError as error:
            raise InvalidIdToken(f"It was refused: {error}.") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            raise InvalidIdToken("It names several audiences but MOBIS is not its party.")
        if nonce is not None and not secrets.compare_digest(
            str(claims.get("nonce", "")).encode(), nonce.encode()
        ):
            raise InvalidIdToken("Its nonce is not the one of this login.")
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise InvalidIdToken("Its subject is not a valid identifier.")
        email = claims.get("email")
        verified = claims.get("email_verified") is True and isinstance(email, str)
        name = claims.get("name") or claims.get("preferred_username")
        auth_time = claims.get("auth_time")
        if not isinstance(auth_time, int | float) or isinstance(auth_time, bool):
            auth_time = claims["iat"]
        try:
            authenticated = datetime.fromtimestamp(auth_time, UTC)
        except (TypeError, ValueError, OverflowError, OSError):
            raise InvalidIdToken("Its authentication time is not a valid time.") from None
        return Identity(
            issuer=self.issuer,
            subject=subject,
            email=email.strip().lower()[:320] if verified and isinstance(email, str) else None,
            name=(name.strip()[:200] or None) if isinstance(name, str) else None,
            auth_time=authenticated,
        )


def _json_of(answer: httpx.Response, what: str) -> dict[str, Any]:
    if answer.status_code >= 500:
        raise OidcProviderUnavailable(f"Its {what} answered {answer.status_code}.")
    if answer.status_code != 200:
        raise OidcProviderFailed(f"Its {what} answered {answer.status_code}.")
    try:
        body = answer.json()
    except ValueError:
        raise OidcProviderFailed(f"Its {what} is not JSON.") from None
    if not isinstance(body, dict):
        raise OidcProviderFailed(f"Its {what} is not a JSON object.")
    return body


def _error_of(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    return str(error)[:100] if error else f"HTTP {answer.status_code}"


def _metadata(document: dict[str, Any], issuer: str) -> Metadata:
    if document.get("issuer") != issuer:
        # OpenID Connect Discovery §4.3: the metadata must name the issuer it was read from.
        raise OidcProviderFailed(f"Its metadata names the issuer {document.get('issuer')!r}.")
    endpoints = []
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        url = document.get(name)
        if not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            raise OidcProviderFailed(f"Its metadata lacks a valid {name}.")
        endpoints.append(url)
    algorithms = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    return Metadata(
        authorization_endpoint=endpoints[0],
        token_endpoint=endpoints[1],
        jwks_uri=endpoints[2],
        algorithms=frozenset(a for a in algorithms if isinstance(a, str)),
        client_secret_post_only="client_secret_basic" not in methods
        and "client_secret_post" in methods,
    )


def _key_set(document: dict[str, Any]) -> KeySet:
    """The provider's signing keys; those MOBIS cannot use are left out."""
    keys: KeySet = {}
    for jwk in document.get("keys") or []:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid, named = jwk.get("kid"), jwk.get("alg")
        keys.setdefault(kid if isinstance(kid, str) else None, []).append(
            ProviderKey(key, named if isinstance(named, str) else None)
        )
    return keys


def _pick(keys: KeySet, kid: str | None, algorithm: str) -> ProviderKey | None:
    """The key a token names; without a ``kid``, the only key that fits its algorithm."""
    named = keys.get(kid, []) if kid is not None else [k for ks in keys.values() for k in ks]
    fitting = [k for k in named if _fits(k, algorithm)]
    if len(fitting) == 1 or (kid is not None and fitting):
        return fitting[0]
    return None


def _fits(key: ProviderKey, algorithm: str) -> bool:
    if key.algorithm is not None:
        return key.algorithm == algorithm
    families = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}
    return algorithm.startswith(families.get(str(key.key.key_type), ()))
