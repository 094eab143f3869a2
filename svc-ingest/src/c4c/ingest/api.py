"""HTTP routes of the ingest service (thin: they call ``service``)."""

from fastapi import APIRouter

router = APIRouter(prefix="/ingest/v1", tags=["ingest"])
