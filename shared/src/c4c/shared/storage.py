"""Media storage: a port for content-addressed blobs and its local-disk adapter.

A blob is written in two steps. :meth:`MediaStorage.stage` streams the bytes to a private
temporary place, computing their SHA-256 and refusing more than ``max_bytes``, so that the
caller can inspect the staged file (sniff its type, probe it) before anything is visible;
:meth:`MediaStorage.commit` then moves it, atomically, to its content-addressed key
(``ab/cd/abcdef…``: the same bytes are stored once), and :meth:`MediaStorage.discard`
throws it away.

Scale-out path: an S3-compatible adapter implements the same port — ``stage`` as a
multipart upload under ``tmp/`` (the SHA-256 computed while streaming, as here),
``commit`` as a server-side copy to the content-addressed key then a delete of the staged
object, ``read`` as a ranged ``GetObject`` and ``local_path`` returning ``None`` (callers
then stream with ``read``, or redirect to a presigned URL). Nothing above the port changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from c4c.shared.problems import BodyTooLarge, NotFound

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}$")
READ_CHUNK = 64 * 1024


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
        await anyio.Path(self.staging).mkdir(parents=True, exist_ok=True)
        path = self.staging / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        head = bytearray()
        try:
            async with await anyio.open_file(path, "xb") as file:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    size += len(chunk)
                    if size > max_bytes:
                        raise MediaTooLarge(
                            f"The file is larger than the limit of {max_bytes} bytes.",
                            limit_bytes=max_bytes,
                        )
                    if len(head) < 4096:
                        head += chunk[: 4096 - len(head)]
                    digest.update(chunk)
                    await file.write(chunk)
                await file.flush()
                await anyio.to_thread.run_sync(os.fsync, file.wrapped.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return StagedBlob(path=path, sha256=digest.hexdigest(), size=size, head=bytes(head))

    async def commit(self, staged: StagedBlob) -> str:
        target = self.root / staged.key
        await anyio.Path(target.parent).mkdir(parents=True, exist_ok=True)
        # Same content, same key: replacing an existing copy with identical bytes is harmless.
        await anyio.to_thread.run_sync(os.replace, staged.path, target)
        return staged.key

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
