"""The gateway's own routes: the aggregated ``/health``, the suite's merged OpenAPI document
and its Swagger UI. Everything else goes to the proxy (a plain ASGI route, see ``app``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.responses import Response

from c4c.gateway._openapi import merged_openapi
from c4c.gateway._upstreams import Replica
from c4c.gateway.proxy import Proxy

router = APIRouter()


def _proxy(request: Request) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


@router.get("/health", tags=["gateway"], summary="Readiness of every service behind the gateway")
async def health(request: Request) -> Response:
    """Ready when every service has a ready replica; each replica's answer and breaker."""
    table = _proxy(request).table

    async def probe(prefix: str, replica: Replica) -> dict[str, Any]:
        state = replica.breaker.state.name.lower().replace("_", "-")
        try:
            status, _ = await replica.client.fetch_json(f"{prefix}/readyz", 5.0)
        except Exception as exc:
            return {"ready": False, "error": type(exc).__name__, "breaker": state}
        return {"ready": status == 200, "status": status, "breaker": state}

    async def service(prefix: str) -> tuple[str, dict[str, Any]]:
        replicas = table.services[prefix].replicas
        probes = await asyncio.gather(*(probe(prefix, r) for r in replicas))
        return prefix, {
            "ready": any(p["ready"] for p in probes),
            "replicas": {r.url: p for r, p in zip(replicas, probes, strict=True)},
        }

    results = dict(await asyncio.gather(*(service(p) for p in table.services)))
    ready = all(r["ready"] for r in results.values())
    return JSONResponse(
        {"status": "ready" if ready else "degraded", "upstreams": results},
        status_code=200 if ready else 503,
    )


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> Response:
    proxy = _proxy(request)
    own = request.app.openapi()
    return JSONResponse(await merged_openapi(own, proxy.table, proxy.identity.is_public))


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} — docs")
