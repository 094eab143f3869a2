"""The service app factory: problem documents for every error, request ids carried into
events, metrics by route template, body limits, and the operations endpoints."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from sqlalchemy.exc import TimeoutError as PoolTimeout

from c4c.shared.app import ServiceRuntime, create_service_app
from c4c.shared.bus import CloudEvent
from c4c.shared.db import SessionDep
from c4c.shared.http import BodyLimitMiddleware
from c4c.shared.problems import (
    PROBLEM_MEDIA_TYPE,
    Conflict,
    problem_response,
    validation_errors,
)
from c4c.shared.settings import ServiceSettings

LIMIT = 1024
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


class DemoSettings(ServiceSettings):
    service_name: ClassVar[str] = "demo"


class Item(BaseModel):
    name: str
    count: int


class ItemExists(Conflict):
    code = "item-exists"
    title = "The item exists already"


def demo_router() -> APIRouter:
    router = APIRouter()

    @router.post("/demo/v1/items", status_code=201)
    async def create_item(item: Item) -> Item:
        return item

    @router.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @router.get("/demo/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @router.get("/demo/v1/crowded")
    async def crowded() -> None:
        raise PoolTimeout("QueuePool limit of size 1 overflow 0 reached")

    @router.put("/demo/v1/items/{item_id}")
    async def conflict(item_id: int) -> None:
        raise ItemExists(f"Item {item_id} was created by someone else.", existing_id=item_id)

    @router.post("/demo/v1/things", status_code=202)
    async def make_thing(request: Request, session: SessionDep) -> dict[str, Any]:
        runtime: ServiceRuntime = request.app.state.runtime
        event = runtime.event("demo.thing.created", {"n": 1}, subject="thing-1")
        runtime.outbox.add(session, event)
        return {"event_id": event.id, "requestid": event.requestid}

    return router


def build_app(
    tmp_path: Path, received: list[CloudEvent] | None = None, **overrides: Any
) -> FastAPI:
    async def record(event: CloudEvent) -> None:
        if received is not None:
            received.append(event)

    settings = DemoSettings(
        data_dir=tmp_path, max_body_bytes=LIMIT, outbox_poll_interval=60, **overrides
    )
    return create_service_app(
        settings,
        title="Demo",
        description="A service made up for tests.",
        version="0.0.1",
        prefixes=("/demo",),
        routers=[demo_router()],
        consumers=lambda _: {"demo.#": record},
    )


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://demo.test")


@pytest.fixture
def received() -> list[CloudEvent]:
    return []


@pytest.fixture
async def client(tmp_path: Path, received: list[CloudEvent]) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(tmp_path, received)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str)
    assert body["type"]
    assert isinstance(body["title"], str)
    assert body["title"]
    return body


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    chunks: Iterable[bytes] = (),
) -> tuple[int, dict[str, str], bytes]:
    """Drive an ASGI app with a hand-made scope: headers exactly as given, nothing added."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("demo.test", 80),
    }
    pending = list(chunks) or [b""]
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(pending) - 1}
        for i, chunk in enumerate(pending)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    response_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], response_headers, body


# --- problem documents ---------------------------------------------------------------------


async def test_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/no/such/thing"), 404)
    assert body["instance"] == "/no/such/thing"


async def test_valid_body_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/demo/v1/items", json={"name": "oak", "count": 3})
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "oak", "count": 3}


async def test_malformed_json_is_a_422_problem_saying_so(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/demo/v1/items", content=b'{"name": "oak", ', headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 422)
    assert body["type"] == "urn:c4c:problem:validation-error"
    [error] = body["errors"]
    assert error["code"] == "json_invalid"
    assert "JSON" in error["detail"]


def test_invalid_json_names_its_offset_only_when_known() -> None:
    # pydantic's own JSON parsing (model_validate_json) gives no offset, only its message.
    errors = [
        {"type": "json_invalid", "loc": ("body", 16), "msg": "Expecting value"},
        {"type": "json_invalid", "loc": ("body",), "msg": "Invalid JSON: EOF at column 18"},
    ]
    details = [e["detail"] for e in validation_errors(errors)]
    assert details == [
        "The body is not valid JSON (Expecting value) at character 16.",
        "The body is not valid JSON (Invalid JSON: EOF at column 18).",
    ]


async def test_malformed_json_does_not_point_at_a_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/demo/v1/items", content=b'{"name": "oak", ', headers={"content-type": "application/json"}
    )
    [error] = assert_problem(response, 422)["errors"]
    assert error["field"] is None
    assert error["pointer"] in ("", "/")


