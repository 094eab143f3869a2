"""The gateway's own routes: the aggregated ``/health``, and everything else proxied."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from c4c.gateway.proxy import Upstreams, forward

router = APIRouter()

_PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _upstreams(request: Request) -> Upstreams:
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams


@router.get("/health", tags=["gateway"], summary="Readiness of every service behind the gateway")
async def health(request: Request) -> Response:
    upstreams = _upstreams(request)

    async def probe(prefix: str) -> tuple[str, dict[str, Any]]:
        _, client = upstreams.pick(prefix)
        try:
            answer = await client.get(f"{prefix}/readyz", timeout=5.0)
        except Exception as exc:
            return prefix, {"ready": False, "error": type(exc).__name__}
        return prefix, {"ready": answer.status_code == 200, "status": answer.status_code}

    results = dict(await asyncio.gather(*(probe(p) for p in upstreams.services)))
    ready = all(r["ready"] for r in results.values())
    return JSONResponse(
        {"status": "ready" if ready else "degraded", "upstreams": results},
        status_code=200 if ready else 503,
    )


@router.api_route("/{path:path}", methods=_PROXIED_METHODS, include_in_schema=False)
async def proxy(request: Request) -> Response:
    _, client = _upstreams(request).pick(request.url.path)
    return await forward(request, client)
