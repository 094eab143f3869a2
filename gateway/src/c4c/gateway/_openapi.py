"""One OpenAPI document for the whole suite: the gateway's own, plus every service's (each
serves it at ``<first prefix>/openapi.json``), with the credentials the gateway accepts.

Services' paths already carry their prefixes. Components with the same name and the same
definition (FastAPI's ``HTTPValidationError``…) are shared; a clash is renamed
``<service>_<name>`` in that service's part, references included.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from typing import Any

from c4c.gateway._clients import UpstreamError
from c4c.gateway._upstreams import RoutingTable, Upstream
from c4c.shared.auth import API_KEY_HEADER, API_KEY_QUERY

log = logging.getLogger("c4c.gateway.openapi")

SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
    "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": API_KEY_QUERY},
    "BearerToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def _fetch(prefix: str, upstream: Upstream) -> dict[str, Any] | None:
    for replica in upstream.replicas:
        try:
            status, document = await replica.client.fetch_json(f"{prefix}/openapi.json", 5.0)
        except UpstreamError:
            continue
        if status == 200 and isinstance(document, dict):
            return document
    log.warning("no OpenAPI document", extra={"service": upstream.name})
    return None


def _rewrite_refs(node: Any, renamed: dict[str, str]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref in renamed:
            return {**node, "$ref": renamed[ref]}
        return {key: _rewrite_refs(value, renamed) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(item, renamed) for item in node]
    return node


def _merge(merged: dict[str, Any], service: str, document: dict[str, Any]) -> None:
    components = merged.setdefault("components", {})
    renamed: dict[str, str] = {}
    for section, entries in document.get("components", {}).items():
        for name, definition in entries.items():
            existing = components.get(section, {}).get(name)
            if existing is not None and existing != definition:
                renamed[f"#/components/{section}/{name}"] = (
                    f"#/components/{section}/{service}_{name}"
                )
    document = _rewrite_refs(document, renamed)
    for section, entries in document.get("components", {}).items():
        target = components.setdefault(section, {})
        for name, definition in entries.items():
            new = f"#/components/{section}/{name}"
            target[renamed.get(new, new).rsplit("/", 1)[1]] = definition
    merged.setdefault("paths", {}).update(document.get("paths", {}))
    known = {tag["name"] for tag in merged.setdefault("tags", [])}
    merged["tags"] += [t for t in document.get("tags", []) if t.get("name") not in known]


async def merged_openapi(
    own: dict[str, Any], table: RoutingTable, is_public: Callable[[str], bool]
) -> dict[str, Any]:
    merged = copy.deepcopy(own)
    prefixes = list(table.services)
    documents = await asyncio.gather(*(_fetch(p, table.services[p]) for p in prefixes))
    missing = []
    for prefix, document in zip(prefixes, documents, strict=True):
        if document is None:
            missing.append(table.services[prefix].name)
        else:
            _merge(merged, table.services[prefix].name, document)
    merged.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    merged["security"] = [{name: []} for name in SECURITY_SCHEMES]
    gateway_paths = set(own.get("paths", {}))
    for path, operations in merged["paths"].items():
        if path in gateway_paths or is_public(path):
            for method, operation in operations.items():
                if method in _METHODS:
                    operation["security"] = []
    if missing:
        merged["x-unavailable-services"] = missing
    return merged
