"""HTTP routes of the mobis service (thin: they parse, call ``service``, shape the answer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Form, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from c4c.mobis import metrics
from c4c.mobis.apps import AppCatalogue
from c4c.mobis.models import NotificationRow, UserRow
from c4c.mobis.oidc import OidcNotConfigured
from c4c.mobis.remote import UpstreamRefused
from c4c.mobis.repository import utc
from c4c.mobis.schemas import (
    MAX_INT,
    PRINTABLE,
    Account,
    AccountDeletion,
    IdTokenLogin,
    Login,
    Logout,
    MarkRead,
    MediaState,
    MissingMedia,
    MyObservation,
    MyObservationPage,
    Notification,
    NotificationPage,
    OidcStart,
    PasswordChange,
    Refresh,
    Register,
    SyncRequest,
    SyncResult,
    Tokens,
)
from c4c.mobis.service.accounts import Accounts, TooManyAttempts, account
from c4c.mobis.service.observations import ContentRange, Observations
from c4c.mobis.service.oidc import OidcLogins
from c4c.mobis.settings import MobisSettings
from c4c.mobis.wiring import Parts
from c4c.shared.auth import PrincipalDep
from c4c.shared.db import SessionDep
from c4c.shared.problems import BadRequest, BodyTooLarge, ProblemError

PREFIX = "/mobis/v1"
JWKS_PATH = f"{PREFIX}/.well-known/jwks.json"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class TooManyItems(BodyTooLarge):
    code, title = "sync-too-large", "Too many observations in one sync"


def _parts(request: Request) -> Parts:
    parts: Parts = request.app.state.parts
    return parts


async def _accounts(request: Request, session: SessionDep) -> Accounts:
    return _parts(request).accounts(session)


async def _observations(request: Request) -> Observations:
    return _parts(request).observations


async def _oidc(request: Request) -> OidcLogins:
    oidc = _parts(request).oidc
    if oidc is None:
        raise OidcNotConfigured("Log in with email and password.")
    return oidc


# Every dependency here is async, cheap as they are: FastAPI runs a plain ``def`` one in a
# worker thread, a thread hop (and the GIL handed over and back) per dependency per request.
AccountsDep = Annotated[Accounts, Depends(_accounts)]
ObservationsDep = Annotated[Observations, Depends(_observations)]
OidcDep = Annotated[OidcLogins, Depends(_oidc)]
# What the provider sends back (RFC 6749 §4.1.2), bounded.
OidcState = Annotated[str, Field(min_length=1, max_length=200)]
OidcCode = Annotated[str | None, Field(min_length=1, max_length=4096)]
OidcError = Annotated[str | None, Field(min_length=1, max_length=200)]
OidcErrorDescription = Annotated[str | None, Field(max_length=2000)]


async def _user(principal: PrincipalDep, request: Request) -> UserRow:
    # A read-only transaction of its own, ended at once: the route may open others, and a
    # write transaction would hold SQLite's one write lock (every request comes here).
    parts = _parts(request)
    async with parts.reads() as repo:
        return await parts.accounts(repo.session).user_of(principal, _bearer(request))


UserDep = Annotated[UserRow, Depends(_user)]


def _client_address(request: Request, principal: PrincipalDep) -> str:
    """On public routes the gateway names the caller by its address."""
    if principal is not None and principal.kind == "anonymous":
        return principal.id
    return request.client.host if request.client else "unknown"


def _bearer(request: Request) -> str | None:
    """The access token the gateway verified and passed on: its session must not be ended,
    and its sign-in time confirms steps that cannot be undone."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


_CONFIRM = (
    " An account with a password sends the current one. An account without one (made by an "
    "OpenID Connect sign-in, `hasPassword` false) signs in again at the provider and calls "
    "with the new access token: its `auth_time` must be at most `reauthentication_seconds` "
    "(default 300) old and its session live, else 401 `reauthentication-required` with an "
    "RFC 9470 `WWW-Authenticate` challenge naming `max_age`. Refreshing does not make a "
    "sign-in fresh."
)


