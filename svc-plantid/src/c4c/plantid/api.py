"""HTTP routes of the plantid service (thin: they call ``service``)."""

from fastapi import APIRouter

router = APIRouter(prefix="/plantid/v1", tags=["plantid"])
