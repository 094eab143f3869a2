"""Observation ingestion: single ``POST /ingest/v1/observations`` (rate, p50, p99) and
``POST /observations:batch`` (observations/s), on SQLite and on PostgreSQL, against a bare
FastAPI endpoint that only parses the same pydantic model, measured in the same run; and
media uploads (``POST /observations/{id}/media``, a ~15 KB 320x240 JPEG) against a bare
endpoint that streams the same body to a file and fsyncs it.

Every variant is driven the same way: in process through httpx's ASGI transport (no
sockets, so the figures are the service's own cost), ``CONCURRENCY`` requests in flight.
The service runs whole: request ids, metrics, problem handlers, the database transaction
and the outbox row per observation, with the relay publishing to the in-process bus.

Besides the rates, the details give the CPU time this process spent per request (single) or
per observation (batch) while the round ran, relay passes included (and the client's share,
as for the bare endpoint): on a shared machine the rates follow the load, this much less.
PostgreSQL's own CPU is not in it. After each round the service's outbox is left to empty,
untimed: the relay of a batch round's 20,000 events took seconds, and was charged to
whichever round ran next (often the other database's single round), its CPU and its rate.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from PIL import Image
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench._core import Context, Result, ServiceUnavailable, median
from c4c.ingest.app import create_app
from c4c.ingest.schemas import ObservationCreate
from c4c.ingest.settings import IngestSettings

SUITE = "ingest"
CONCURRENCY = 16
SINGLE, SINGLE_QUICK = 2000, 200
BATCHES, BATCHES_QUICK = 20, 3
BATCH_SIZE = 1000
ROUNDS, ROUNDS_QUICK = 3, 1
UPLOADS, UPLOADS_QUICK = 200, 50
UPLOAD_CONCURRENCY = 8  # as the MOBIS benchmark sends them
SINGLE_TARGET = 0.5  # of the bare FastAPI rate
BATCH_TARGET = 20_000.0  # observations/s on PostgreSQL
POSTGRES_URL = os.environ.get(
    "C4C_BENCH_POSTGRES_URL",
    os.environ.get("C4C_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
)
BARE = "bare FastAPI"

log = logging.getLogger("bench.ingest")


def body(i: int) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "datasetID": "bench",
        "recordedBy": f"user-{i % 50}",
        "eventDate": "2024-05-03T10:15:00+02:00",
        "decimalLatitude": 41.38 + i * 1e-6,
        "decimalLongitude": 2.17 - i * 1e-6,
        "coordinateUncertaintyInMeters": 10.0,
        "countryCode": "ES",
        "scientificName": "Quercus ilex",
        "taxonRank": "species",
        "license": "CC-BY",
        "measurements": [
            {"measurementType": "height", "measurementValue": 3.5, "measurementUnit": "m"}
        ],
    }


def photo() -> bytes:
    """A 320x240 JPEG of about 15 KB (a gradient with noise: a flat image would be 2 KB)."""
    gradient = Image.linear_gradient("L").resize((320, 240))
    noise = Image.effect_noise((320, 240), 13)
    image = Image.merge("RGB", (gradient, noise, Image.eval(gradient, lambda v: 255 - v)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def bare_app(media_dir: Path | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/ingest/v1/observations", status_code=201)
    async def create(observation: ObservationCreate) -> dict[str, str]:
        return {"id": str(observation.id)}

    @app.post("/ingest/v1/observations:batch")
    async def batch(observations: list[ObservationCreate]) -> dict[str, int]:
        return {"created": len(observations)}

    @app.post("/ingest/v1/observations/{observation_id}/media", status_code=201)
    async def media(observation_id: str, request: Request) -> dict[str, str]:
        """The body streamed to a file and made durable, nothing else."""
        assert media_dir is not None
        path = media_dir / uuid.uuid4().hex
        async with await anyio.open_file(path, "xb") as file:
            async for chunk in request.stream():
                await file.write(chunk)
            await file.flush()
            await anyio.to_thread.run_sync(os.fsync, file.wrapped.fileno())
        return {"id": path.name}

    return app


async def _drive(
    app: Any, calls: int, one: Callable[[httpx.AsyncClient, int], Awaitable[None]]
) -> tuple[float, list[float], float]:
    """(calls/s, latencies in s, CPU s of this process per call) with ``CONCURRENCY`` calls
    in flight."""
    transport = httpx.ASGITransport(app=app)
    latencies: list[float] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
        items = iter(range(calls))

        async def worker() -> None:
            for i in items:
                started = time.perf_counter()
                await one(client, i)
                latencies.append(time.perf_counter() - started)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return calls / elapsed, latencies, cpu / calls


async def single_round(app: Any, calls: int) -> tuple[float, list[float], float]:
    bodies = [body(i) for i in range(calls)]

    async def one(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post("/ingest/v1/observations", json=bodies[i])
        if response.status_code != 201:
            raise RuntimeError(response.text)

    return await _drive(app, calls, one)


async def batch_round(app: Any, batches: int) -> tuple[float, float]:
    """(observations/s, CPU s of this process per observation)."""
    payloads = [[body(b * BATCH_SIZE + i) for i in range(BATCH_SIZE)] for b in range(batches)]
    encoded = [httpx.Request("POST", "/", json=p).content for p in payloads]

    async def one(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post(
            "/ingest/v1/observations:batch",
            content=encoded[i],
            headers={"content-type": "application/json"},
        )
        if response.status_code != 200 or response.json()["created"] != BATCH_SIZE:
            raise RuntimeError(response.text[:500])

    rate, _, cpu = await _drive(app, batches, one)
    return rate * BATCH_SIZE, cpu / BATCH_SIZE


async def upload_round(app: Any, observation_ids: list[str], data: bytes) -> float:
    """Uploads/s, ``UPLOAD_CONCURRENCY`` in flight, one photo per observation."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
        ids = iter(observation_ids)

        async def worker() -> None:
            for observation_id in ids:
                response = await client.post(
                    f"/ingest/v1/observations/{observation_id}/media",
                    content=data,
                    headers={"content-type": "image/jpeg"},
                )
                if response.status_code != 201:
                    raise RuntimeError(response.text[:500])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(UPLOAD_CONCURRENCY)))
        return len(observation_ids) / (time.perf_counter() - started)


