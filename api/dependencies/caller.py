"""Who is calling: the bearer token's subject, the user row behind it, the admin."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from api.database.connection import SessionDep
from api.database.query import users as user_queries
from api.errors import Forbidden, Unauthorized
from api.helpers.auth import Principal, decode_access_token, parse_bearer
from api.helpers.enums import UserRole
from api.state import get_state

# auto_error=False: our own 401 problem (with WWW-Authenticate) instead of FastAPI's.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/v1/auth/token", auto_error=False)
# `oauth2_scheme` as an operation's OpenAPI `security`, for routes that read the token
# with `bearer_token` instead of a dependency.
BEARER_SECURITY: list[dict[str, list[str]]] = [{"OAuth2PasswordBearer": []}]


def bearer_token(request: Request) -> str | None:
    """The `Authorization: Bearer` token, as `oauth2_scheme` reads it.

    The cached order reads call this instead of depending on the scheme: on a cache
    hit, FastAPI's dependency solving would cost more than the rest of the request.
    """
    return parse_bearer(request.headers.get("authorization"))


def token_subject(request: Request, token: str | None) -> uuid.UUID:
    """The user id a valid access token names (no database read), noted for the log line."""
    if not token:
        raise Unauthorized("Missing bearer token.")
    user_id = decode_access_token(get_state(request)["settings"], token)
    request.scope["state"]["user_id"] = str(user_id)
    return user_id


async def get_current_user(
    request: Request,
    session: SessionDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> Principal:
    """The caller of a valid access token whose user still exists."""
    user_id = token_subject(request, token)
    role = await user_queries.get_user_role(session, user_id=user_id)
    if role is None:
        raise Unauthorized("The access token is not valid.")
    return Principal(id=user_id, role=UserRole(role))


async def require_admin(user: Annotated[Principal, Depends(get_current_user)]) -> Principal:
    """The caller, when the database says they are an admin."""
    if not user.is_admin:
        raise Forbidden("This operation needs the admin role.")
    return user


CurrentUser = Annotated[Principal, Depends(get_current_user)]
AdminUser = Annotated[Principal, Depends(require_admin)]
