"""Media files of the video service under ``<media_dir>/video``: uploaded clips, keyframes
and event clips. Uploads stream to disk in bounded chunks and appear under their final name
only when complete (write to a temporary name, fsync, rename).

Kept here until ``c4c.shared`` has a media storage; the same shape would fit there.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, Literal

Kind = Literal["uploads", "keyframes", "clips"]
KINDS: tuple[Kind, ...] = ("uploads", "keyframes", "clips")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
_FLUSH_BYTES = 1024 * 1024


class TooLarge(Exception):
    pass


class MediaStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        for kind in KINDS:
            (self.root / kind).mkdir(parents=True, exist_ok=True)

    def path(self, kind: Kind, name: str) -> Path:
        """The file ``name`` of ``kind``; a name that could leave the folder is refused."""
        if not _NAME.match(name) or ".." in name:
            raise ValueError(f"invalid media name {name!r}")
        return self.root / kind / name

    @property
    def clip_dir(self) -> Path:
        return self.root / "clips"

    async def save_stream(
        self, kind: Kind, chunks: AsyncIterator[bytes], *, suffix: str, max_bytes: int
    ) -> tuple[str, int]:
        """Write ``chunks`` to a new file; (its name, its size). Nothing is left behind on
        failure, and no more than ``max_bytes`` are written."""
        name = f"{uuid.uuid4().hex}{suffix}"
        final = self.path(kind, name)
        partial = final.with_name(f".{name}.part")
        size = 0
        buffer = bytearray()
        file: BinaryIO = await asyncio.to_thread(partial.open, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"larger than {max_bytes} bytes")
                buffer += chunk
                if len(buffer) >= _FLUSH_BYTES:
                    await asyncio.to_thread(file.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(_finish, file, bytes(buffer))
            await asyncio.to_thread(os.replace, partial, final)
        except BaseException:
            file.close()
            partial.unlink(missing_ok=True)
            raise
        return name, size

    def write_bytes(self, kind: Kind, data: bytes, *, suffix: str) -> str:
        """Store ``data`` (synchronous: called from worker threads)."""
        name = f"{uuid.uuid4().hex}{suffix}"
        final = self.path(kind, name)
        partial = final.with_name(f".{name}.part")
        with partial.open("wb") as file:
            file.write(data)
        partial.replace(final)
        return name

    def delete(self, kind: Kind, name: str) -> None:
        self.path(kind, name).unlink(missing_ok=True)


def _finish(file: BinaryIO, rest: bytes) -> None:
    file.write(rest)
    file.flush()
    os.fsync(file.fileno())
    file.close()