def _answer(outcome: Tokens | ProblemError, request: Request) -> Response:
    if isinstance(outcome, ProblemError):
        return outcome.to_response(instance=request.url.path)
    return JSONResponse(outcome.model_dump(), headers={"Cache-Control": "no-store"})


def _matches(request: Request, tag: str) -> bool:
    sent = request.headers.get("if-none-match", "")
    return any(t.strip() in (tag, "*") for t in sent.split(","))


def build_router(settings: MobisSettings) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["mobis"])
    catalogue = AppCatalogue.load(settings.apps_file)

    # --- keys and accounts -----------------------------------------------------------------

    @router.get("/.well-known/jwks.json", summary="The public keys access tokens are signed with")
    async def jwks(request: Request) -> Response:
        return JSONResponse(
            _parts(request).signer.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    @router.post(
        "/auth/register",
        status_code=201,
        response_model=Account,
        responses={429: {"description": "Too many accounts from this address: Retry-After."}},
    )
    async def register(
        body: Register, request: Request, principal: PrincipalDep, accounts: AccountsDep
    ) -> Account:
        return await accounts.register(body, _client_address(request, principal))

    @router.post(
        "/auth/login",
        response_model=Tokens,
        summary="Log in: an OAuth 2.0 token response",
        responses={429: {"description": "Too many failed logins: wait Retry-After seconds."}},
    )
    async def login(
        body: Login, request: Request, principal: PrincipalDep, accounts: AccountsDep
    ) -> Response:
        address = _client_address(request, principal)
        outcome = await accounts.login(body.email, body.password, address, body.deviceId)
        if isinstance(outcome, TooManyAttempts):
            metrics.LOGINS.labels("throttled").inc()
        else:
            metrics.LOGINS.labels(
                "failure" if isinstance(outcome, ProblemError) else "success"
            ).inc()
        return _answer(outcome, request)

    @router.post(
        "/auth/refresh",
        response_model=Tokens,
        summary="New tokens for a refresh token (used once; a reuse ends the session)",
        description="A refresh token works once: presenting it again revokes its whole "
        "session (family). One exception for bad networks: the latest rotated token sent "
        "again within `refresh_grace_seconds` (default 30) of its rotation answers a new "
        "pair for the same session, sign-in time and expiry, and the pair answered before "
        "stops working (its refresh token, if presented later, ends the session).",
    )
    async def refresh(body: Refresh, request: Request, accounts: AccountsDep) -> Response:
        return _answer(await accounts.refresh(body.refresh_token), request)

    @router.post("/auth/logout", status_code=204, summary="End this session, or every one")
    async def logout(body: Logout, user: UserDep, accounts: AccountsDep) -> Response:
        await accounts.logout(user, body.refresh_token, body.everywhere)
        return Response(status_code=204)

    # --- OpenID Connect login --------------------------------------------------------------

    @router.get(
        "/auth/oidc/start",
        response_model=OidcStart,
        summary="Start signing in at the OpenID Connect provider",
        description="Redirects (302) to the provider; with `Accept: application/json`, "
        "answers the URL to open instead. The provider comes back to the callback with a "
        "code and this state.",
        responses={302: {"description": "To the provider"}},
    )
    async def oidc_start(
        request: Request,
        oidc: OidcDep,
        device_id: Annotated[
            str | None,
            Query(alias="deviceId", min_length=1, max_length=100, pattern=PRINTABLE),
        ] = None,
        reauthenticate: Annotated[
            bool,
            Query(
                description="Make the person sign in again at the provider (prompt=login, "
                "max_age): the fresh sign-in an account without password needs to set one "
                "or to delete itself."
            ),
        ] = False,
    ) -> Response:
        start = await oidc.start(device_id, reauthenticate)
        headers = {"Cache-Control": "no-store"}
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(start.model_dump(), headers=headers)
        headers["Location"] = start.authorizationUrl
        return JSONResponse(start.model_dump(), status_code=302, headers=headers)

    @router.get(
        "/auth/oidc/callback",
        response_model=Tokens,
        summary="Finish an OpenID Connect login: MOBIS' token response",
    )
    async def oidc_callback(
        request: Request,
        oidc: OidcDep,
        state: Annotated[OidcState, Query()],
        code: Annotated[OidcCode, Query()] = None,
        error: Annotated[OidcError, Query()] = None,
        error_description: Annotated[OidcErrorDescription, Query()] = None,
    ) -> Response:
        return _answer(await oidc.finish(state, code, error, error_description), request)

    @router.post(
        "/auth/oidc/callback",
        response_model=Tokens,
        summary="Finish an OpenID Connect login (form post, or an app passing the code on)",
    )
    async def oidc_callback_posted(
        request: Request,
        oidc: OidcDep,
        state: Annotated[OidcState, Form()],
        code: Annotated[OidcCode, Form()] = None,
        error: Annotated[OidcError, Form()] = None,
        error_description: Annotated[OidcErrorDescription, Form()] = None,
    ) -> Response:
        return _answer(await oidc.finish(state, code, error, error_description), request)

    @router.post(
        "/auth/oidc/token",
        response_model=Tokens,
        summary="Sign in with an ID token the app got from the provider itself",
    )
    async def oidc_token(body: IdTokenLogin, request: Request, oidc: OidcDep) -> Response:
        tokens = await oidc.with_id_token(body.id_token, body.nonce, body.deviceId)
        return _answer(tokens, request)

    @router.get("/me", response_model=Account)
    async def me(user: UserDep) -> Account:
        return account(user)

    @router.post(
        "/me/password",
        response_model=Tokens,
        summary="Change (or set a first) password; ends every session",
        description="Answers a new session for the calling device." + _CONFIRM,
    )
    async def change_password(
        body: PasswordChange, request: Request, user: UserDep, accounts: AccountsDep
    ) -> Response:
        tokens = await accounts.change_password(
            user, body.current_password, body.new_password, _bearer(request)
        )
        return _answer(tokens, request)

    @router.delete(
        "/me",
        status_code=204,
        summary="Forget me: delete the account; observations stay, pseudonymised",
        description="Every session ends with it." + _CONFIRM,
    )
    async def delete_me(
        request: Request,
        user: UserDep,
        accounts: AccountsDep,
        body: Annotated[AccountDeletion | None, Body()] = None,
    ) -> Response:
        password = body.password if body else None
        await accounts.forget(user, password, _bearer(request))
        # Woken once the request's transaction has committed (a background task runs after
        # the answer): woken earlier, it may look before the handover is visible (PostgreSQL)
        # and then sleep for its whole interval.
        wake = BackgroundTask(_parts(request).pseudonymise_now)
        return Response(status_code=204, background=wake)

    # --- app configuration -----------------------------------------------------------------

    @router.get("/apps/{app}/config", summary="An app's configuration (ETag; ?version=N)")
    async def app_config(
        app: Annotated[str, Path(max_length=100)],
        request: Request,
        version: Annotated[str | None, Query(max_length=20, pattern=r"^[0-9]+$")] = None,
    ) -> Response:
        config = catalogue.config(app, version)
        headers = {"ETag": config.etag, "Cache-Control": "private, max-age=60"}
        if _matches(request, config.etag):
            return Response(status_code=304, headers=headers)
        return JSONResponse(config.body, headers=headers)

    # --- sync ------------------------------------------------------------------------------

    @router.post(
        "/sync",
        response_model=SyncResult,
        summary="Send observations queued offline; an outcome per item, retries are safe",
    )
    async def sync(body: SyncRequest, user: UserDep, observations: ObservationsDep) -> SyncResult:
        if len(body.observations) > settings.sync_max_items:
            raise TooManyItems(
                f"Send at most {settings.sync_max_items} observations at once.",
                max_items=settings.sync_max_items,
            )
        return SyncResult(items=await observations.sync(user, body.observations))

    # --- my observations -------------------------------------------------------------------

    @router.get("/me/observations", response_model=MyObservationPage)
    async def my_observations(
        request: Request,
        user: UserDep,
        observations: ObservationsDep,
        cursor: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    ) -> Response:
        # Rendered and tagged once per change (see ``ShownItems``): apps poll this.
        page = await observations.mine(user, cursor, limit)
        headers = {"ETag": page.etag, "Cache-Control": "private, no-cache"}
        if _matches(request, page.etag):
            return Response(status_code=304, headers=headers)
        if page.next:
            headers["Link"] = f'<{request.url.include_query_params(cursor=page.next)}>; rel="next"'
        return Response(page.body, media_type="application/json", headers=headers)

    @router.get("/me/observations/{observation_id}", response_model=MyObservation)
    async def my_observation(
        observation_id: str, user: UserDep, observations: ObservationsDep
    ) -> MyObservation:
        return await observations.one(user, observation_id)

    @router.get(
        "/me/observations/{observation_id}/missing-media",
        response_model=MissingMedia,
        summary="The media of an observation the server still lacks",
    )
    async def missing_media(
        observation_id: str, user: UserDep, observations: ObservationsDep
    ) -> MissingMedia:
        return await observations.missing_media(user, observation_id)

    # --- resumable media -------------------------------------------------------------------

    @router.get("/media/{media_id}", response_model=MediaState, summary="How much is uploaded")
    async def media_status(media_id: str, user: UserDep, observations: ObservationsDep) -> Response:
        state = await observations.media_status(user, _uuid(media_id))
        return JSONResponse(state.model_dump(), headers={"Upload-Offset": str(state.received)})

    @router.put(
        "/media/{media_id}",
        response_model=MediaState,
        summary="Upload a media file, whole or in chunks (Content-Range: bytes a-b/total)",
        openapi_extra={
            "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
        },
    )
    async def upload_media(
        media_id: str,
        request: Request,
        principal: PrincipalDep,
        observations: ObservationsDep,
        content_range: Annotated[str | None, Header(alias="Content-Range", max_length=100)] = None,
    ) -> Response:
        # The caller and their media in one query (not one for each): every photo of a
        # sync comes here.
        media_id, parts = _uuid(media_id), _parts(request)
        async with parts.reads() as repo:
            accounts = parts.accounts(repo.session)
            _, found = await accounts.user_with_media(principal, _bearer(request), media_id)
        media = observations.found(found, media_id)
        length = request.headers.get("content-length")
        span = ContentRange.parse(
            content_range, int(length) if length and length.isdigit() else None
        )
        if span.end - span.start + 1 > settings.media_chunk_max_bytes:
            raise BodyTooLarge(
                f"Send chunks of at most {settings.media_chunk_max_bytes} bytes.",
                limit_bytes=settings.media_chunk_max_bytes,
            )
        state = await observations.upload_chunk(media, span, request.stream())
        status = 200 if state.stored else 202
        return JSONResponse(
            state.model_dump(), status_code=status, headers={"Upload-Offset": str(state.received)}
        )

    # --- notifications and the live stream -------------------------------------------------

    @router.get("/me/notifications", response_model=NotificationPage)
    async def notifications(
        request: Request,
        user: UserDep,
        after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> NotificationPage:
        async with _parts(request).reads() as repo:
            rows = await repo.notifications(user.id, after=after, limit=limit)
            unread = await repo.unread_count(user.id)
        items = [_notification(row) for row in rows]
        return NotificationPage(
            items=items, unread=unread, next=items[-1].id if len(items) == limit else None
        )

    @router.post("/me/notifications:read", status_code=204)
    async def mark_read(body: MarkRead, request: Request, user: UserDep) -> Response:
        async with _parts(request).unit() as repo:
            await repo.mark_read(user.id, body.upTo, datetime.now(UTC))
        return Response(status_code=204)

    @router.get(
        "/me/events",
        summary="Live Server-Sent Events of changes to my observations (Last-Event-ID resumes)",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        request: Request,
        user: UserDep,
        after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", pattern=r"^[0-9]{1,18}$")
        ] = None,
    ) -> StreamingResponse:
        start = int(last_event_id) if last_event_id else after
        return StreamingResponse(
            _event_stream(request, _parts(request), user.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- identification --------------------------------------------------------------------

    @router.post(
        "/identify",
        summary="Instant suggestions for one photo (multipart field 'image', or the raw body)",
    )
    async def identify(
        request: Request,
        user: UserDep,
        project: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[\w.-]+$")],
        organ: Annotated[str, Query(pattern=r"^(auto|leaf|flower|fruit|bark|habit)$")] = "auto",
    ) -> Response:
        photo, content_type = await _photo(request, settings.identify_max_bytes)
        status, body = await _parts(request).plantid.identify(
            project, photo, content_type, organ, user=user.id
        )
        if status == 404 and body.get("message") == "Species not found":
            return JSONResponse({"project": project, "rejected": True, "suggestions": []})
        if status != 200:
            raise UpstreamRefused(
                body.get("message") or body.get("detail") or "Identification refused.",
                status=status if 400 <= status < 500 else 502,
                problem=body,
            )
        suggestions = [
            {
                "scientificName": r["species"]["scientificNameWithoutAuthor"],
                "score": r.get("score"),
                "family": (r["species"].get("family") or {}).get("scientificNameWithoutAuthor"),
                "commonNames": r["species"].get("commonNames", []),
            }
            for r in body.get("results", [])
            if isinstance(r, dict) and isinstance(r.get("species"), dict)
        ]
        return JSONResponse({"project": project, "rejected": False, "suggestions": suggestions})

    return router


def _uuid(value: str) -> str:
    if not re.match(UUID_PATTERN, value):
        raise BadRequest("Media ids are UUIDs.")
    return value.lower()


def _notification(row: NotificationRow) -> Notification:
    return Notification(
        id=row.seq,
        observationId=row.observation_id,
        kind=row.kind,
        data=row.data,
        createdAt=utc(row.created_at) or row.created_at,
        read=row.read_at is not None,
    )


async def _photo(request: Request, max_bytes: int) -> tuple[bytes, str]:
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise BodyTooLarge(f"Send a photo of at most {max_bytes} bytes.", limit_bytes=max_bytes)
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=2) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadRequest("Send the photo in a multipart field named 'image'.")
            data = await upload.read(max_bytes + 1)
            content_type = upload.content_type or "application/octet-stream"
    else:
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > max_bytes:
                break
        data = bytes(received)
    if len(data) > max_bytes:
        raise BodyTooLarge(f"Send a photo of at most {max_bytes} bytes.", limit_bytes=max_bytes)
    if not data:
        raise BadRequest("Send a photo.")
    return bytes(data), content_type


async def _event_stream(
    request: Request, parts: Parts, user_id: str, after: int
) -> AsyncIterator[bytes]:
    """Notifications after ``after`` as they come; a comment now and then keeps proxies
    from closing a quiet stream. Ends when the app goes or the account is deleted."""
    settings = parts.settings
    wake = parts.notifier.listen(user_id)
    metrics.SSE_CLIENTS.inc()
    loop = asyncio.get_running_loop()
    quiet_since = ends = loop.time()
    ends += settings.sse_max_seconds
    try:
        yield b"retry: 2000\n\n"
        while loop.time() < ends and not await request.is_disconnected():
            wake.clear()
            async with parts.reads() as repo:
                if await repo.user(user_id) is None:
                    return
                rows = await repo.notifications(user_id, after=after, limit=100)
            for row in rows:
                note = _notification(row)
                data = json.dumps(note.model_dump(mode="json"), separators=(",", ":"))
                yield f"id: {note.id}\nevent: {note.kind}\ndata: {data}\n\n".encode()
                after = note.id
            if rows:
                quiet_since = loop.time()
                continue
            if loop.time() - quiet_since >= settings.sse_keepalive_seconds:
                yield b": keep-alive\n\n"
                quiet_since = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.sse_poll_seconds)
    finally:
        metrics.SSE_CLIENTS.dec()
        parts.notifier.forget(user_id, wake)
