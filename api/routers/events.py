"""The event contract as an AsyncAPI 3.0 document."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.asyncapi import asyncapi_document
from api.state import get_state

router = APIRouter(tags=["events"])


@router.get("/asyncapi.json", summary="AsyncAPI document of the order events")
async def asyncapi(request: Request) -> Response:
    """The AsyncAPI 3.0 document: event channels per routing key, the status queue, the DLQs."""
    document = asyncapi_document(get_state(request)["settings"])
    return Response(document, media_type="application/json")
