"""Tokens: access JWTs (PyJWT, one explicit algorithm, required claims), bearer parsing,
refresh tokens and `Principal`.

Pure: no request, no database. The dependencies that read a request and the user row
live at the edge, in `api/dependencies/caller.py`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from api.configs import Settings
from api.errors import Unauthorized
from api.helpers.enums import UserRole

ISSUER = "orders-api"
AUDIENCE = "orders-api"
ACCESS = "access"
REQUIRED_CLAIMS = ["sub", "exp", "iat", "nbf", "jti", "iss", "aud", "typ"]
REFRESH_TOKEN_BYTES = 32


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, as FastAPI's OAuth2 scheme does."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user id and the role the database holds now."""

    id: uuid.UUID
    role: UserRole

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN


def create_access_token(
    settings: Settings, *, user_id: uuid.UUID, now: datetime | None = None
) -> tuple[str, int]:
    """A signed access token and its lifetime in seconds."""
    now = now or datetime.now(UTC)
    lifetime = timedelta(minutes=settings.JWT_LIFETIME)
    claims = {
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "typ": ACCESS,
    }
    token = jwt.encode(
        claims, settings.JWT_SECRET_KEY.get_secret_value(), algorithm=settings.JWT_ALGORITHM
    )
    return token, int(lifetime.total_seconds())


# Tokens whose signature and claims were already checked: (secret, algorithm, token) ->
# (user id, nbf, exp). A hit re-checks only the time window, so a busy client's
# token is verified once, not on every request; bounded, least recently used out.
_VERIFIED: OrderedDict[tuple[str, str, str], tuple[uuid.UUID, float, float]] = OrderedDict()
_VERIFIED_MAX = 4096


def decode_access_token(settings: Settings, token: str) -> uuid.UUID:
    """The user id of a valid access token; anything else is `Unauthorized`."""
    key = (settings.JWT_SECRET_KEY.get_secret_value(), settings.JWT_ALGORITHM, token)
    known = _VERIFIED.get(key)
    if known is not None:
        user_id, not_before, expires = known
        if not_before <= time.time() < expires:
            _VERIFIED.move_to_end(key)
            return user_id
        del _VERIFIED[key]
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.JWT_SECRET_KEY.get_secret_value(),
            # Exactly one algorithm: `none` and HS/RS confusion are refused by construction.
            algorithms=[settings.JWT_ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The access token has expired.") from None
    except jwt.PyJWTError:
        raise Unauthorized("The access token is not valid.") from None
    if claims.get("typ") != ACCESS:
        raise Unauthorized("The access token is not valid.")
    try:
        user_id = uuid.UUID(str(claims["sub"]))
        window = (float(claims["nbf"]), float(claims["exp"]))
    except (TypeError, ValueError):
        raise Unauthorized("The access token is not valid.") from None
    _VERIFIED[key] = (user_id, *window)
    if len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return user_id


def new_refresh_token() -> tuple[str, bytes]:
    """A fresh opaque refresh token and the digest the database stores for it."""
    token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> bytes:
    """The SHA-256 digest under which a refresh token is stored and looked up."""
    # 256 random bits need no slow hash: a leaked table stays useless, lookups stay cheap.
    return hashlib.sha256(token.encode()).digest()
