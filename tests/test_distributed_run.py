"""Distributed mode, as ``make up`` and the container images run it: the gateway and each of
the five services in its own process, over RabbitMQ and PostgreSQL. Every service is ready
through the gateway, on the broker and the database, and SIGTERM stops them all cleanly.

Each run has its own ports, PostgreSQL schemas and exchange, so it can run next to a
developer's ``make up`` or another test run on the same broker and server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aio_pika
import httpx
import pytest
from aio_pika.exceptions import ChannelClosed
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

# Service → the path prefixes the gateway routes to it; operations live under the first.
SERVICES = {
    "ingest": ("/ingest",),
    "quality": ("/quality",),
    "video": ("/video",),
    "plantid": ("/plantid", "/v2"),
    "mobis": ("/mobis",),
}
COMPONENTS = ("gateway", *SERVICES)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on (the kernel's pick, never the default 8000-8005)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Component:
    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"c4c.{self.name}"],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self._log:
            self._log.close()


@dataclass
class Suite:
    run: str
    exchange: str
    components: dict[str, Component]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.components['gateway'].port}"

    @property
    def schemas(self) -> dict[str, str]:
        return {name: f"t_{self.run}_{name}" for name in COMPONENTS}

    def environment(self) -> dict[str, str]:
        """One environment for all: each component reads its own ``C4C_<NAME>_`` section."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")}
        upstreams = {
            prefix: [f"http://127.0.0.1:{self.components[name].port}"]
            for name, prefixes in SERVICES.items()
            for prefix in prefixes
        }
        env["C4C_GATEWAY_UPSTREAMS"] = json.dumps(upstreams)
        for name, component in self.components.items():
            env[f"C4C_{name.upper()}_PORT"] = str(component.port)
            env[f"C4C_{name.upper()}_DATABASE_SCHEMA"] = self.schemas[name]
        return env

    def check_alive(self) -> None:
        for component in self.components.values():
            if component.returncode is not None:
                pytest.fail(
                    f"{component.name} exited early with {component.returncode}:\n"
                    + component.output()[-3000:]
                )

    def terminate(self) -> None:
        for component in self.components.values():
            if component.process and component.process.poll() is None:
                component.process.send_signal(signal.SIGTERM)

    def all_exited(self) -> bool:
        return all(c.returncode is not None for c in self.components.values())

    def kill(self) -> None:
        for component in self.components.values():
            component.kill()


@pytest.fixture
async def suite(broker_url: str, postgres_url: str, tmp_path: Path) -> AsyncIterator[Suite]:
    run = uuid.uuid4().hex[:8]
    ports = free_ports(len(COMPONENTS))
    suite = Suite(
        run=run,
        exchange=f"test.{run}.events",
        components={
            name: Component(name, port, tmp_path / f"{name}.log")
            for name, port in zip(COMPONENTS, ports, strict=True)
        },
    )
    env = suite.environment() | {
        "C4C_BROKER_URL": broker_url,
        "C4C_DATABASE_URL": postgres_url,
        "C4C_BUS_EXCHANGE": suite.exchange,
        "C4C_BUS_QUEUE_PREFIX": f"test.{run}",
        "C4C_DATA_DIR": str(tmp_path / "data"),
        "C4C_HOST": "127.0.0.1",
        "C4C_LOG_FORMAT": "text",
        "C4C_SHUTDOWN_TIMEOUT": "10",
    }
    try:
        for component in suite.components.values():
            # cwd: a folder without a .env, so only this environment configures them.
            component.start(env, cwd=tmp_path)
        yield suite
    finally:
        suite.kill()
        await drop_schemas(postgres_url, suite.schemas.values())
        await delete_exchanges(broker_url, [suite.exchange, f"{suite.exchange}.dlx"])
        queues = [f"test.{run}.{name}" for name in SERVICES]
        await delete_queues(broker_url, [*queues, *(f"{q}.dlq" for q in queues)])


async def drop_schemas(postgres_url: str, schemas: Iterable[str]) -> None:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            for schema in schemas:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


async def delete_exchanges(broker_url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(ChannelClosed):  # never declared: nothing to delete
                await channel.exchange_delete(name)
            if not channel.is_closed:
                await channel.close()


async def delete_queues(broker_url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)  # deleting an absent queue is a no-op


async def postgres_schemas(postgres_url: str, run: str) -> set[str]:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p"
                ),
                {"p": f"t\\_{run}\\_%"},
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
    suite: Suite, broker_url: str, postgres_url: str, eventually: Callable[..., Any]
) -> None:
    async with httpx.AsyncClient(base_url=suite.gateway_url, timeout=5) as client:

        async def every_service_ready() -> bool:
            suite.check_alive()
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
            assert answer.json()["checks"] == {"database": True, "bus": True}

    # Really on PostgreSQL and RabbitMQ, not on the embedded-mode defaults.
    assert await postgres_schemas(postgres_url, suite.run) == set(suite.schemas.values())
    assert await exchange_exists(broker_url, suite.exchange)

    suite.terminate()
    await eventually(suite.all_exited, timeout=STOP_TIMEOUT, interval=0.1)
    codes = {name: c.returncode for name, c in suite.components.items()}
    for component in suite.components.values():
        output = component.output()
        assert "Application shutdown complete" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    assert codes == dict.fromkeys(suite.components, 0)