async def observations_for_uploads(app: Any, count: int) -> list[str]:
    """``count`` new observations (made in batches), to upload media to."""
    bodies = [body(i) for i in range(count)]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
        for start in range(0, count, BATCH_SIZE):
            response = await client.post(
                "/ingest/v1/observations:batch", json=bodies[start : start + BATCH_SIZE]
            )
            if response.status_code != 200:
                raise RuntimeError(response.text[:500])
    return [b["id"] for b in bodies]


class Service:
    """The ingest app on one database, started and stopped around the rounds."""

    def __init__(self, name: str, data_dir: Path, database: dict[str, str]) -> None:
        self.name = name
        settings = IngestSettings(data_dir=data_dir, **database)
        self.app = create_app(settings)

    async def __aenter__(self) -> Any:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        await self._lifespan.__aexit__(None, None, None)


async def settled(app: Any, timeout: float = 300.0) -> None:
    """Wait until ``app``'s outbox holds nothing unpublished (the bare app has none)."""
    runtime = getattr(app.state, "runtime", None)
    if runtime is None:
        return
    pending = text("SELECT count(*) FROM c4c_outbox WHERE published_at IS NULL")
    deadline = time.monotonic() + timeout
    while True:
        async with runtime.db.engine.connect() as conn:
            if not await conn.scalar(pending):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the outbox did not empty in time")
        await asyncio.sleep(0.05)


async def check_postgres() -> None:
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OSError, Exception) as exc:
        raise ServiceUnavailable(f"PostgreSQL at {POSTGRES_URL} unreachable ({exc!r})") from exc
    finally:
        await engine.dispose()