async def test_wrong_field_type_names_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/demo/v1/items", json={"name": "oak", "count": "many"})
    body = assert_problem(response, 422)
    assert body["type"] == "urn:c4c:problem:validation-error"
    assert body["instance"] == "/demo/v1/items"
    assert "count" in body["detail"]
    [error] = body["errors"]
    assert error["field"] == "count"
    assert error["pointer"] == "/count"
    assert error["in"] == "body"
    assert error["code"] == "int_parsing"


async def test_problem_error_subclass_keeps_its_type_and_extensions(
    client: httpx.AsyncClient,
) -> None:
    body = assert_problem(await client.put("/demo/v1/items/7"), 409)
    assert body == {
        "type": "urn:c4c:problem:item-exists",
        "title": "The item exists already",
        "status": 409,
        "detail": "Item 7 was created by someone else.",
        "instance": "/demo/v1/items/7",
        "existing_id": 7,
    }


async def test_uncaught_exception_is_a_500_problem_that_leaks_nothing(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/demo/v1/boom", headers={"X-Request-ID": "trace-500"})
    body = assert_problem(response, 500)
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    assert response.headers["x-request-id"] == "trace-500"
    assert "trace-500" in body["detail"]


async def test_a_database_pool_exhausted_is_a_503_to_retry(client: httpx.AsyncClient) -> None:
    response = await client.get("/demo/v1/crowded")
    body = assert_problem(response, 503)
    assert body["type"] == "urn:c4c:problem:busy"
    assert response.headers["retry-after"] == "1"
    assert "QueuePool" not in response.text


# --- body limits ---------------------------------------------------------------------------


def item_body(size: int) -> bytes:
    """A valid item exactly ``size`` bytes long."""
    empty = json.dumps({"name": "", "count": 1}).encode()
    return json.dumps({"name": "x" * (size - len(empty)), "count": 1}).encode()


async def test_body_at_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    body = item_body(LIMIT)
    assert len(body) == LIMIT
    response = await client.post(
        "/demo/v1/items", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def test_content_length_over_the_limit_is_a_413_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/demo/v1/items", content=item_body(LIMIT + 1), headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 413)
    assert body["limit_bytes"] == LIMIT


async def test_chunked_body_over_the_limit_is_a_413_problem(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 200

    response = await client.post(
        "/demo/v1/items", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    body = assert_problem(response, 413)
    assert body["limit_bytes"] == LIMIT


async def test_chunked_body_under_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    payload = item_body(LIMIT)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100):
            yield payload[start : start + 100]

    response = await client.post(
        "/demo/v1/items", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def test_chunked_body_over_the_limit_stops_a_plain_asgi_app() -> None:
    async def read_all(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    app = BodyLimitMiddleware(read_all, max_bytes=LIMIT)
    chunked = [(b"transfer-encoding", b"chunked")]
    status, headers, body = await call_asgi(app, "POST", "/", chunked, [b"x" * 600] * 2)
    assert status == 413
    assert headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert json.loads(body)["limit_bytes"] == LIMIT
    status, _, body = await call_asgi(app, "POST", "/", chunked, [b"x" * 512] * 2)
    assert (status, body) == (200, b"read it all")


async def test_post_without_length_or_chunking_is_a_411_problem(tmp_path: Path) -> None:
    app = build_app(tmp_path)
    status, headers, body = await call_asgi(
        app, "POST", "/demo/v1/items", [(b"content-type", b"application/json")], [b"{}"]
    )
    assert status == 411
    assert headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert HEX_ID.match(headers["x-request-id"])
    assert json.loads(body)["type"] == "urn:c4c:problem:length-required"


async def test_get_without_length_is_fine(tmp_path: Path) -> None:
    status, _, body = await call_asgi(build_app(tmp_path), "GET", "/items/5")
    assert status == 200
    assert json.loads(body) == {"id": 5}


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"", b"\xb2", b"12 "])
async def test_non_numeric_content_length_is_a_400_problem(tmp_path: Path, length: bytes) -> None:
    status, headers, body = await call_asgi(
        build_app(tmp_path), "POST", "/demo/v1/items", [(b"content-length", length)], [b"{}"]
    )
    assert status == 400, body
    assert headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert json.loads(body)["status"] == 400


# --- request ids ---------------------------------------------------------------------------


async def test_request_id_sent_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/1", headers={"X-Request-ID": "abc-123.x:y@z"})
    assert response.headers["x-request-id"] == "abc-123.x:y@z"


async def test_missing_request_id_is_generated(client: httpx.AsyncClient) -> None:
    first = await client.get("/items/1")
    second = await client.get("/items/1")
    assert HEX_ID.match(first.headers["x-request-id"])
    assert HEX_ID.match(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "candidate",
    [b"two words", b"line\nbreak", b"crlf\r\nX-Evil: 1", b"a" * 500, b"", b"caf\xe9"],
    ids=["space", "newline", "crlf", "too-long", "empty", "non-ascii"],
)
async def test_unacceptable_request_id_is_replaced(tmp_path: Path, candidate: bytes) -> None:
    status, headers, _ = await call_asgi(
        build_app(tmp_path), "GET", "/items/1", [(b"x-request-id", candidate)]
    )
    assert status == 200
    assert HEX_ID.match(headers["x-request-id"])


async def test_longest_acceptable_request_id_is_kept(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/1", headers={"X-Request-ID": "r" * 128})
    assert response.headers["x-request-id"] == "r" * 128


async def test_event_made_during_a_request_carries_its_id(
    client: httpx.AsyncClient,
    received: list[CloudEvent],
    eventually: Callable[..., Any],
) -> None:
    response = await client.post("/demo/v1/things", headers={"X-Request-ID": "req-for-event"})
    assert response.status_code == 202, response.text
    assert response.json()["requestid"] == "req-for-event"
    event_id = response.json()["event_id"]
    # Committed with the request, relayed by the outbox, delivered by the bus.
    await eventually(lambda: any(e.id == event_id for e in received))
    [event] = [e for e in received if e.id == event_id]
    assert event.requestid == "req-for-event"
    assert event.source == "/c4c/demo"
    assert event.type == "demo.thing.created"


# --- metrics and operations ----------------------------------------------------------------


def request_counts(exposition: str) -> dict[tuple[str, str, str], float]:
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "c4c_http_requests_total" and sample.labels["service"] == "demo":
                key = (sample.labels["method"], sample.labels["route"], sample.labels["status"])
                counts[key] = sample.value
    return counts


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    before = request_counts((await client.get("/metrics")).text)
    assert (await client.get("/items/42")).status_code == 200
    assert (await client.get("/items/43")).status_code == 200
    assert (await client.get("/items/not-a-number")).status_code == 422
    assert (await client.get("/nowhere/42")).status_code == 404
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = request_counts(response.text)

    def delta(key: tuple[str, str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(("GET", "/items/{item_id}", "200")) == 2
    assert delta(("GET", "/items/{item_id}", "422")) == 1
    assert delta(("GET", "<unmatched>", "404")) == 1
    routes = {route for _, route, _ in after}
    assert not any(route.startswith(("/items/4", "/items/not", "/nowhere")) for route in routes)
    assert "c4c_http_request_duration_seconds" in response.text


@pytest.mark.parametrize("prefix", ["", "/demo"])
async def test_operations_endpoints_at_root_and_first_prefix(
    client: httpx.AsyncClient, prefix: str
) -> None:
    health = await client.get(f"{prefix}/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "alive", "service": "demo"}
    ready = await client.get(f"{prefix}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "service": "demo",
        "checks": {"database": True, "bus": True},
    }
    metrics = await client.get(f"{prefix}/metrics")
    assert metrics.status_code == 200
    assert "c4c_http_requests_total" in metrics.text
    openapi = await client.get(f"{prefix}/openapi.json")
    assert openapi.status_code == 200
    assert openapi.json()["info"]["title"] == "Demo"
    assert "/demo/v1/items" in openapi.json()["paths"]


async def test_readyz_is_a_503_problem_when_the_database_is_unreachable(tmp_path: Path) -> None:
    app = build_app(tmp_path, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nope")
    runtime: ServiceRuntime = app.state.runtime
    await runtime.bus.start()  # only the bus: migrations cannot run without a database
    try:
        async with client_for(app) as client:
            response = await client.get("/demo/readyz")
    finally:
        await runtime.bus.close(timeout=5)
        await runtime.db.dispose()
    body = assert_problem(response, 503)
    assert body["type"] == "urn:c4c:problem:not-ready"
    assert body["checks"] == {"database": False, "bus": True}
    assert "database" in body["detail"]


async def test_readyz_is_a_503_problem_before_the_runtime_starts(tmp_path: Path) -> None:
    app = build_app(tmp_path)
    async with client_for(app) as client:
        response = await client.get("/readyz")
    await app.state.runtime.db.dispose()
    body = assert_problem(response, 503)
    assert body["checks"]["bus"] is False


async def test_the_openapi_document_says_errors_are_problem_documents(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document == (await client.get("/demo/openapi.json")).json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    put = document["paths"]["/demo/v1/items/{item_id}"]["put"]["responses"]
    assert put["422"]["content"] == problem  # a bad item_id: as it is really answered
    assert put["4XX"]["content"] == problem
    assert "HTTPValidationError" not in document["components"]["schemas"]
    # And the 422 really is that document.
    answer = await client.put("/demo/v1/items/not-a-number")
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert set(document["components"]["schemas"]["Problem"]["required"]) <= answer.json().keys()


async def test_a_routers_routes_are_the_apps_own_and_nested_routers_still_serve(
    tmp_path: Path,
) -> None:
    flat = demo_router()
    nested, inner = APIRouter(prefix="/demo/v1"), APIRouter()

    @inner.get("/inner/{n}")
    async def get_inner(n: int) -> dict[str, int]:
        return {"n": n}

    nested.include_router(inner)
    settings = DemoSettings(data_dir=tmp_path, outbox_poll_interval=60)
    app = create_service_app(
        settings,
        title="Demo",
        description="Two routers.",
        version="0.0.1",
        prefixes=("/demo",),
        routers=[flat, nested],
    )
    # Matched once, as the app's own routes (an included router is matched twice), and
    # first: before the operations routes.
    assert app.router.routes[: len(flat.routes)] == flat.routes
    async with app.router.lifespan_context(app), client_for(app) as client:
        created = await client.post("/demo/v1/items", json={"name": "a", "count": 1})
        assert created.status_code == 201
        assert (await client.get("/demo/v1/inner/7")).json() == {"n": 7}
        assert (await client.get("/healthz")).status_code == 200
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/demo/v1/items", "/demo/v1/inner/{n}"} <= paths.keys()


async def test_periodic_work_runs_at_start_until_done_then_when_woken(
    tmp_path: Path, eventually: Any
) -> None:
    app = build_app(tmp_path)
    runtime: ServiceRuntime = app.state.runtime
    left = [3]  # items of work waiting; a pass does one and says whether more is left
    passes: list[int] = []

    async def work() -> bool:
        passes.append(left[0])
        if left[0]:
            left[0] -= 1
        return left[0] > 0

    wake = runtime.add_periodic("demo-work", work, interval=3600)
    async with app.router.lifespan_context(app):
        await eventually(lambda: passes == [3, 2, 1])  # at once, again while more was left
        left[0] = 1
        wake()  # well before the hour: what a request just made is done now
        await eventually(lambda: passes == [3, 2, 1, 1])


def test_a_problem_echoing_a_lone_surrogate_is_still_a_json_document() -> None:
    response = problem_response(422, detail="not a name: \ud800")
    assert response.status_code == 422
    assert json.loads(response.body)["detail"] == "not a name: \ud800"
