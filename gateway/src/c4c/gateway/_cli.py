"""``python -m c4c.gateway [keys ...]``: with no command, serve (the whole suite in embedded
mode); ``keys create|list|revoke`` manage API keys in the gateway's database, configured by
the same settings as the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from fastapi import FastAPI
from sqlalchemy import make_url

from c4c.gateway.app import MIGRATIONS, create_app
from c4c.gateway.service import ApiKeys, InvalidScope, KeyRecord
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import serve
from c4c.shared.auth import ensure_principal_secret
from c4c.shared.db import Database
from c4c.shared.logs import configure_logging

log = logging.getLogger("c4c.gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m c4c.gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="make a key; its secret is printed once")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--scopes",
        required=True,
        nargs="+",
        help="services the key may call (ingest quality video plantid mobis), or '*'",
    )
    create.add_argument(
        "--daily-quota", type=int, help="requests a day (default: the api_key_daily_quota setting)"
    )
    listing = keys.add_parser("list", help="every key, revoked ones included (no secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    return parser


def _row(key: KeyRecord) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "scopes": sorted(key.scopes),
        "daily_quota": key.daily_quota,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


async def _keys(args: argparse.Namespace, settings: GatewaySettings) -> int:
    url = settings.resolved_database_url
    # Said every time: a key made in another database than the running gateway's (settings
    # not loaded in this shell) is unknown to it.
    shown = make_url(url).render_as_string(hide_password=True)
    print(f"gateway database: {shown}", file=sys.stderr)
    db = Database(
        url, schema=settings.resolved_database_schema, pool_size=settings.database_pool_size
    )
    try:
        await db.migrate([MIGRATIONS])
        keys = ApiKeys(db)
        if args.action == "create":
            quota = args.daily_quota or settings.api_key_daily_quota
            try:
                record, secret = await keys.create(args.name, args.scopes, daily_quota=quota)
            except InvalidScope as exc:
                print(f"error: {exc.detail}", file=sys.stderr)
                return 2
            scopes = " ".join(sorted(record.scopes))
            print(f"created key {record.id} ({record.name}; scopes: {scopes})", file=sys.stderr)
            print(secret)  # alone on stdout: KEY=$(python -m c4c.gateway keys create ...)
        elif args.action == "list":
            for key in await keys.list():
                if args.json:
                    print(json.dumps(_row(key)))
                    continue
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                scopes = " ".join(sorted(key.scopes))
                print(f"{key.id}  {key.name}  [{scopes}]  quota {key.daily_quota or '-'}  {state}")
        elif not await keys.revoke(args.id):
            print(f"error: no active key {args.id}", file=sys.stderr)
            return 1
        else:
            print(f"revoked key {args.id}", file=sys.stderr)
        return 0
    finally:
        await db.dispose()


def worker_app() -> FastAPI:
    """The app of one of several gateway processes (uvicorn imports this in each)."""
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def _serve_workers(settings: GatewaySettings) -> None:
    import uvicorn

    configure_logging(settings.log_level, settings.log_format)
    # Made once here: the workers would race to create it.
    ensure_principal_secret(settings)
    uvicorn.run(
        f"{__name__}:worker_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        proxy_headers=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = GatewaySettings()
    if args.command == "keys":
        return asyncio.run(_keys(args, settings))
    if settings.workers > 1 and settings.upstreams:
        _serve_workers(settings)
        return 0
    if settings.workers > 1:
        configure_logging(settings.log_level, settings.log_format)
        log.warning("embedded mode runs one process: C4C_GATEWAY_WORKERS ignored")
    serve(create_app(settings), settings, proxy_headers=False)
    return 0
