"""HTTP routes of the video service (thin: they call ``service``)."""

from fastapi import APIRouter

router = APIRouter(prefix="/video/v1", tags=["video"])
