"""Distributed mode, as ``make up`` and the container images run it: the gateway and each of
the five services in its own process, over RabbitMQ and PostgreSQL. Every service is ready
through the gateway, on the broker and the database, and SIGTERM stops them all cleanly.

Each run has its own ports, PostgreSQL schemas and exchange, so it can run next to a
developer's ``make up`` or another test run on the same broker and server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.exceptions import ChannelClosed
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from c4c.shared.testing import LocalRun, Processes

# Service → the path prefixes the gateway routes to it; operations live under the first.
SERVICES = {
    "ingest": ("/ingest",),
    "quality": ("/quality",),
    "video": ("/video",),
    "plantid": ("/plantid", "/v2"),
    "mobis": ("/mobis",),
}
START_TIMEOUT = 120.0  # quality loads its taxonomy before it is ready
STOP_TIMEOUT = 30.0


@pytest.fixture
async def suite(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[LocalRun, Processes]]:
    run = LocalRun(SERVICES, broker_url, postgres_url, tmp_path / "data")
    processes = Processes(run.components, run.environment(), tmp_path)
    try:
        yield run, processes
    finally:
        processes.stop(timeout=10)
        await run.forget()


async def postgres_schemas(postgres_url: str, run: str) -> set[str]:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p"
                ),
                {"p": f"test\\_{run}\\_%"},
            )
            return {row[0] for row in rows}
    finally:
        await engine.dispose()


async def exchange_exists(broker_url: str, name: str) -> bool:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.get_exchange(name, ensure=True)  # passive declare
        except ChannelClosed:
            return False
        return True


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_each_service_in_its_own_process_behind_the_gateway(
    suite: tuple[LocalRun, Processes],
    broker_url: str,
    postgres_url: str,
    eventually: Callable[..., Any],
) -> None:
    run, processes = suite
    async with httpx.AsyncClient(base_url=run.url("gateway"), timeout=5) as client:

        async def every_service_ready() -> bool:
            processes.check_alive()
            try:
                answer = await client.get("/health")
            except httpx.TransportError:
                return False  # the gateway is not listening yet
            upstreams = answer.json()["upstreams"]
            return all(upstreams[prefixes[0]]["ready"] for prefixes in SERVICES.values())

        await eventually(every_service_ready, timeout=START_TIMEOUT, interval=0.2)

        health = await client.get("/health")
        assert health.status_code == 200, health.text

        for name, prefixes in SERVICES.items():
            answer = await client.get(f"{prefixes[0]}/readyz")
            assert answer.status_code == 200, answer.text
            assert answer.json()["service"] == name
            checks = answer.json()["checks"]
            assert {"database", "bus"} <= checks.keys(), checks
            assert all(checks.values()), checks

    # Really on PostgreSQL and RabbitMQ, not on the embedded-mode defaults.
    schemas = {run.schema(name) for name in run.components}
    assert await postgres_schemas(postgres_url, run.run) == schemas
    assert await exchange_exists(broker_url, run.exchange)

    processes.terminate()
    await eventually(
        lambda: len(processes.exited()) == len(run.components), timeout=STOP_TIMEOUT, interval=0.1
    )
    for name in run.components:
        output = processes.log(name)
        assert "Application shutdown complete" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    assert processes.exited() == dict.fromkeys(run.components, 0)