async def drop_schema(schema: str) -> None:
    engine = create_async_engine(POSTGRES_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


def _cpu(rounds: list[Any], per: str) -> str:
    """The median CPU per item of ``rounds`` (its last element), as a detail."""
    return f"CPU {median([r[-1] for r in rounds]) * 1e6:,.0f} µs/{per} in process"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(ctx: Context) -> list[Result]:
    await check_postgres()
    logging.getLogger("c4c").setLevel(logging.WARNING)  # no access log per request
    calls, batches, rounds, uploads = (
        (SINGLE_QUICK, BATCHES_QUICK, ROUNDS_QUICK, UPLOADS_QUICK)
        if ctx.quick
        else (SINGLE, BATCHES, ROUNDS, UPLOADS)
    )
    data = photo()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    single: dict[str, list[tuple[float, list[float], float]]] = {
        BARE: [],
        "sqlite": [],
        "postgres": [],
    }
    batch: dict[str, list[tuple[float, float]]] = {BARE: [], "sqlite": [], "postgres": []}
    upload: dict[str, list[float]] = {BARE: [], "sqlite": [], "postgres": []}
    with tempfile.TemporaryDirectory() as tmp:
        services = {
            "sqlite": Service("sqlite", Path(tmp) / "sqlite", {}),
            "postgres": Service(
                "postgres",
                Path(tmp) / "postgres",
                {"database_url": POSTGRES_URL, "database_schema": schema},
            ),
        }
        try:
            async with services["sqlite"] as sqlite_app, services["postgres"] as postgres_app:
                media_dir = Path(tmp) / "bare-media"
                media_dir.mkdir()
                apps = {
                    BARE: bare_app(media_dir),
                    "sqlite": sqlite_app,
                    "postgres": postgres_app,
                }
                targets = {}
                for name, app in apps.items():  # warm-up: imports, prepared statements, caches
                    await single_round(app, 50)
                    await batch_round(app, 1)
                    targets[name] = await observations_for_uploads(app, (rounds + 1) * uploads)
                    await upload_round(app, targets[name][:uploads], data)
                    await settled(app)
                for r in range(rounds):
                    order = list(apps) if r % 2 == 0 else list(reversed(apps))
                    for name in order:
                        app = apps[name]
                        single[name].append(await single_round(app, calls))
                        await settled(app)
                        batch[name].append(await batch_round(app, batches))
                        await settled(app)
                        these = targets[name][(r + 1) * uploads : (r + 2) * uploads]
                        upload[name].append(await upload_round(app, these, data))
                        await settled(app)
                        log.info(
                            "round %d %s: %.0f req/s single, %.0f obs/s batch, %.1f uploads/s",
                            r + 1,
                            name,
                            single[name][-1][0],
                            batch[name][-1][0],
                            upload[name][-1],
                        )
        finally:
            await drop_schema(schema)

    shape = f"median of {rounds} round(s); {CONCURRENCY} in flight"
    bare_rate = median([s[0] for s in single[BARE]])
    bare_batch = median([b[0] for b in batch[BARE]])
    bare_upload = median(upload[BARE])
    results = [
        Result(
            SUITE,
            f"{BARE} single req/s",
            bare_rate,
            "req/s",
            detail=f"{shape}; {calls} requests; parse only; " + _cpu(single[BARE], "req"),
        ),
        Result(
            SUITE,
            f"{BARE} batch obs/s",
            bare_batch,
            "obs/s",
            detail=f"{shape}; {batches} x {BATCH_SIZE}; parse only; " + _cpu(batch[BARE], "obs"),
        ),
        Result(
            SUITE,
            f"{BARE} upload/s",
            bare_upload,
            "uploads/s",
            detail=f"median of {rounds} round(s); {UPLOAD_CONCURRENCY} in flight; "
            f"{uploads} x {len(data):,} B JPEG streamed to a file, fsynced",
        ),
    ]
    for name in ("sqlite", "postgres"):
        rates = [s[0] for s in single[name]]
        latencies = [x for s in single[name] for x in s[1]]
        results.append(
            Result.against(
                SUITE,
                f"{name} single req/s",
                median(rates),
                "req/s",
                baseline=bare_rate,
                baseline_name=BARE,
                min_ratio=SINGLE_TARGET,
                detail=f"{shape}; {_cpu(single[name], 'req')}; rounds: "
                + ", ".join(f"{x:,.0f}" for x in rates),
            )
        )
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            bare_q = pct([x for s in single[BARE] for x in s[1]], q) * 1000
            results.append(
                Result.against(
                    SUITE,
                    f"{name} single {label}",
                    pct(latencies, q) * 1000,
                    "ms",
                    baseline=bare_q,
                    baseline_name=BARE,
                    detail=f"{shape}; informational, lower is better",
                )
            )
        batch_rate = median([b[0] for b in batch[name]])
        results.append(
            Result(
                SUITE,
                f"{name} batch obs/s",
                batch_rate,
                "obs/s",
                baseline=bare_batch,
                target=f">= {BATCH_TARGET:,.0f} obs/s" if name == "postgres" else None,
                met=batch_rate >= BATCH_TARGET if name == "postgres" else None,
                detail=f"{shape}; {batches} x {BATCH_SIZE} per round; {_cpu(batch[name], 'obs')}; "
                "rounds: " + ", ".join(f"{b[0]:,.0f}" for b in batch[name]),
            )
        )
        results.append(
            Result.against(
                SUITE,
                f"{name} upload/s",
                median(upload[name]),
                "uploads/s",
                baseline=bare_upload,
                baseline_name=BARE,
                detail=f"median of {rounds} round(s); {UPLOAD_CONCURRENCY} in flight; "
                f"{uploads} x {len(data):,} B JPEG (sniffed, EXIF read, stored, fsynced, "
                "row and event); informational, rounds: "
                + ", ".join(f"{x:,.1f}" for x in upload[name]),
            )
        )
    return results
