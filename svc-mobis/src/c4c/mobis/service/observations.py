"""Offline sync, "my observations", resumable media and the state events bring (scores,
identifications). Observations live in ingest (reached through the :class:`Ingest` port);
MOBIS keeps who owns which, what the app announced, and what events said. Each step opens
its own short transaction (``units``): no database lock is held while ingest is called or
while a chunk streams in."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import Row

from c4c.mobis import metrics
from c4c.mobis.models import ExpectedMediaRow, OwnedObservationRow, UserRow
from c4c.mobis.remote import Ingest, UpstreamRefused
from c4c.mobis.repository import EventState, Repository, StoredMark, utc
from c4c.mobis.schemas import (
    MAX_INT,
    MediaState,
    MissingMedia,
    MyObservation,
    ObservationIdentified,
    ObservationScored,
    ObservationUpdated,
    SyncItem,
    SyncOutcome,
)
from c4c.mobis.settings import MobisSettings
from c4c.shared.batching import GroupCommit
from c4c.shared.problems import BadRequest, Conflict, NotFound, ProblemError

Units = Callable[[], AbstractAsyncContextManager[Repository]]
"""A new unit of work: a repository in a transaction committed when the block ends."""
StateChange = ObservationScored | ObservationIdentified | ObservationUpdated
"""What an event tells of an observation MOBIS keeps the state of."""

Plain = Mapping[Any, Any]
"""A table row as a plain mapping of column name to value (SQLAlchemy's ``RowMapping``)."""

log = logging.getLogger("c4c.mobis.observations")

READ_CHUNK = 1 << 16
SHOWN_ITEMS = 5000
"""Items of "my observations" kept rendered: ten full pages."""
SHOWN_PAGES = 32
"""Pages of "my observations" kept whole (up to 500 items each: about 350 kB)."""


class ObservationNotFound(NotFound):
    code, title = "observation-not-found", "No such observation of yours"


class MediaNotFound(NotFound):
    code, title = "media-not-found", "No such media of yours"


class InvalidCursor(BadRequest):
    code, title = "invalid-cursor", "The cursor is not valid"


class UploadOutOfOrder(Conflict):
    code, title = "upload-offset-mismatch", "The chunk does not start where the upload is"


class ChecksumMismatch(ProblemError):
    status, code, title = 422, "checksum-mismatch", "The file is not the one announced"


class InvalidRange(ProblemError):
    status, code, title = 416, "invalid-content-range", "The Content-Range is not valid"


def _problem(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"urn:c4c:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }


def item_hash(item: SyncItem) -> str:
    """What the app asked for, canonically: a retry hashes the same."""
    content = {
        "observation": item.observation,
        "media": [m.model_dump(mode="json") for m in item.media],
        "createdAt": item.createdAt.isoformat(),
        "formVersion": item.formVersion,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"o:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, seq = text.partition(":")
        if kind != "o" or not (seq.isascii() and seq.isdigit()) or int(seq) > MAX_INT:
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidCursor("Use the cursor of the previous page.") from exc


def tips(flags: Sequence[Any] | None) -> list[str]:
    """Advice for the volunteer: each flag's tip, else the message of what went wrong."""
    out: list[str] = []
    for flag in flags or ():
        if not isinstance(flag, dict):
            continue
        tip = flag.get("tip") or (
            flag.get("message") if flag.get("severity") in ("warning", "error") else None
        )
        if isinstance(tip, str) and tip not in out:
            out.append(tip)
    return out


def _media_fields(row: Plain) -> dict[str, Any]:
    stored_at = row["stored_at"]
    return {
        "id": row["id"],
        "contentType": row["content_type"],
        "size": row["size"],
        "received": row["size"] if stored_at else row["received"],
        "stored": stored_at is not None,
    }


def media_state(row: ExpectedMediaRow, **changes: Any) -> MediaState:
    """The state of ``row``, with ``changes`` made since it was read (no ORM object made
    for them: every upload answers so)."""
    return MediaState(**_media_fields(_fields(row) | changes))


def _decoded(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def my_observation(row: Plain, media: Sequence[Plain]) -> dict[str, Any]:
    """A :class:`MyObservation`'s fields, from plain rows (``Repository.page_of``, its JSON
    columns as text, and ``media_of``)."""
    flags = _decoded(row["flags"])
    suggestions = _decoded(row["suggestions"]) or []
    scored, identified = row["scored_at"] is not None, bool(suggestions)
    if row["grade"] == "research":
        status = "research"
    elif identified:
        status = "identified"
    elif scored:
        status = "scored"
    elif any(m["stored_at"] is None for m in media):
        status = "awaiting-media"
    else:
        status = "uploaded"
    return {
        "id": row["id"],
        "project": row["project"],
        "version": row["version"],
        "status": status,
        "scored": scored,
        "identified": identified,
        "observation": _decoded(row["summary"]),
        "quality": {"score": row["score"], "grade": row["grade"], "tips": tips(flags)},
        "suggestions": suggestions,
        "media": [_media_fields(m) for m in media],
        "createdAt": utc(row["created_at"]),
        "updatedAt": utc(row["updated_at"]),
    }


@dataclass(frozen=True)
class ContentRange:
    start: int
    end: int  # inclusive
    total: int

    @classmethod
    def parse(cls, header: str | None, length: int | None) -> ContentRange:
        """``bytes start-end/total``; without the header, the whole file in one go."""
        if header is None:
            if length is None:
                raise InvalidRange("Send Content-Length, and Content-Range for a chunk.")
            return cls(0, length - 1, length)
        try:
            unit, _, spec = header.strip().partition(" ")
            span, _, total = spec.partition("/")
            first, _, last = span.partition("-")
            parsed = cls(int(first), int(last), int(total))
        except ValueError as exc:
            raise InvalidRange("Use Content-Range: bytes <start>-<end>/<total>.") from exc
        if unit != "bytes" or not 0 <= parsed.start <= parsed.end < parsed.total:
            raise InvalidRange("Use Content-Range: bytes <start>-<end>/<total>.")
        if length is not None and length != parsed.end - parsed.start + 1:
            raise InvalidRange("Content-Length does not match the Content-Range.")
        return parsed


@dataclass(frozen=True)
class RenderedPage:
    """A page of "my observations" as sent: its JSON and its (weak) entity tag."""

    body: bytes
    etag: str
    next: str | None


class ShownItems:
    """The items of "my observations" shown lately, as JSON, by everything shown of them
    (their rows as tuples): apps poll their list, and between two polls few of its items
    change, while decoding, checking, advising on and serialising each cost most of a page.
    Whatever changes in a row or its media makes another key, so an item is never shown
    stale; the least recently shown go. The last pages are kept whole too, by the keys of
    their items: an unchanged page is answered from the bytes and tag it had. Only bytes and
    tuples are kept, no models: the garbage collector would walk them at every full pass."""

    def __init__(self, size: int, pages: int = SHOWN_PAGES) -> None:
        self.size = size
        self.pages = pages
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._pages: OrderedDict[Hashable, RenderedPage] = OrderedDict()

    def page(
        self,
        rows: Sequence[Row[Any]],
        media: Mapping[str, Sequence[Row[Any]]],
        next_cursor: str | None,
    ) -> RenderedPage:
        """The page of ``rows`` (with their ``media``, by observation id), ``next_cursor``
        leading on; byte for byte what ``MyObservationPage.model_dump_json`` gives."""
        keys = [_key(row, media[row.id]) for row in rows]
        page_key = (tuple(keys), next_cursor)
        page = self._pages.pop(page_key, None)
        if page is None:
            items = b",".join(
                self._rendered(key, row, media[row.id]) for key, row in zip(keys, rows, strict=True)
            )
            body = b'{"items":[%s],"next":%s}' % (items, json.dumps(next_cursor).encode())
            page = RenderedPage(body, _weak_etag(body), next_cursor)
            if len(self._pages) >= self.pages:
                self._pages.popitem(last=False)
        self._pages[page_key] = page  # the most recently shown last
        return page

    def rendered(self, row: Row[Any], media: Sequence[Row[Any]]) -> bytes:
        """One item's JSON, as a page shows it."""
        return self._rendered(_key(row, media), row, media)

    def _rendered(self, key: Hashable, row: Row[Any], media: Sequence[Row[Any]]) -> bytes:
        shown = self._items.pop(key, None)
        if shown is None:
            shown = shown_item(row, media).model_dump_json().encode()
            if len(self._items) >= self.size:
                self._items.popitem(last=False)
        self._items[key] = shown
        return shown


def shown_item(row: Row[Any], media: Sequence[Row[Any]]) -> MyObservation:
    """An item of "my observations", from the rows of :meth:`Repository.page_of` and
    :meth:`Repository.media_of`."""
    return MyObservation.model_validate(my_observation(row._mapping, [m._mapping for m in media]))


def _key(row: Row[Any], media: Sequence[Row[Any]]) -> Hashable:
    """Everything shown of an item, as plain tuples (compared in C; rows compare in Python)."""
    return tuple(row), tuple(tuple(m) for m in media)


def _weak_etag(content: bytes) -> str:
    return f'W/"{hashlib.sha256(content).hexdigest()[:32]}"'


class StoredMarks:
    """Media that ingest has stored, marked so by the concurrent uploads together (a
    :class:`~c4c.shared.batching.GroupCommit`): one transaction for all that came while the
    previous one was written, where each upload's own would queue for SQLite's one write
    lock, each costing about what the whole batch does. Each upload waits for the commit of
    its mark before it answers."""

    def __init__(self, units: Units) -> None:
        self.units = units
        self._groups = GroupCommit(self._write, name="mobis:stored-marks", max_items=500)

    async def mark(self, media_id: str, size: int, when: datetime) -> None:
        await self._groups.submit((media_id, size, when))

    async def _write(self, marks: Sequence[StoredMark]) -> list[None]:
        async with self.units() as repo:
            await repo.mark_media_stored(marks)
        return [None] * len(marks)


class Observations:
    def __init__(self, units: Units, reads: Units, ingest: Ingest, settings: MobisSettings) -> None:
        """``reads``: read-only units (they take no write lock), for what only reads."""
        self.units = units
        self.reads = reads
        self.ingest = ingest
        self.settings = settings
        self.upload_dir = settings.resolved_upload_dir
        self.stored = StoredMarks(units)
        self.shown = ShownItems(SHOWN_ITEMS)

    # --- sync ------------------------------------------------------------------------------

    async def sync(self, user: UserRow, items: Sequence[SyncItem]) -> list[SyncOutcome]:
        """One outcome per item, in order; new observations go to ingest in one batch,
        edits one PATCH each (If-Match: the version the app edited)."""
        ids = [str(item.id) for item in items]
        announced = [str(m.id) for item in items for m in item.media]
        async with self.reads() as repo:
            owned = await repo.owned(ids)
            known_media = await repo.media(announced)
            media_of = await repo.media_of([i for i, r in owned.items() if r.user_id == user.id])
        outcomes: dict[int, SyncOutcome] = {}
        creates: list[tuple[int, SyncItem, str]] = []
        edits: list[tuple[int, SyncItem, str, OwnedObservationRow]] = []
        seen: set[str] = set()
        claimed: dict[str, str] = {}  # media id -> the observation of this sync announcing it
        for index, item in enumerate(items):
            observation_id, digest = str(item.id), item_hash(item)
            row = owned.get(observation_id)
            media_ids = [str(m.id) for m in item.media]
            taken = [
                m
                for m in media_ids
                if (k := known_media.get(m)) is not None and k.observation_id != observation_id
            ]
            too_large = [
                i for i, m in enumerate(item.media) if m.size > self.settings.media_max_bytes
            ]
            if observation_id in seen:
                outcomes[index] = _error(index, observation_id, 422, "duplicate-item", "Repeated")
            elif len(set(media_ids)) < len(media_ids) or any(
                claimed.get(m, observation_id) != observation_id for m in media_ids
            ):
                outcomes[index] = _error(
                    index, observation_id, 422, "duplicate-media", "A media id is announced twice"
                )
            elif too_large:
                outcomes[index] = _error(
                    index,
                    observation_id,
                    422,
                    "media-too-large",
                    f"media[{too_large[0]}].size exceeds {self.settings.media_max_bytes} bytes",
                )
            elif (row is not None and row.user_id != user.id) or taken:
                # Never say whose: to this user the id is simply not available.
                outcomes[index] = _error(
                    index, observation_id, 409, "id-taken", "Use new ids (UUIDs) for new things"
                )
            elif row is not None and not row.confirmed:
                creates.append((index, item, digest))  # an earlier attempt did not finish
            elif row is not None and row.body_hash == digest:
                missing = [m.id for m in media_of.get(observation_id, []) if m.stored_at is None]
                outcomes[index] = SyncOutcome(
                    index=index,
                    id=observation_id,
                    status="duplicate",
                    version=row.version,
                    missingMedia=missing,
                )
            elif row is not None and item.baseVersion is None:
                outcomes[index] = await self._conflict(index, observation_id)
            elif row is not None:
                edits.append((index, item, digest, row))
            elif item.baseVersion is not None:
                outcomes[index] = _error(
                    index, observation_id, 404, "observation-not-found", "Not on the server"
                )
            else:
                creates.append((index, item, digest))
            seen.add(observation_id)
            if outcomes.get(index) is None:
                claimed.update(dict.fromkeys(media_ids, observation_id))
        if creates:
            outcomes.update(await self._create(user, creates))
        for index, item, digest, row in edits:
            outcomes[index] = await self._edit(user, index, item, digest, row)
        result = [outcomes[i] for i in range(len(items))]
        for outcome in result:
            metrics.SYNC_ITEMS.labels(outcome.status).inc()
        return result

    def _ingest_body(self, user: UserRow, item: SyncItem) -> dict[str, Any]:
        return {**item.observation, "id": str(item.id), "recordedBy": user.display_name}

    @staticmethod
    def _summary(item: SyncItem) -> dict[str, Any]:
        return {
            **item.observation,
            "createdAt": item.createdAt.isoformat(),
            "formVersion": item.formVersion,
        }

    async def _create(
        self, user: UserRow, creates: Sequence[tuple[int, SyncItem, str]]
    ) -> dict[int, SyncOutcome]:
        """Reserve the rows, send them to ingest, then confirm them (or drop the refused).
        Reserved first, because ingest's events about them (a score) may arrive before its
        answer does; an attempt cut short leaves reservations that its retry sends again
        (or, if none comes, :meth:`settle_reservations` settles)."""
        now = datetime.now(UTC)
        rows = {
            str(item.id): {
                "id": str(item.id),
                "user_id": user.id,
                "project": str(item.observation.get("datasetID", "")),
                "body_hash": digest,
                "version": 1,
                "summary": self._summary(item),
                "confirmed": False,
                "created_at": now,
                "updated_at": now,
            }
            for _, item, digest in creates
        }
        outcomes: dict[int, SyncOutcome] = {}
        async with self.units() as repo:
            inserted = await repo.add_owned(list(rows.values()))
            # Reservations of an earlier attempt, locked: the settler cannot drop them now,
            # and their new ``updated_at`` keeps it from dropping them until this sync ends.
            earlier = await repo.owned_locked([i for i in rows if i not in inserted])
            reserved = set(inserted)
            for observation_id, row in earlier.items():
                if row.user_id == user.id and not row.confirmed:
                    reserved.add(observation_id)
                    values = rows[observation_id]
                    await repo.update_owned(
                        observation_id,
                        {k: values[k] for k in ("body_hash", "summary", "project", "updated_at")},
                    )
            # Dropped by the settler between our insert and our lock: reserved anew.
            vanished = [i for i in rows if i not in inserted and i not in earlier]
            inserted |= await repo.add_owned([rows[i] for i in vanished])
            reserved |= inserted
            announced = [
                _media_row(str(i.id), m)
                for _, i, _ in creates
                if str(i.id) in inserted
                for m in i.media
            ]
            added = await repo.add_media(announced)
            # A concurrent sync announced one of these media for another observation.
            clashed = {m["observation_id"] for m in announced if m["id"] not in added}
            await repo.drop_reserved(list(clashed))
            reserved -= clashed
        sending = [c for c in creates if str(c[1].id) in reserved]
        for index, item, _ in creates:
            if str(item.id) in clashed:
                outcomes[index] = _error(
                    index, str(item.id), 409, "id-taken", "Use new ids (UUIDs) for new things"
                )
        answers = await self.ingest.create_batch(
            [self._ingest_body(user, i) for _, i, _ in sending]
        )
        confirmed: list[str] = []
        refused: list[str] = []
        for (index, item, _), answer in zip(sending, answers, strict=True):
            observation_id = str(item.id)
            if answer.get("status") not in ("created", "duplicate"):
                refused.append(observation_id)
                problem = answer.get("problem") or {}
                outcomes[index] = SyncOutcome(
                    index=index, id=observation_id, status="error", problem=problem
                )
                continue
            confirmed.append(observation_id)
            outcomes[index] = SyncOutcome(
                index=index,
                id=observation_id,
                status="created",
                version=1,
                missingMedia=[str(m.id) for m in item.media],
            )
        async with self.units() as repo:
            await repo.confirm_owned(confirmed)
            await repo.drop_reserved(refused)
        for index, item, _ in creates:
            if str(item.id) not in reserved and str(item.id) not in clashed:
                # A concurrent sync of the same item won: answer as its retry would be.
                outcomes[index] = SyncOutcome(
                    index=index,
                    id=str(item.id),
                    status="duplicate",
                    version=1,
                    missingMedia=[str(m.id) for m in item.media],
                )
        return outcomes

    async def _conflict(self, index: int, observation_id: str) -> SyncOutcome:
        server = await self.ingest.get(observation_id)
        return SyncOutcome(
            index=index,
            id=observation_id,
            status="conflict",
            version=server["version"] if server else None,
            serverVersion=server,
            problem=_problem(
                409,
                "stale-version",
                "Changed on the server",
                "Merge with serverVersion and send again with its version as baseVersion.",
            ),
        )

    async def _edit(
        self, user: UserRow, index: int, item: SyncItem, digest: str, row: OwnedObservationRow
    ) -> SyncOutcome:
        observation_id = str(item.id)
        assert item.baseVersion is not None
        try:
            answer = await self.ingest.patch(observation_id, item.baseVersion, item.observation)
        except UpstreamRefused as exc:
            return SyncOutcome(
                index=index,
                id=observation_id,
                status="error",
                problem=exc.extensions.get("problem")
                or _problem(exc.status, "upstream-refused", exc.title, str(exc.detail)),
            )
        if answer.gone or answer.observation is None:
            return _error(index, observation_id, 410, "observation-deleted", "Deleted")
        if answer.stale:
            return await self._conflict(index, observation_id)
        version = int(answer.observation["version"])
        async with self.units() as repo:
            known = await repo.media_of([observation_id])
            have = {m.id for m in known[observation_id]}
            new_media = [_media_row(observation_id, m) for m in item.media if str(m.id) not in have]
            await repo.add_media(new_media)
            await repo.update_owned(
                observation_id,
                {
                    "body_hash": digest,
                    "version": max(version, row.version),
                    "summary": self._summary(item),
                    "updated_at": datetime.now(UTC),
                },
            )
            missing = [m.id for m in known[observation_id] if m.stored_at is None]
        return SyncOutcome(
            index=index,
            id=observation_id,
            status="updated",
            version=version,
            missingMedia=missing + [m["id"] for m in new_media],
        )

    # --- my observations -------------------------------------------------------------------

    async def mine(self, user: UserRow, cursor: str | None, limit: int | None) -> RenderedPage:
        size = min(limit or self.settings.page_size, 500)
        before = decode_cursor(cursor) if cursor else None
        async with self.reads() as repo:
            rows = await repo.page_of(user.id, before=before, limit=size + 1)
            more, rows = len(rows) > size, rows[:size]
            media = await repo.media_of([r.id for r in rows])
        return self.shown.page(rows, media, encode_cursor(rows[-1].seq) if more and rows else None)

    async def one(self, user: UserRow, observation_id: str) -> MyObservation:
        async with self.reads() as repo:
            rows = await repo.page_of(user.id, before=None, limit=1, only=observation_id)
            if not rows:
                raise ObservationNotFound(f"You have no observation {observation_id}.")
            media = await repo.media_of([observation_id])
        return shown_item(rows[0], media[observation_id])

    # --- media -----------------------------------------------------------------------------

    async def missing_media(self, user: UserRow, observation_id: str) -> MissingMedia:
        mine = await self.one(user, observation_id)
        return MissingMedia(
            observationId=observation_id, missing=[m for m in mine.media if not m.stored]
        )

    @staticmethod
    async def my_media(repo: Repository, user: UserRow, media_id: str) -> ExpectedMediaRow:
        """The media, if of an observation of this user's (never another user's)."""
        return Observations.found(await repo.media_of_user(media_id, user.id), media_id)

    @staticmethod
    def found(media: ExpectedMediaRow | None, media_id: str) -> ExpectedMediaRow:
        """The media looked up as the user's, or not found (whether it is another's or
        nobody's, never said)."""
        if media is None:
            raise MediaNotFound(f"You have no media {media_id}.")
        return media

    async def media_status(self, user: UserRow, media_id: str) -> MediaState:
        async with self.reads() as repo:
            return media_state(await self.my_media(repo, user, media_id))

    def _part(self, media_id: str) -> Path:
        return self.upload_dir / f"{uuid.UUID(media_id)}.part"

    async def upload_chunk(
        self, media: ExpectedMediaRow, span: ContentRange, chunks: AsyncIterator[bytes]
    ) -> MediaState:
        """Append one chunk to the user's ``media`` (see :meth:`my_media`) at the offset the
        server holds; the last one sends the whole file on to ingest. A chunk cut off by a
        dropped connection is not counted: the app asks for the offset and sends it again."""
        media_id = media.id
        if media.stored_at is not None:
            return media_state(media)
        if span.total != media.size:
            raise InvalidRange(f"The file announced has {media.size} bytes.", size=media.size)
        if span.start != media.received:
            raise UploadOutOfOrder(
                f"Send the bytes from offset {media.received}.", received=media.received
            )
        if span.start == 0 and span.end == span.total - 1:
            return await self._store_whole(media, await _collect(chunks, span.total))
        part = self._part(media_id)
        received = await _append(part, media.received, span.end - span.start + 1, chunks)
        if received < media.size:
            async with self.units() as repo:
                await repo.update_media(media_id, {"received": received})
            return media_state(media, received=received)
        if await _sha256(part) != media.sha256.lower():
            part.unlink(missing_ok=True)
            async with self.units() as repo:
                await repo.update_media(media_id, {"received": 0})
            raise ChecksumMismatch(
                "The bytes received do not match the sha256 announced; "
                "upload the file again from offset 0."
            )
        state = await self._send_on(media, _read(part))
        part.unlink(missing_ok=True)
        return state

    async def _store_whole(self, media: ExpectedMediaRow, data: bytes) -> MediaState:
        """A file sent in one request (the usual photo): checked in memory, no staging."""
        if hashlib.sha256(data).hexdigest() != media.sha256:
            raise ChecksumMismatch("The bytes received do not match the sha256 announced.")
        return await self._send_on(media, data)

    async def _send_on(
        self, media: ExpectedMediaRow, content: bytes | AsyncIterator[bytes]
    ) -> MediaState:
        await self.ingest.upload_media(
            media.observation_id, media.id, media.content_type, media.size, content
        )
        now = datetime.now(UTC)
        await self.stored.mark(media.id, media.size, now)
        return media_state(media, received=media.size, stored_at=now)

    # --- events ----------------------------------------------------------------------------

    @staticmethod
    async def event_states(
        repo: Repository, changes: Sequence[StateChange]
    ) -> dict[str, EventState]:
        """The state of the observations these changes are about, locked until the
        transaction ends; those MOBIS does not hold (not synced by an app) are absent."""
        return await repo.event_states(sorted({subject_of(change) for change in changes}))

    @staticmethod
    async def apply_events(
        repo: Repository,
        rows: Mapping[str, EventState],
        changes: Sequence[tuple[StateChange, datetime]],
    ) -> set[str]:
        """What events told of the users' observations (scores, identifications, new
        versions), in the order they came, onto their ``rows`` (:meth:`event_states`) with a
        few statements for them all (plain rows, no ORM objects: every observation brings
        three events): the state on each observation and a notification per score or
        identification; the owners to tell."""
        changed: dict[str, dict[str, Any]] = {}
        notifications: list[dict[str, Any]] = []
        owners: set[str] = set()
        now = datetime.now(UTC)
        for change, when in changes:
            row = rows.get(subject_of(change))
            if row is None:
                continue
            values = changed.setdefault(row.id, {})
            if isinstance(change, ObservationUpdated):
                if change.version > row.version:
                    row.version = values["version"] = change.version
                continue
            if row.user_id is None:
                continue
            if isinstance(change, ObservationScored):
                if (utc(row.scored_at) or when) > when:
                    continue  # an older assessment, late
                flags = [f.model_dump(exclude_none=True) for f in change.flags]
                values |= {"score": change.score, "grade": change.grade, "flags": flags}
                row.scored_at = values["scored_at"] = when
                data: dict[str, Any] = {
                    "score": change.score,
                    "grade": change.grade,
                    "tips": tips(flags),
                }
                kind = "scored"
            else:
                if (utc(row.identified_at) or when) > when:
                    continue
                suggestions = (
                    []
                    if change.rejected
                    else [c.model_dump(exclude_none=True) for c in change.candidates]
                )
                values |= {"suggestions": suggestions, "identification_rejected": change.rejected}
                row.identified_at = values["identified_at"] = when
                data = {"rejected": change.rejected, "suggestions": suggestions[:5]}
                kind = "identified"
            values["updated_at"] = now
            notifications.append(
                {
                    "user_id": row.user_id,
                    "observation_id": row.id,
                    "kind": kind,
                    "data": data,
                    "created_at": when,
                }
            )
            owners.add(row.user_id)
        await repo.update_owned_many({i: v for i, v in changed.items() if v})
        await repo.add_notifications(notifications)
        return owners

    # --- reservations a sync left --------------------------------------------------------

    async def settle_reservations(self, batch: int = 100) -> bool:
        """Forget up to ``batch`` reservations untouched for the grace period whose
        observation ingest does not have (their sync was refused, or cut off before ingest
        got them), with their announced media. One ingest has stays, unconfirmed, for the
        app's retry to confirm: ingest holding an observation under that id (even an equal
        one) does not make it this user's, so confirming is left to the sync, and nothing is
        sent to ingest here; it is touched, so the next passes look at others. A sync
        retrying one meanwhile confirms it or touches it, and then it is not forgotten.
        Whether more may be left."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.reservation_grace_seconds)
        async with self.reads() as repo:
            ids = await repo.stale_reservations(cutoff, batch)
        if not ids:
            return False
        absent: list[str] = []
        present: list[str] = []
        for observation_id in ids:
            try:
                found = await self.ingest.get(observation_id)
            except ProblemError as exc:  # that one stays for a later pass; the others go on
                log.warning("reservation not checked", extra={"detail": exc.detail})
                continue
            (absent if found is None else present).append(observation_id)
        async with self.units() as repo:
            dropped = await repo.drop_reserved(absent, untouched_since=cutoff)
            await repo.touch_reservations(present, untouched_since=cutoff)
        metrics.RESERVATIONS_DROPPED.inc(dropped)
        log.info(
            "stale reservations settled",
            extra={"dropped": dropped, "awaiting_retry": len(present)},
        )
        return len(ids) == batch

    # --- forget me -------------------------------------------------------------------------

    async def pseudonymise_pending(self, batch: int = 50) -> bool:
        """Replace the deleted users' names on their observations in ingest, then forget
        the observations here (all but their ids); whether any was done, and so more may be
        left (failures stay for the next round). It resumes after a restart: the pending
        ones are in the database."""
        async with self.units() as repo:
            rows = await repo.awaiting_pseudonym(batch)
            media = await repo.media_of([r.id for r in rows])
        done = 0
        for row in rows:
            if await self._pseudonymise(row.id, row.pseudonym or "anonymous"):
                async with self.units() as repo:
                    await repo.forget_observation(row.id)
                for m in media[row.id]:
                    self._part(m.id).unlink(missing_ok=True)
                done += 1
        return done > 0

    async def _pseudonymise(self, observation_id: str, pseudonym: str) -> bool:
        for _ in range(3):  # the observation may change between our read and our write
            current = await self.ingest.get(observation_id)
            if current is None:
                return True
            if current.get("recordedBy") == pseudonym:
                return True
            outcome = await self.ingest.patch(
                observation_id, int(current["version"]), {"recordedBy": pseudonym}
            )
            if not outcome.stale:
                return True
        return False


def _error(index: int, observation_id: str, status: int, code: str, title: str) -> SyncOutcome:
    return SyncOutcome(
        index=index,
        id=observation_id,
        status="error",
        problem=_problem(status, code, title, title + "."),
    )


def _media_row(observation_id: str, media: Any) -> dict[str, Any]:
    return {
        "id": str(media.id),
        "observation_id": observation_id,
        "sha256": media.sha256.lower(),
        "size": media.size,
        "content_type": media.contentType,
        "received": 0,
        "stored_at": None,
    }


def _fields(media: ExpectedMediaRow) -> dict[str, Any]:
    return {
        c: getattr(media, c)
        for c in ("id", "observation_id", "sha256", "size", "content_type", "received", "stored_at")
    }


def subject_of(change: StateChange) -> str:
    return change.id if isinstance(change, ObservationUpdated) else change.observation_id


async def _append(path: Path, offset: int, length: int, chunks: AsyncIterator[bytes]) -> int:
    """Write exactly ``length`` bytes at ``offset`` (dropping anything past it from an
    earlier, cut-off try); the new size."""
    folder = anyio.Path(path.parent)
    await folder.mkdir(parents=True, exist_ok=True)
    exists = await anyio.Path(path).exists()
    async with await anyio.open_file(path, "r+b" if exists else "w+b") as file:
        await file.truncate(offset)
        await file.seek(offset)
        written = 0
        async for chunk in chunks:
            written += len(chunk)
            if written > length:
                raise InvalidRange("The body is longer than its Content-Range.")
            await file.write(chunk)
        if written != length:
            raise InvalidRange("The body is shorter than its Content-Range.")
    return offset + length


async def _collect(chunks: AsyncIterator[bytes], length: int) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > length:
            raise InvalidRange("The body is longer than its Content-Range.")
    if len(data) != length:
        raise InvalidRange("The body is shorter than its Content-Range.")
    return bytes(data)


async def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _read(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(READ_CHUNK):
            yield chunk
