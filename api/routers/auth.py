"""Register, log in, rotate refresh tokens, log out and read the caller's account."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, status
from sqlalchemy.ext.asyncio import AsyncSession

from api.configs import Settings
from api.database.connection import SessionDep
from api.database.query import users as user_queries
from api.dependencies.caller import CurrentUser
from api.dependencies.limits import rate_limit
from api.errors import Conflict, Unauthorized
from api.helpers.auth import create_access_token, hash_refresh_token, new_refresh_token
from api.helpers.hashers import Verification, password_hashing
from api.media_types import JSONBodyRoute
from api.schemas.auth import (
    LoginRequest,
    RefreshRequest,
    RegisterRequest,
    TokenForm,
    TokenPair,
    UserRead,
)
from api.state import get_state

router = APIRouter(prefix="/v1/auth", tags=["auth"], route_class=JSONBodyRoute)
logger = logging.getLogger(__name__)

# One message for an unknown email and a wrong password: the body reveals nothing.
INVALID_CREDENTIALS = "Invalid email or password."
INVALID_REFRESH_TOKEN = "The refresh token is not valid."  # noqa: S105 (a message)

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"description": INVALID_CREDENTIALS}}


async def _authenticate(
    request: Request, session: AsyncSession, *, email: str, password: str
) -> uuid.UUID:
    """The id of the user whose email and password match, rehashing an outdated hash."""
    hashing = password_hashing(get_state(request)["settings"])
    credentials = await user_queries.get_credentials(session, email=email)
    # The read's transaction ends here: the pooled connection goes back before the
    # (possibly queued) argon2 verification, so a login burst cannot drain the pool.
    await session.commit()
    # An unknown email is verified against a dummy hash: same work, same answer.
    outcome = await hashing.verify(credentials.password_hash if credentials else None, password)
    if credentials is None or outcome is Verification.FAILED:
        raise Unauthorized(INVALID_CREDENTIALS)
    if outcome is Verification.OK_NEEDS_REHASH:
        await user_queries.replace_password_hash(
            session,
            user_id=credentials.user_id,
            old_hash=credentials.password_hash,
            new_hash=await hashing.hash(password),
        )
    request.scope["state"]["user_id"] = str(credentials.user_id)
    return credentials.user_id


async def _issue_tokens(
    session: AsyncSession,
    settings: Settings,
    *,
    user_id: uuid.UUID,
    family_id: uuid.UUID | None = None,
) -> TokenPair:
    """A new access token and a refresh token in `family_id` (a new family for a login)."""
    access_token, expires_in = create_access_token(settings, user_id=user_id)
    refresh_token, token_hash = new_refresh_token()
    await user_queries.insert_refresh_token(
        session,
        user_id=user_id,
        family_id=family_id or uuid.uuid4(),
        token_hash=token_hash,
        lifetime=timedelta(days=settings.JWT_REFRESH_LIFETIME_DAYS),
    )
    return TokenPair(access_token=access_token, refresh_token=refresh_token, expires_in=expires_in)


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "An account with this email already exists."}},
    dependencies=[rate_limit("auth")],
)
async def register(body: RegisterRequest, request: Request, session: SessionDep) -> UserRead:
    """Create an account; the email is stored lower-cased and can be registered once."""
    # Hash before the first query, so no pooled connection waits on argon2.
    password_hash = await password_hashing(get_state(request)["settings"]).hash(body.password)
    user = await user_queries.insert_user(
        session, email=body.email, password_hash=password_hash, name=body.name
    )
    if user is None:
        raise Conflict("An account with this email already exists.")
    request.scope["state"]["user_id"] = str(user.id)
    return UserRead.model_validate(user)


@router.post("/login", responses=_UNAUTHORIZED, dependencies=[rate_limit("auth")])
async def login(body: LoginRequest, request: Request, session: SessionDep) -> TokenPair:
    """Exchange email and password for a bearer access token and a refresh token."""
    user_id = await _authenticate(request, session, email=body.email, password=body.password)
    return await _issue_tokens(session, get_state(request)["settings"], user_id=user_id)


@router.post("/token", responses=_UNAUTHORIZED, dependencies=[rate_limit("auth")])
async def token(
    form: Annotated[TokenForm, Form()], request: Request, session: SessionDep
) -> TokenPair:
    """The OAuth2 password flow behind Swagger's Authorize button; `username` is the email."""
    user_id = await _authenticate(request, session, email=form.username, password=form.password)
    return await _issue_tokens(session, get_state(request)["settings"], user_id=user_id)


@router.post(
    "/refresh",
    responses={401: {"description": INVALID_REFRESH_TOKEN}},
    dependencies=[rate_limit("auth")],
)
async def refresh(body: RefreshRequest, request: Request, session: SessionDep) -> TokenPair:
    """Exchange a refresh token for a new pair; replaying a used one revokes its whole family."""
    token_hash = hash_refresh_token(body.refresh_token)
    family = await user_queries.spend_refresh_token(session, token_hash=token_hash)
    if family is not None:
        request.scope["state"]["user_id"] = str(family.user_id)
        return await _issue_tokens(
            session,
            get_state(request)["settings"],
            user_id=family.user_id,
            family_id=family.family_id,
        )
    revoked = await user_queries.revoke_family_of_spent_token(session, token_hash=token_hash)
    # Committed before the 401: raising would roll the family's revocation back.
    await session.commit()
    if revoked is not None:
        logger.warning(
            "refresh token reuse detected; token family revoked",
            extra={"user_id": str(revoked.user_id), "family_id": str(revoked.family_id)},
        )
    raise Unauthorized(INVALID_REFRESH_TOKEN)


@router.post(
    "/logout", status_code=status.HTTP_204_NO_CONTENT, dependencies=[rate_limit("default")]
)
async def logout(body: RefreshRequest, user: CurrentUser, session: SessionDep) -> None:
    """Revoke the family of one of the caller's refresh tokens.

    Always 204: an unknown, already revoked or someone else's token changes nothing, and
    the answer does not tell which it was.
    """
    await user_queries.revoke_family_of_user_token(
        session, token_hash=hash_refresh_token(body.refresh_token), user_id=user.id
    )


@router.get("/me", dependencies=[rate_limit("default")])
async def me(user: CurrentUser, session: SessionDep) -> UserRead:
    """The caller's account."""
    account = await user_queries.get_user(session, user_id=user.id)
    if account is None:  # deleted between the token check and this read
        raise Unauthorized("The access token is not valid.")
    return UserRead.model_validate(account)
