"""Auth request and response bodies (SPEC §4, auth rows)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from api.helpers.enums import UserRole
from api.schemas.text import WITHOUT_NUL

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 1024
REFRESH_TOKEN_MAX_LENGTH = 1024

# EmailStr normalises the domain; the unique index compares whole addresses, so lower-case all.
Email = Annotated[EmailStr, AfterValidator(str.lower)]
NewPassword = Annotated[
    str, StringConstraints(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)
]
# Login does not re-apply the registration policy, it only bounds the work a request may ask for.
GivenPassword = Annotated[str, StringConstraints(min_length=1, max_length=PASSWORD_MAX_LENGTH)]
RefreshTokenValue = Annotated[
    str, StringConstraints(min_length=1, max_length=REFRESH_TOKEN_MAX_LENGTH)
]


def _trimmed_or_none(name: str) -> str | None:
    # Trimmed after validation: a name of only whitespace is no name, not a 422 that the
    # documented schema (1-200 characters) would not predict.
    return name.strip() or None


EXAMPLE_EMAIL = "ada@example.com"
EXAMPLE_PASSWORD = "correct horse battery staple"  # noqa: S105 (documentation example)
# An opaque refresh token as login returns it (43 URL-safe characters, 256 bits).
EXAMPLE_REFRESH_TOKEN = "Zr7Kq0pX2m9bV4tYcN8sWf1uJh6LdA3eGi5oQkRyTxE"  # noqa: S105
# The shape of an access token (header.claims.signature); this one verifies nowhere.
EXAMPLE_ACCESS_TOKEN = ".".join(
    (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
        "eyJzdWIiOiI5YjJlNGQxNy01YzNhLTRmOGUtYTZiMS0wZDljN2UzZjJhNTQiLCJ0eXAiOiJhY2Nlc3MifQ",
        "3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"email": EXAMPLE_EMAIL, "password": EXAMPLE_PASSWORD, "name": "Ada Lovelace"}
            ]
        },
    )

    email: Email = Field(examples=["ada@example.com"])
    password: NewPassword = Field(description="8 to 1024 characters.")
    name: (
        Annotated[
            str,
            StringConstraints(min_length=1, max_length=200, pattern=WITHOUT_NUL),
            AfterValidator(_trimmed_or_none),
        ]
        | None
    ) = None


class LoginRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"email": EXAMPLE_EMAIL, "password": EXAMPLE_PASSWORD}]},
    )

    email: Email = Field(examples=["ada@example.com"])
    password: GivenPassword


class RefreshRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"refresh_token": EXAMPLE_REFRESH_TOKEN}]},
    )

    refresh_token: RefreshTokenValue


class UserRead(BaseModel):
    """A user as `/v1/auth/me` and registration show it."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "9b2e4d17-5c3a-4f8e-a6b1-0d9c7e3f2a54",
                    "email": EXAMPLE_EMAIL,
                    "name": "Ada Lovelace",
                    "role": "user",
                    "created_at": "2026-11-22T13:48:27.337576Z",
                }
            ]
        },
    )

    id: uuid.UUID
    email: str
    name: str | None
    role: UserRole
    created_at: datetime


class TokenPair(BaseModel):
    """A bearer access token and the opaque refresh token that renews it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "access_token": EXAMPLE_ACCESS_TOKEN,
                    "refresh_token": EXAMPLE_REFRESH_TOKEN,
                    "token_type": "bearer",
                    "expires_in": 900,
                }
            ]
        }
    )

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth2 token type)
    expires_in: int = Field(description="Seconds until the access token expires.")


class TokenForm(BaseModel):
    """The OAuth2 password grant form (`username` is the email); client fields are ignored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"grant_type": "password", "username": EXAMPLE_EMAIL, "password": EXAMPLE_PASSWORD}
            ]
        }
    )

    grant_type: Literal["password"] | None = None
    username: Email
    password: GivenPassword
    scope: str = ""
