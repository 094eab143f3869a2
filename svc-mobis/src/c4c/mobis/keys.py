"""The key access tokens are signed with, its public half as a JWKS (what the gateway
verifies tokens against), and the tokens themselves.

The key comes from the ``signing_key`` setting, else from ``<data_dir>/mobis-signing-key.pem``
(mode 600), generated on first start: Ed25519, so tokens are signed ``EdDSA``. An RSA key
given by setting signs ``RS256``. The ``kid`` is the key's RFC 7638 thumbprint, so replicas
sharing a key agree on it without configuration.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from c4c.mobis.settings import MobisSettings

KEY_FILE = "mobis-signing-key.pem"
PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(key: PrivateKey) -> dict[str, str]:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
    numbers = public.public_numbers()
    return {
        "kty": "RSA",
        "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": _b64(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
    required = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _load_pem(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ValueError("an RSA signing key needs at least 2048 bits")
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the signing key must be Ed25519 or RSA")
    return key


def _key_from_file(path: Path) -> PrivateKey:
    """The key in ``path``, made (mode 600) when missing; a replica that loses the race to
    create it reads the winner's."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
            return key
    return _load_pem(path.read_bytes())


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int


class Signer:
    def __init__(self, key: PrivateKey, *, issuer: str, audience: str, lifetime: int) -> None:
        self.key = key
        self.algorithm = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "RS256"
        self.public_key = key.public_key()
        public = _public_jwk(key)
        self.kid = thumbprint(public)
        self.jwk = public | {"kid": self.kid, "alg": self.algorithm, "use": "sig"}
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime

    @classmethod
    def from_settings(cls, settings: MobisSettings) -> Signer:
        if settings.signing_key is not None:
            key = _load_pem(settings.signing_key.get_secret_value().encode())
        else:
            key = _key_from_file(settings.data_dir / KEY_FILE)
        return cls(
            key,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            lifetime=settings.access_token_seconds,
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def access_token(
        self, user_id: str, name: str, scope: str, *, session: str, auth_time: int | None
    ) -> IssuedToken:
        """``session`` is the refresh-token family (``sid``); ``auth_time`` (OpenID Connect's
        claim) when the user last really authenticated, unchanged by refreshes."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "name": name,
            "scope": scope,
            "sid": session,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": str(uuid.uuid4()),
        }
        if auth_time is not None:
            claims["auth_time"] = auth_time
        token = jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.kid})
        return IssuedToken(token, self.lifetime)

    def claims(self, token: str) -> dict[str, Any] | None:
        """The claims of an access token this key signed, unexpired; None otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.public_key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["sub", "iat", "exp"]},
            )
        except jwt.PyJWTError:
            return None
        return claims
