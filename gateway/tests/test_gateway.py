"""The gateway: every installed service embedded behind one front door, and the streaming
reverse proxy it uses for them and for remote upstreams alike."""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.context import request_id_var
from c4c.shared.http import BodyLimitMiddleware

SERVICES = {"/ingest": "ingest", "/quality": "quality", "/video": "video"}
SERVICES |= {"/plantid": "plantid", "/mobis": "mobis"}
FIVE_MB = 5 * 1024 * 1024


# --- embedded mode -------------------------------------------------------------------------


@pytest.fixture
async def embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    # Quality is ready only once its taxonomy is loaded, which these tests do not need.
    monkeypatch.setenv("C4C_QUALITY_PRELOAD", "false")
    app = create_app(GatewaySettings(data_dir=tmp_path))
    async with app.router.lifespan_context(app):
        # The first embedded start made a development key with every scope.
        dev_key = (tmp_path / "dev-api-key").read_text().strip()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        headers = {"X-API-Key": dev_key}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway.test", headers=headers
        ) as client:
            yield client


async def test_embedded_health_lists_every_service_ready(
    embedded: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await embedded.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["upstreams"]) == set(SERVICES)
    for prefix, service in SERVICES.items():
        assert body["upstreams"][prefix] == {
            "ready": True,
            "replicas": {
                f"http://{service}.embedded": {"ready": True, "status": 200, "breaker": "closed"}
            },
        }
    for name in [*SERVICES.values(), "gateway"]:
        assert (tmp_path / f"{name}.db").is_file(), name


