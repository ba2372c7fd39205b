"""The redirect gateway's RabbitMQ messages (SPEC §9): the request it sends, the reply it takes."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Final, Literal, NotRequired, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from api.helpers.orjson_coder import dumps

BASE64: Final = "base64"

# RFC 9110 token characters for a field name.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Visible latin-1 and tab only: no CR/LF (response splitting) and nothing Starlette cannot encode.
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")


class RedirectUser(TypedDict):
    id: str
    role: str


class RedirectRequest(TypedDict):
    """The JSON body of a request message; `body_encoding` appears only for base64 bodies."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    body_encoding: NotRequired[Literal["base64"]]
    user: RedirectUser
    request_id: str


class RedirectReply(BaseModel):
    """A responder's answer; anything that does not fit is a 502 `bad-gateway`."""

    model_config = ConfigDict(extra="ignore")

    # A final HTTP response cannot be 1xx, so those are refused like any other bad status.
    status: Annotated[StrictInt, Field(ge=200, le=599)]
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    body: Any = None
    body_encoding: Literal["base64"] | None = None
    _content: bytes = PrivateAttr(default=b"")

    @field_validator("headers")
    @classmethod
    def _valid_fields(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
                raise ValueError("header names must be tokens and values single-line latin-1")
        return headers

    @model_validator(mode="after")
    def _encoded_body(self) -> RedirectReply:
        if self.body_encoding == BASE64:
            if not isinstance(self.body, str):
                raise ValueError("a base64 body must be a string")
            try:
                self._content = base64.b64decode(self.body, validate=True)
            except binascii.Error:
                raise ValueError("the body is not valid base64") from None
        elif self.body is not None:
            try:
                self._content = dumps(self.body)
            except TypeError:  # orjson refuses integers beyond 64 bits
                raise ValueError("the body cannot be encoded as JSON") from None
        return self

    @property
    def content(self) -> bytes:
        """The body as bytes: base64-decoded, JSON-encoded, or empty for null."""
        return self._content
