"""``kill -9`` of the ingest service between the commit of an observation and the publish of
its event: after a restart the outbox still publishes it, and a consumer bound to the
exchange receives exactly one ``observation.created`` for it.

The window is made real, not simulated: the test holds the PostgreSQL advisory lock that
the outbox relay takes before each pass (the one that keeps replicas from relaying at the
same time), so the first process commits but cannot publish; it is killed with SIGKILL, the
lock is released, and a second process takes over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.exceptions import ChannelClosed
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from c4c.shared.bus import CloudEvent

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "c4c.ingest"], cwd=cwd, env=env, stdout=out, stderr=out
        )


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"ingest exited with {process.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/ingest/readyz", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail(f"ingest not ready in {START_TIMEOUT}s:\n{tail(log)}")


SERVICE_QUEUES = ("c4c.ingest", "c4c.ingest.dlq")


async def remove_idle_service_queues(broker: aio_pika.abc.AbstractConnection) -> None:
    """The service's queue has a fixed name (c4c.ingest) and a dead-letter argument naming
    the exchange of whoever declared it; one left behind by another run (empty, no
    consumer) would refuse this run's declaration. A queue in use or holding messages is
    left alone (the test then fails, saying why)."""
    for name in SERVICE_QUEUES:
        channel = await broker.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except ChannelClosed:
            continue  # absent
        result = queue.declaration_result
        if result.consumer_count == 0 and result.message_count == 0:
            await channel.queue_delete(name)
        await channel.close()


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_event_committed_before_a_kill_is_published_once_after_restart(
    broker_url: str,
    postgres_url: str,
    postgres_schema: str,
    unique_name: Callable[[str], str],
    eventually: Any,
    tmp_path: Path,
) -> None:
    exchange = unique_name("events")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ingest.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")} | {
        "C4C_BROKER_URL": broker_url,
        "C4C_BUS_EXCHANGE": exchange,
        "C4C_INGEST_DATABASE_URL": postgres_url,
        "C4C_INGEST_DATABASE_SCHEMA": postgres_schema,
        "C4C_INGEST_PORT": str(port),
        "C4C_DATA_DIR": str(tmp_path / "data"),
        "C4C_OUTBOX_POLL_INTERVAL": "0.2",
        "C4C_LOG_FORMAT": "text",
    }
    engine = create_async_engine(postgres_url)
    relay_lock = await engine.connect()
    broker = await aio_pika.connect(broker_url)
    processes: list[subprocess.Popen[bytes]] = []
    await remove_idle_service_queues(broker)
    try:
        await relay_lock.execute(
            text("SELECT pg_advisory_lock(hashtext(:key))"),
            {"key": f"c4c-outbox:{postgres_schema}"},
        )
        await relay_lock.commit()

        processes.append(start(env, tmp_path, log))
        await wait_ready(url, processes[0], log)
        channel = await broker.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="observation.created")

        obs_id = str(uuid.uuid4())
        body = {
            "id": obs_id,
            "datasetID": "kill-test",
            "recordedBy": "user-9",
            "eventDate": "2024-05-03",
            "decimalLatitude": 41.38,
            "decimalLongitude": 2.17,
            "license": "CC0",
        }
        async with httpx.AsyncClient() as client:
            created = await client.post(f"{url}/ingest/v1/observations", json=body, timeout=10)
        assert created.status_code == 201, created.text

        async def outbox_state() -> list[Any]:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        f'SELECT published_at FROM "{postgres_schema}".c4c_outbox '
                        "WHERE subject = :s"
                    ),
                    {"s": f"observation/{obs_id}"},
                )
                return [r[0] for r in rows]

        assert await outbox_state() == [None]  # committed, not published
        processes[0].send_signal(signal.SIGKILL)
        assert processes[0].wait(timeout=10) == -signal.SIGKILL
        assert await queue.get(fail=False) is None  # nothing went out before the kill

        await relay_lock.execute(
            text("SELECT pg_advisory_unlock(hashtext(:key))"),
            {"key": f"c4c-outbox:{postgres_schema}"},
        )
        await relay_lock.commit()
        processes.append(start(env, tmp_path, log))
        await wait_ready(url, processes[1], log)

        received: list[CloudEvent] = []

        async def take() -> bool:
            message = await queue.get(fail=False, no_ack=True)
            if message is not None:
                received.append(CloudEvent.from_json(message.body))
            return bool(received)

        await eventually(take, timeout=30)

        async def marked_published() -> bool:
            return (await outbox_state())[0] is not None

        await eventually(marked_published, timeout=30)
        assert await queue.get(fail=False) is None  # and nothing more after the mark
        [event] = received
        assert event.type == "observation.created"
        assert event.data["id"] == obs_id
        assert event.data["datasetID"] == "kill-test"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        await relay_lock.close()
        await engine.dispose()
        await remove_idle_service_queues(broker)
        for name in (exchange, f"{exchange}.dlx"):
            channel = await broker.channel()
            with contextlib.suppress(ChannelClosed):
                await channel.exchange_delete(name)
        await broker.close()
