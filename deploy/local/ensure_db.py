"""Create the PostgreSQL database of the distributed mode if it is missing.

Run by ``deploy/local/run`` before each component starts. Honcho starts them all at once,
so creation is serialised with an advisory lock (and a lost race is not an error). Reads
``C4C_DATABASE_URL`` and any per-service ``C4C_<SERVICE>_DATABASE_URL``; SQLite or unset
URLs need nothing. Retries while PostgreSQL is not accepting connections yet.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import asyncpg
from sqlalchemy.engine import URL, make_url

CONNECT_DEADLINE = 30.0
LOCK_KEY = "c4c-ensure-database"


def database_urls() -> list[URL]:
    names = [
        key
        for key in os.environ
        if key == "C4C_DATABASE_URL" or re.fullmatch(r"C4C_[A-Z0-9]+_DATABASE_URL", key)
    ]
    urls = [make_url(os.environ[key]) for key in sorted(names) if os.environ[key]]
    return [url for url in urls if url.get_backend_name() == "postgresql"]


async def connect(url: URL, database: str) -> asyncpg.Connection:
    deadline = time.monotonic() + CONNECT_DEADLINE
    while True:
        try:
            return await asyncpg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                password=url.password,
                database=database,
            )
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def ensure(url: URL) -> None:
    name = url.database or url.username or "postgres"
    try:
        conn = await connect(url, name)
    except asyncpg.InvalidCatalogNameError:
        pass  # missing: create it below
    else:
        await conn.close()
        return
    conn = await connect(url, "postgres")
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", LOCK_KEY)
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            quoted = '"' + name.replace('"', '""') + '"'
            try:
                await conn.execute(f"CREATE DATABASE {quoted}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another process without the lock got there first
            else:
                print(f"created database {name!r}", file=sys.stderr)
    finally:
        await conn.close()  # also releases the advisory lock


async def main() -> None:
    for url in database_urls():
        await ensure(url)


if __name__ == "__main__":
    asyncio.run(main())