@pytest.mark.parametrize(("prefix", "service"), SERVICES.items())
async def test_embedded_service_health_through_its_prefix(
    embedded: httpx.AsyncClient, prefix: str, service: str
) -> None:
    response = await embedded.get(f"{prefix}/healthz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "alive", "service": service}
    ready = await embedded.get(f"{prefix}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": True, "bus": True}


async def test_embedded_gateway_serves_its_own_operations(embedded: httpx.AsyncClient) -> None:
    response = await embedded.get("/healthz")
    assert response.json() == {"status": "alive", "service": "gateway"}
    assert (await embedded.get("/readyz")).status_code == 200
    openapi = await embedded.get("/openapi.json")
    assert openapi.json()["info"]["title"] == "Cos4Cloud API gateway"


async def test_embedded_services_take_bodies_as_large_as_they_accept(
    embedded: httpx.AsyncClient, test_data: Path, assert_problem: Callable[..., Any]
) -> None:
    """Ingest takes media far above the gateway's own 10 MB default: the gateway applies
    the limit of the service behind the prefix."""
    photo = (test_data / "plants" / "Anemone_nemorosa" / "image_1206.jpg").read_bytes()
    padded = photo + bytes(11 * 1024 * 1024)  # after the image's end: still a valid JPEG
    body = {"datasetID": "natusfera", "eventDate": "2024-05-03", "recordedBy": "ana"}
    body |= {"decimalLatitude": 41.4, "decimalLongitude": 2.1, "license": "CC-BY"}
    created = await embedded.post("/ingest/v1/observations", json=body)
    assert created.status_code == 201, created.text
    media = f"/ingest/v1/observations/{created.json()['id']}/media"
    uploaded = await embedded.post(media, content=padded, headers={"Content-Type": "image/jpeg"})
    assert uploaded.status_code == 201, uploaded.text
    too_large = await embedded.post(
        "/ingest/v1/observations", content=b" " * (11 * 1024 * 1024)
    )  # the JSON routes keep the default
    assert_problem(too_large, 413)


async def test_embedded_unknown_prefix_is_a_404_problem(
    embedded: httpx.AsyncClient, assert_problem: Callable[..., Any]
) -> None:
    body = assert_problem(await embedded.get("/nowhere/v1/things"), 404)
    assert body["type"] == "urn:c4c:problem:not-found"
    assert "/nowhere/v1/things" in body["detail"]


async def test_a_known_path_with_another_method_is_a_405_naming_the_allowed_ones(
    embedded: httpx.AsyncClient, assert_problem: Callable[..., Any]
) -> None:
    own = await embedded.put("/health")
    proxied = await embedded.post("/mobis/v1/me/notifications")
    for answer in (own, proxied):
        assert_problem(answer, 405)
        assert answer.headers["allow"] == "GET"


async def test_embedded_unknown_route_of_a_service_is_its_404_problem(
    embedded: httpx.AsyncClient, assert_problem: Callable[..., Any]
) -> None:
    body = assert_problem(await embedded.get("/ingest/no-such-route"), 404)
    assert body["instance"] == "/ingest/no-such-route"


class RequestIdsLogged(logging.Handler):
    """The request id in hand when each access-log line is written: the gateway's and the
    embedded service's middleware each write one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str | None, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((getattr(record, "path", None), request_id_var.get()))


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[RequestIdsLogged]:
    caplog.set_level(logging.INFO, logger="c4c.http")
    handler = RequestIdsLogged()
    logger = logging.getLogger("c4c.http")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_embedded_request_id_reaches_the_service_and_comes_back(
    embedded: httpx.AsyncClient, access_log: RequestIdsLogged
) -> None:
    response = await embedded.get("/quality/healthz", headers={"X-Request-ID": "gw-trace-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "gw-trace-1"
    assert response.headers.get_list("x-request-id") == ["gw-trace-1"]
    ids = [rid for path, rid in access_log.seen if path == "/quality/healthz"]
    assert ids == ["gw-trace-1", "gw-trace-1"]  # the service's line, then the gateway's


async def test_embedded_generated_request_id_is_the_services_too(
    embedded: httpx.AsyncClient, access_log: RequestIdsLogged
) -> None:
    response = await embedded.get("/mobis/healthz")
    generated = response.headers["x-request-id"]
    ids = [rid for path, rid in access_log.seen if path == "/mobis/healthz"]
    assert ids == [generated, generated]


# --- the proxy, against a real HTTP upstream ------------------------------------------------


@pytest.fixture
async def proxied(open_gateway: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with open_gateway() as (_, client):
        yield client


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_proxy_forwards_method_path_and_query(
    proxied: httpx.AsyncClient, method: str
) -> None:
    response = await proxied.request(method, "/echo/a/b?x=1&y=%C3%A9&y=2&empty=")
    assert response.status_code == 200, response.text
    assert response.headers["x-upstream"] == "echo"
    answer = response.json()
    assert answer["method"] == method
    assert answer["path"] == "/echo/a/b"
    assert answer["query"] == "x=1&y=%C3%A9&y=2&empty="


async def test_proxy_passes_the_upstreams_status_through(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/teapot")
    assert response.status_code == 418
    assert response.json()["path"] == "/echo/teapot"


async def test_proxy_streams_a_large_request_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    response = await proxied.post("/echo/upload", content=big_body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["body_length"] == FIVE_MB
    assert answer["body_sha256"] == hashlib.sha256(big_body).hexdigest()


async def test_proxy_streams_a_large_chunked_request_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big_body), 100_000):
            yield big_body[start : start + 100_000]

    response = await proxied.put("/echo/upload", content=chunks())
    assert response.request.headers["transfer-encoding"] == "chunked"
    answer = response.json()
    assert answer["body_length"] == FIVE_MB
    assert answer["body_sha256"] == hashlib.sha256(big_body).hexdigest()


async def test_proxy_streams_a_large_response_body_intact(
    proxied: httpx.AsyncClient, big_body: bytes
) -> None:
    async with proxied.stream("GET", f"/echo/big?size={FIVE_MB}") as response:
        assert response.status_code == 200
        digest, length = hashlib.sha256(), 0
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            length += len(chunk)
    assert length == FIVE_MB
    assert digest.hexdigest() == hashlib.sha256(big_body).hexdigest()


async def test_proxy_drops_hop_by_hop_request_headers(
    proxied: httpx.AsyncClient, echo_url: str, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get(
        "/echo/headers",
        headers={
            "Connection": "close",
            "Keep-Alive": "timeout=5, max=100",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Kept": "yes",
        },
    )
    received = received_headers(response)
    for hop in ("keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
        assert hop not in received, hop
    # The proxy's own client speaks keep-alive to the upstream; the caller's "close" stays out.
    assert "close" not in ",".join(received.get("connection", [])).lower()
    assert received["x-kept"] == ["yes"]
    assert received["host"] == [echo_url.removeprefix("http://")]  # the upstream's, not ours


async def test_proxy_drops_headers_named_in_connection(
    proxied: httpx.AsyncClient, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get(
        "/echo/headers", headers={"Connection": "X-Hop-Secret", "X-Hop-Secret": "internal"}
    )
    assert "x-hop-secret" not in received_headers(response)


async def test_proxy_drops_hop_by_hop_response_headers(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/headers")
    assert "keep-alive" not in response.headers
    assert response.headers["x-upstream"] == "echo"


async def test_proxy_keeps_repeated_set_cookie_headers_apart(proxied: httpx.AsyncClient) -> None:
    response = await proxied.get("/echo/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert set(response.cookies.keys()) == {"a", "b"}


async def test_proxy_sets_forwarding_headers(
    proxied: httpx.AsyncClient, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get("/echo/who")
    received = received_headers(response)
    assert received["x-forwarded-for"] == ["127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]
    assert received["x-forwarded-host"] == ["gateway.test"]


async def test_proxy_ignores_forwarding_headers_of_an_untrusted_caller(
    proxied: httpx.AsyncClient, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get(
        "/echo/who",
        headers={
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "spoofed.example",
        },
    )
    received = received_headers(response)
    assert received["x-forwarded-for"] == ["127.0.0.1"]  # the caller cannot pick its address
    assert received["x-forwarded-proto"] == ["http"]  # nor claim TLS
    assert received["x-forwarded-host"] == ["gateway.test"]


@pytest.mark.parametrize(
    ("trusted", "sent", "chain"),
    [
        # The peer (127.0.0.1) is a trusted proxy: the hop it saw is the client.
        (["127.0.0.1/32"], "203.0.113.7", "203.0.113.7, 127.0.0.1"),
        # Spoofed hops before the first untrusted one are dropped.
        (["127.0.0.1/32"], "198.51.100.1, 203.0.113.7", "203.0.113.7, 127.0.0.1"),
        # Two trusted proxies in a row: the walk goes on to the address before them.
        (
            ["127.0.0.1/32", "10.0.0.0/8"],
            "203.0.113.7, 10.1.2.3",
            "203.0.113.7, 10.1.2.3, 127.0.0.1",
        ),
    ],
)
async def test_proxy_believes_forwarding_headers_of_trusted_proxies_only(
    open_gateway: Callable[..., Any],
    trusted: list[str],
    sent: str,
    chain: str,
    received_headers: Callable[..., Any],
) -> None:
    async with open_gateway(trusted_proxies=trusted) as (_, client):
        response = await client.get(
            "/echo/who", headers={"X-Forwarded-For": sent, "X-Forwarded-Proto": "https"}
        )
    received = received_headers(response)
    assert received["x-forwarded-for"] == [chain]
    assert received["x-forwarded-proto"] == ["https"]  # TLS ended at the trusted proxy


async def test_proxy_passes_the_request_id_to_the_upstream(
    proxied: httpx.AsyncClient, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get("/echo/id", headers={"X-Request-ID": "trace-through-proxy"})
    assert response.headers.get_list("x-request-id") == ["trace-through-proxy"]
    assert received_headers(response)["x-request-id"] == ["trace-through-proxy"]


async def test_proxy_passes_a_generated_request_id_to_the_upstream(
    proxied: httpx.AsyncClient, received_headers: Callable[..., Any]
) -> None:
    response = await proxied.get("/echo/id", headers={"X-Request-ID": "not acceptable"})
    generated = response.headers["x-request-id"]
    assert generated != "not acceptable"
    assert received_headers(response)["x-request-id"] == [generated]


@pytest.mark.parametrize("segment", ["a%2Fb", "%2541"])
async def test_proxy_keeps_encoded_path_characters(
    proxied: httpx.AsyncClient, segment: str
) -> None:
    response = await proxied.get(f"/echo/{segment}")
    assert response.status_code == 200, response.text
    assert response.json()["raw_path"] == f"/echo/{segment}"


async def test_proxy_answers_502_when_the_upstream_is_down(
    open_gateway: Callable[..., Any], assert_problem: Callable[..., Any]
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with open_gateway(upstreams={"/down": [url]}) as (_, client):
            response = await client.get("/down/anything", headers={"X-Request-ID": "down-1"})
            health = await client.get("/health")
    body = assert_problem(response, 502)
    assert body["type"] == "urn:c4c:problem:bad-gateway"
    assert body["instance"] == "/down/anything"
    assert response.headers["x-request-id"] == "down-1"
    assert health.status_code == 503
    assert health.json()["upstreams"]["/down"]["ready"] is False


# --- docs, limits, CORS ---------------------------------------------------------------------


async def test_embedded_openapi_merges_every_services_document(
    embedded: httpx.AsyncClient,
) -> None:
    merged = (await embedded.get("/openapi.json")).json()
    assert merged["info"]["title"] == "Cos4Cloud API gateway"
    assert "x-unavailable-services" not in merged
    assert set(merged["components"]["securitySchemes"]) == {
        "ApiKeyHeader",
        "ApiKeyQuery",
        "BearerToken",
    }
    assert merged["paths"]["/health"]["get"]["security"] == []
    for prefix in SERVICES:
        own = (await embedded.get(f"{prefix}/openapi.json")).json()
        assert set(own["paths"]) <= set(merged["paths"]), prefix
    docs = await embedded.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text


async def test_a_proxied_prefix_takes_the_upstreams_limit_unless_a_route_sets_one(
    open_gateway: Callable[..., Any],
    serve_on_loopback: Callable[[Any], Any],
    echo_url: str,
    big_body: bytes,
    assert_problem: Callable[..., Any],
) -> None:
    """C4C_MAX_BODY_BYTES is the gateway's own: a proxied body goes on (streamed) for the
    upstream to judge, and its 413 comes back as it said it."""

    async def accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = BodyLimitMiddleware(accept, max_bytes=FIVE_MB // 2)
    async with serve_on_loopback(limited) as small_url:
        upstreams = {"/echo": [echo_url], "/small": [small_url]}
        routes = {"/echo/capped": {"max_body_bytes": 1024}}
        async with open_gateway(max_body_bytes=1024, routes=routes, upstreams=upstreams) as (
            _,
            client,
        ):
            passed = await client.post("/echo/upload", content=big_body)
            capped = await client.post("/echo/capped/1", content=b"x" * 2048)
            refused = await client.post("/small/upload", content=big_body)
            unsized = await client.post("/echo/upload", headers={"Content-Length": ""})
    assert passed.status_code == 200, passed.text
    assert passed.json()["body_length"] == FIVE_MB
    assert assert_problem(capped, 413)["limit_bytes"] == 1024
    assert assert_problem(refused, 413)["limit_bytes"] == FIVE_MB // 2
    assert unsized.status_code in (400, 411)


async def test_cors_allows_the_listed_origins_only(open_gateway: Callable[..., Any]) -> None:
    async with open_gateway(cors_origins=["https://app.example.org"]) as (_, client):
        allowed = await client.options(
            "/echo/x",
            headers={
                "Origin": "https://app.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )
        other = await client.get("/echo/x", headers={"Origin": "https://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.org"
    assert "access-control-allow-origin" not in other.headers
