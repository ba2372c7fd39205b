"""Order request and response bodies (SPEC §4)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, StringConstraints

from api.helpers.enums import OrderStatus
from api.schemas.text import WITHOUT_NUL

MAX_ITEMS = 100
MAX_QUANTITY = 10_000
MAX_UNIT_PRICE = 100_000_000
MAX_METADATA_KEYS = 20

Sku = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=WITHOUT_NUL)]
MetadataValue = Annotated[str, StringConstraints(max_length=500, pattern=WITHOUT_NUL)]
Quantity = Annotated[StrictInt, Field(ge=1, le=MAX_QUANTITY)]
UnitPrice = Annotated[StrictInt, Field(ge=0, le=MAX_UNIT_PRICE)]


class OrderItemCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    name: (
        Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=WITHOUT_NUL)] | None
    ) = None
    quantity: Quantity
    unit_price: UnitPrice = Field(description="Price of one unit in minor units (cents).")


# A storefront checkout: what Swagger UI fills in and what the OpenAPI document shows.
ORDER_CREATE_EXAMPLE: dict[str, JsonValue] = {
    "currency": "EUR",
    "items": [
        {
            "sku": "MUG-CERAMIC-350",
            "name": "Ceramic mug, 350 ml",
            "quantity": 2,
            "unit_price": 1250,
        },
        {"sku": "TEA-EARLGREY-100G", "name": "Earl Grey, 100 g", "quantity": 1, "unit_price": 699},
    ],
    "metadata": {"channel": "web", "cart_id": "c-20931"},
}


class OrderCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [ORDER_CREATE_EXAMPLE]}
    )

    currency: Currency = Field(description="ISO 4217 code, upper case.", examples=["EUR"])
    items: list[OrderItemCreate] = Field(min_length=1, max_length=MAX_ITEMS)
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_KEYS,
        # The key pattern renders as `patternProperties`; without this, keys outside it
        # (with a NUL) would be documented as allowed with any value.
        json_schema_extra={"additionalProperties": False},
    )


class OrderItemRead(BaseModel):
    # Field order is the order PostgreSQL's JSONB keeps item keys in (shortest key first),
    # so an order serialised from a row and from this model is the same bytes: a strong
    # ETag promises byte-identical representations.
    sku: str
    name: str | None
    quantity: int
    line_total: int
    unit_price: int


# The order ORDER_CREATE_EXAMPLE places, as the API answers it.
ORDER_READ_EXAMPLE: dict[str, JsonValue] = {
    "id": "3f1c9a6e-8d2b-4c55-9e1a-2b7d4f0c8a91",
    "user_id": "9b2e4d17-5c3a-4f8e-a6b1-0d9c7e3f2a54",
    "status": "pending",
    "currency": "EUR",
    "items": [
        {
            "sku": "MUG-CERAMIC-350",
            "name": "Ceramic mug, 350 ml",
            "quantity": 2,
            "line_total": 2500,
            "unit_price": 1250,
        },
        {
            "sku": "TEA-EARLGREY-100G",
            "name": "Earl Grey, 100 g",
            "quantity": 1,
            "line_total": 699,
            "unit_price": 699,
        },
    ],
    "total_amount": 3199,
    "metadata": {"channel": "web", "cart_id": "c-20931"},
    "version": 1,
    "created_at": "2026-11-22T14:05:12.345678Z",
    "updated_at": "2026-11-22T14:05:12.345678Z",
}


class OrderRead(BaseModel):
    """An order as clients and events see it; totals are computed by the server."""

    model_config = ConfigDict(
        from_attributes=True, json_schema_extra={"examples": [ORDER_READ_EXAMPLE]}
    )

    id: uuid.UUID
    user_id: uuid.UUID
    status: OrderStatus
    currency: str
    items: list[OrderItemRead]
    total_amount: int
    metadata: dict[str, str]
    version: int
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    model_config = ConfigDict(
        # The cursor is the position of the last item (created_at, id), as the API issues it.
        json_schema_extra={
            "examples": [
                {
                    "items": [ORDER_READ_EXAMPLE],
                    "next_cursor": "AAZg3fc-HE4_HJpujStMVZ4aK31PDIqRKkzm9A",
                }
            ]
        }
    )

    items: list[OrderRead]
    next_cursor: str | None = Field(description="Opaque; pass as `cursor` for the next page.")


class OrderStatusUpdate(BaseModel):
    """Admin PATCH body: move the order through the state machine."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"status": "paid"}]})

    status: OrderStatus
