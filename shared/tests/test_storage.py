"""The local-disk media storage: streamed with bounded memory, hashed, size-limited,
checked before anything is visible, content-addressed."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest

from c4c.shared.storage import WRITE_BUFFER, LocalDiskStorage, MediaTooLarge


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def read_all(head: bytes, file: BinaryIO) -> tuple[bytes, bytes]:
    return head, file.read()


async def test_store_checks_the_durable_bytes_then_commits_them(tmp_path: Path) -> None:
    storage = LocalDiskStorage(tmp_path)
    data = bytes(range(256)) * 40  # 10 KiB, over the 4 KiB head

    blob, (head, seen) = await storage.store(
        chunks_of(data[:3000], b"", data[3000:]), max_bytes=len(data), check=read_all
    )

    assert seen == data
    assert head == data[:4096] == blob.head
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert blob.size == len(data)
    assert blob.key == f"{blob.sha256[:2]}/{blob.sha256[2:4]}/{blob.sha256}"
    assert files_under(tmp_path) == [tmp_path / blob.key]
    assert (tmp_path / blob.key).read_bytes() == data


async def test_a_refused_check_or_an_oversized_file_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalDiskStorage(tmp_path)

    def refuse(head: bytes, file: BinaryIO) -> None:
        assert file.read() == b"not a photo"
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await storage.store(chunks_of(b"not a photo"), max_bytes=100, check=refuse)
    with pytest.raises(MediaTooLarge):
        await storage.store(chunks_of(b"x" * 60, b"x" * 60), max_bytes=100, check=read_all)
    with pytest.raises(MediaTooLarge):
        await storage.stage(chunks_of(b"x" * 101), max_bytes=100)

    assert files_under(tmp_path) == []


async def test_a_large_file_reaches_the_disk_while_it_streams(tmp_path: Path) -> None:
    """Memory per upload stays bounded: what is past the write buffer is on disk before the
    stream ends."""
    storage = LocalDiskStorage(tmp_path)
    piece = b"y" * (64 * 1024)
    pieces = WRITE_BUFFER // len(piece) * 3
    on_disk: list[int] = []

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(pieces):
            yield piece
            on_disk.append(sum(p.stat().st_size for p in files_under(storage.staging)))

    staged = await storage.stage(stream(), max_bytes=pieces * len(piece))

    assert max(on_disk) >= 2 * WRITE_BUFFER
    assert all(
        sent * len(piece) - written <= WRITE_BUFFER for sent, written in enumerate(on_disk, 1)
    )
    assert staged.path.stat().st_size == pieces * len(piece)
    await storage.discard(staged)
    assert files_under(tmp_path) == []


async def test_the_same_bytes_twice_are_one_file(tmp_path: Path) -> None:
    storage = LocalDiskStorage(tmp_path)

    first = await storage.commit(await storage.stage(chunks_of(b"same"), max_bytes=10))
    again, _ = await storage.store(chunks_of(b"sa", b"me"), max_bytes=10, check=read_all)

    assert again.key == first
    assert files_under(tmp_path) == [tmp_path / first]
    assert await storage.size(first) == 4
