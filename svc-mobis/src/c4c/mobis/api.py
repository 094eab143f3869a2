"""HTTP routes of the mobis service (thin: they call ``service``)."""

from fastapi import APIRouter

router = APIRouter(prefix="/mobis/v1", tags=["mobis"])
