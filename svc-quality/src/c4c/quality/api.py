"""HTTP routes of the quality service (thin: they call ``service``)."""

from fastapi import APIRouter

router = APIRouter(prefix="/quality/v1", tags=["quality"])
