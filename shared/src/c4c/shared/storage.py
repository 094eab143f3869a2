"""Media storage: a port for content-addressed blobs and its local-disk adapter.

A blob is written in two steps. :meth:`MediaStorage.stage` streams the bytes to a private
temporary place, computing their SHA-256 and refusing more than ``max_bytes``, so that the
caller can inspect the staged file (sniff its type, probe it) before anything is visible;
:meth:`MediaStorage.commit` then moves it, atomically, to its content-addressed key
(``ab/cd/abcdef…``: the same bytes are stored once), and :meth:`MediaStorage.discard`
throws it away. :meth:`MediaStorage.store` does the three at once, running the caller's
check on the durable staged bytes and committing only what passes.

Scale-out path: an S3-compatible adapter implements the same port — ``stage`` as a
multipart upload under ``tmp/`` (the SHA-256 computed while streaming, as here),
``commit`` as a server-side copy to the content-addressed key then a delete of the staged
object, ``read`` as a ranged ``GetObject`` and ``local_path`` returning ``None`` (callers
then stream with ``read``, or redirect to a presigned URL); ``store`` spools the bytes to a
local temporary file for the check while they go up. Nothing above the port changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import anyio

from c4c.shared.problems import BodyTooLarge, NotFound

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}$")
READ_CHUNK = 64 * 1024
WRITE_BUFFER = 256 * 1024
"""Bytes gathered before they go to the disk. Every trip to a worker thread costs more CPU
than writing a photo (a dozen trips made a 15 KB upload cost 1.5 ms against 0.3 ms for the
file work itself), so a file up to this size is written, fsynced, checked and moved in one
trip, a larger one in a trip per this many bytes: memory per upload stays bounded."""
HEAD = 4096
T = TypeVar("T")
Check = Callable[[bytes, BinaryIO], T]
"""A check of staged bytes, run in a worker thread: (their first bytes, the file at its
start) → a result for the caller; it raises to refuse them."""


class MediaTooLarge(BodyTooLarge):
    code = "media-too-large"
    title = "The media file is too large"


class BlobNotFound(NotFound):
    code = "blob-not-found"
    title = "The stored file is missing"


@dataclass(frozen=True)
class StagedBlob:
    """Bytes written but not yet visible: inspect ``path``, then commit or discard."""

    path: Path
    sha256: str
    size: int
    head: bytes
    """The first bytes (up to 4 KiB), for type sniffing without reopening the file."""

    @property
    def key(self) -> str:
        return content_key(self.sha256)


def content_key(sha256: str) -> str:
    """The content-addressed key of a blob: ``ab/cd/<sha256>``."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


class MediaStorage(Protocol):
    async def stage(self, chunks: AsyncIterable[bytes], *, max_bytes: int) -> StagedBlob:
        """Stream ``chunks`` to a staging place; :class:`MediaTooLarge` past ``max_bytes``."""
        ...

    async def commit(self, staged: StagedBlob) -> str:
        """Make the staged bytes visible under their content key; returns the key."""
        ...

    async def store(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, check: Check[T]
    ) -> tuple[StagedBlob, T]:
        """Stage ``chunks``, run ``check`` on them once durable, and commit them only if it
        passes (nothing is kept otherwise): the blob (now under its key) and the result."""
        ...

    async def discard(self, staged: StagedBlob) -> None: ...

    async def size(self, key: str) -> int:
        """Size of a stored blob; :class:`BlobNotFound` if absent."""
        ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of a stored blob, in chunks."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A file path for the blob when the adapter has one (sendfile, Range support)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove a blob (callers check that nothing else refers to the same content)."""
        ...


def _unchecked(head: bytes, file: BinaryIO) -> None:
    """No check: :meth:`MediaStorage.stage` leaves it to the caller."""


class LocalDiskStorage:
    """Blobs as files under ``root``; staging under ``root/.staging`` (same file system, so
    the final rename is atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / ".staging"

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise BlobNotFound(f"No stored file has the key {key!r}.")
        return self.root / key

    async def stage(self, chunks: AsyncIterable[bytes], *, max_bytes: int) -> StagedBlob:
        staged, _ = await self._stage(chunks, max_bytes, _unchecked, commit=False)
        return staged

    async def commit(self, staged: StagedBlob) -> str:
        await anyio.to_thread.run_sync(self._move, staged)
        return staged.key

    async def store(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, check: Check[T]
    ) -> tuple[StagedBlob, T]:
        return await self._stage(chunks, max_bytes, check, commit=True)

    async def _stage(
        self,
        chunks: AsyncIterable[bytes],
        max_bytes: int,
        check: Check[T],
        *,
        commit: bool,
    ) -> tuple[StagedBlob, T]:
        """Stream to a staging file: chunks gather in memory up to ``WRITE_BUFFER`` and go
        to the disk in one worker-thread trip each; the last trip also fsyncs, checks and,
        with ``commit``, moves the file to its key."""
        path = self.staging / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        head = b""
        pending: list[bytes] = []
        pending_size = 0
        file: BinaryIO | None = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > max_bytes:
                    raise MediaTooLarge(
                        f"The file is larger than the limit of {max_bytes} bytes.",
                        limit_bytes=max_bytes,
                    )
                if len(head) < HEAD:
                    head += chunk[: HEAD - len(head)]
                digest.update(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BUFFER:
                    file = await anyio.to_thread.run_sync(self._write, path, file, pending)
                    pending, pending_size = [], 0
            staged = StagedBlob(path=path, sha256=digest.hexdigest(), size=size, head=head)

            def finish() -> T:
                nonlocal file
                file = self._write(path, file, pending)
                file.flush()
                os.fsync(file.fileno())
                file.seek(0)
                result = check(head, file)
                file.close()
                if commit:
                    self._move(staged)
                return result

            return staged, await anyio.to_thread.run_sync(finish)
        except BaseException:
            if file is not None:
                file.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise

    def _write(self, path: Path, file: BinaryIO | None, chunks: list[bytes]) -> BinaryIO:
        """Append ``chunks`` to the staging file, created on the first call."""
        if file is None:
            try:
                file = path.open("xb+")
            except FileNotFoundError:  # the first upload: no staging folder yet
                self.staging.mkdir(parents=True, exist_ok=True)
                file = path.open("xb+")
        file.writelines(chunks)
        return file

    def _move(self, staged: StagedBlob) -> None:
        target = self.root / staged.key
        # Same content, same key: replacing an existing copy with identical bytes is harmless.
        synced = [target.parent]
        try:
            staged.path.replace(target)
        except FileNotFoundError:  # the first blob under this prefix
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.path.replace(target)
            synced += [target.parent.parent, self.root]
        # The rename (and new folders) made durable too, before a row may point at the blob.
        for folder in synced:
            _fsync_folder(folder)

    async def discard(self, staged: StagedBlob) -> None:
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(staged.path).unlink()

    async def size(self, key: str) -> int:
        try:
            return (await anyio.Path(self._path(key)).stat()).st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(f"No stored file has the key {key!r}.") from exc

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        async with await anyio.open_file(self._path(key), "rb") as file:
            await file.seek(start)
            remaining = None if end is None else max(end - start, 0)
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await file.read(want)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(self._path(key)).unlink()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
