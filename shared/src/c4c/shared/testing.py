"""Running components as real processes on loopback, for tests and benchmarks.

Each run gets its own names on the shared RabbitMQ and PostgreSQL (exchange, queues, one
schema per component) so that runs never see each other, and ``forget`` removes them after.
Components are started as ``python -m c4c.<name>``, configured only by the environment.
And :func:`query_plan`, for tests that check a query is served by its index.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ClauseElement, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

GATEWAY = "gateway"


async def query_plan(
    conn: AsyncConnection, statement: ClauseElement | str, parameters: Any = ()
) -> str:
    """The plan the database makes for ``statement`` (its values inlined; or SQL as the
    driver takes it, with its ``parameters``: see :func:`statements_sent`), in one line, as
    SQLite's EXPLAIN QUERY PLAN or PostgreSQL's EXPLAIN prints it."""
    explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    if isinstance(statement, str):
        rows = await conn.exec_driver_sql(explain + statement, parameters)
    else:
        literal = {"literal_binds": True}
        rows = await conn.execute(
            text(explain + str(statement.compile(dialect=conn.dialect, compile_kwargs=literal)))
        )
    return " ".join(str(row[-1]) for row in rows)


@contextlib.asynccontextmanager
async def statements_sent(session: AsyncSession) -> AsyncIterator[list[tuple[str, Any]]]:
    """The SQL that ``session`` sends to the database within the block, with its parameters,
    as the driver gets them: what a repository method really runs, for :func:`query_plan`."""
    connection = (await session.connection()).sync_connection
    assert connection is not None
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, _cursor: Any, sql: str, parameters: Any, *_: Any) -> None:
        if conn is connection:
            sent.append((sql, parameters))

    event.listen(connection.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(connection.engine, "before_cursor_execute", record)


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports nothing listens on (the kernel's pick)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class LocalRun:
    """One run of some components on loopback: ports, and names on the broker and database.

    ``prefixes`` maps each service to the path prefixes the gateway routes to it; a run
    that includes the gateway gets those routes.
    """

    prefixes: Mapping[str, Sequence[str]]
    broker_url: str
    postgres_url: str
    data_dir: Path
    gateway: bool = True
    label: str = "test"
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    ports: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        names = [GATEWAY, *self.prefixes] if self.gateway else list(self.prefixes)
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))

    @property
    def components(self) -> list[str]:
        return list(self.ports)

    @property
    def exchange(self) -> str:
        return f"{self.label}.{self.run}.events"

    @property
    def queue_prefix(self) -> str:
        return f"{self.label}.{self.run}"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def schema(self, name: str) -> str:
        return f"{self.label}_{self.run}_{name}"

    def environment(self, **settings: str) -> dict[str, str]:
        """This process's environment without its ``C4C_*`` variables, then the run's
        settings for every component (each reads its own ``C4C_<NAME>_`` section), then
        ``settings`` (``C4C_*`` names)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")}
        services = {name: self.url(name) for name in self.prefixes}
        env |= {
            "C4C_BROKER_URL": self.broker_url,
            "C4C_DATABASE_URL": self.postgres_url,
            "C4C_BUS_EXCHANGE": self.exchange,
            "C4C_BUS_QUEUE_PREFIX": self.queue_prefix,
            "C4C_DATA_DIR": str(self.data_dir),
            "C4C_HOST": "127.0.0.1",
            "C4C_LOG_FORMAT": "text",
            "C4C_SHUTDOWN_TIMEOUT": "10",
            "C4C_SERVICE_URLS": json.dumps(services),
        }
        if self.gateway:
            routes = {p: [services[n]] for n, prefixes in self.prefixes.items() for p in prefixes}
            env["C4C_GATEWAY_UPSTREAMS"] = json.dumps(routes)
        for name, port in self.ports.items():
            env[f"C4C_{name.upper()}_PORT"] = str(port)
            env[f"C4C_{name.upper()}_DATABASE_SCHEMA"] = self.schema(name)
        return env | settings

    async def forget(self) -> None:
        """Drop what the run made on PostgreSQL and RabbitMQ (absent things are fine)."""
        import aio_pika
        from aio_pika.exceptions import ChannelClosed
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.postgres_url)
        try:
            async with engine.begin() as conn:
                for name in self.components:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema(name)}" CASCADE'))
        finally:
            await engine.dispose()
        connection = await aio_pika.connect(self.broker_url)
        async with connection:
            channel = await connection.channel()
            for name in self.prefixes:
                await channel.queue_delete(f"{self.queue_prefix}.{name}")
                await channel.queue_delete(f"{self.queue_prefix}.{name}.dlq")
            for exchange in (self.exchange, f"{self.exchange}.dlx"):
                with contextlib.suppress(ChannelClosed):  # never declared
                    await channel.exchange_delete(exchange)
                if channel.is_closed:
                    channel = await connection.channel()


class Processes:
    """``python -m c4c.<name>`` for each name, in ``folder`` (so no ``.env`` of a checkout
    is read), each logging to ``<folder>/<name>.log``."""

    def __init__(self, names: Sequence[str], env: Mapping[str, str], folder: Path) -> None:
        self.folder = folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        for name in names:
            with (folder / f"{name}.log").open("wb") as log_file:
                self.processes[name] = subprocess.Popen(  # noqa: S603 - our own modules
                    [sys.executable, "-m", f"c4c.{name}"],
                    cwd=folder,
                    env=dict(env),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def exited(self) -> dict[str, int]:
        """The processes that have ended, with their exit codes."""
        codes = {name: p.poll() for name, p in self.processes.items()}
        return {name: code for name, code in codes.items() if code is not None}

    def check_alive(self) -> None:
        """Raise with the log's tail if any process has ended."""
        for name, code in self.exited().items():
            raise RuntimeError(f"{name} exited with {code}:\n{self.log(name)[-3000:]}")

    def terminate(self) -> None:
        """SIGTERM to all (each shuts down cleanly on its own)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()

    def stop(self, timeout: float = 20) -> None:
        """Terminate, wait, and kill what is still running after ``timeout`` seconds."""
        self.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
