"""Every URL FFmpeg opens for a source goes through here (PyAV's ``io_open`` hook): the
stream URL itself, and whatever it names in turn — HLS variant playlists, segments and keys,
DASH representations — so each one meets the URL policy, not only the URL the caller gave.

HTTP is spoken by httpx, not by FFmpeg: redirects are followed by hand, each hop checked,
and the connection goes to the very address that was checked (the host name is resolved
once, checked, then pinned; TLS still verifies the certificate against the name), so a DNS
answer that changes between check and connect (rebinding) cannot move it elsewhere.

Once one URL is refused, the source is refused as a whole: every later open or read fails,
so FFmpeg cannot skip the refused segment and carry on, and the reason reaches the status.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from c4c.shared.urls import (
    HTTP_SCHEMES,
    IPAddress,
    UnsafeURL,
    URLPolicy,
    addresses_of,
    check_addresses,
    check_file,
)

AVIO_FLAG_WRITE = 2
READ_CHUNK = 64 * 1024
SKIP_FORWARD = 256 * 1024  # a forward seek this short reads on instead of a new request


def checked_addresses(host: str, port: int, policy: URLPolicy) -> list[IPAddress]:
    """The addresses of ``host`` to connect to, every one allowed by ``policy``, or
    :class:`UnsafeURL`. Synchronous: called from FFmpeg's thread."""
    addresses = addresses_of(host, port)
    check_addresses(host, addresses, policy)
    return addresses


class GuardedOpener:
    """PyAV's ``io_open`` for one source: opens ``source`` and what it names, under ``policy``.

    ``refusal`` says why the source was refused, once it was; ``nested`` whether the source
    named anything else to open (a playlist or manifest)."""

    def __init__(self, source: str, policy: URLPolicy, timeout: httpx.Timeout) -> None:
        self.source = source
        self.policy = policy
        self.refusal: str | None = None
        self.nested = False
        self.timeout = timeout
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        # Made at the first HTTP request: its TLS context costs 30-60 ms of CPU, as much as
        # analysing a short local clip does.
        if self._client is None:
            # No environment proxies: a proxy would connect on our behalf to unchecked places.
            self._client = httpx.Client(
                follow_redirects=False, timeout=self.timeout, trust_env=False
            )
        return self._client

    def __call__(self, url: str, flags: int, options: dict[str, Any]) -> Any:
        self.ensure_allowed()
        self.nested = self.nested or url != self.source
        try:
            if flags & AVIO_FLAG_WRITE:
                raise UnsafeURL(f"FFmpeg asked to write {url}")
            scheme = urlsplit(url).scheme.lower()
            if scheme in HTTP_SCHEMES:
                return HTTPFile(self, url)
            if scheme in ("", "file"):
                return self._open_file(url)
            raise UnsafeURL(f"the scheme {scheme!r} is not opened for a source's parts")
        except UnsafeURL as exc:
            self.refuse(url, exc)
            raise

    def _open_file(self, url: str) -> BinaryIO:
        if url == self.source:  # a path the caller opened (an upload) or checked already
            return _local_path(url).open("rb")
        # Anything else a source names on disk needs the file policy (root, existence).
        uri = url if url.startswith("file:") else Path(url).resolve().as_uri()
        return check_file(uri, self.policy).open("rb")

    def refuse(self, url: str, exc: UnsafeURL) -> None:
        if self.refusal is None:
            shown = url if len(url) <= 200 else url[:200] + "…"
            self.refusal = f"the source refers to {shown}, which is refused: {exc}"

    def ensure_allowed(self) -> None:
        if self.refusal is not None:
            raise UnsafeURL(self.refusal)

    def get(self, url: str, start: int = 0) -> tuple[str, httpx.Response]:
        """(final URL, streamed response) of ``url`` from byte ``start``: redirects followed
        one hop at a time, each hop checked, each connection pinned to a checked address."""
        first = url
        for _ in range(self.policy.max_redirects + 1):
            try:
                response = self._get_pinned(url, start)
            except UnsafeURL as exc:
                if url == first:
                    raise
                raise UnsafeURL(f"redirected to {url}: {exc}") from exc
            location = response.headers.get("location")
            if not (response.is_redirect and location):
                return url, response
            response.close()
            url = urljoin(url, location)
        raise UnsafeURL(f"more than {self.policy.max_redirects} redirects")

    def _get_pinned(self, url: str, start: int) -> httpx.Response:
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise UnsafeURL(f"not a valid URL: {exc}") from exc
        if target.scheme not in HTTP_SCHEMES or not target.host:
            raise UnsafeURL(f"{url} is not an http(s) URL with a host")
        port = target.port or (443 if target.scheme == "https" else 80)
        headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        last_error: httpx.TransportError | None = None
        for address in checked_addresses(target.host, port, self.policy):
            request = self.client.build_request(
                "GET",
                target.copy_with(host=str(address)),
                headers=headers,
                extensions={"sni_hostname": target.host},
            )
            try:
                return self.client.send(request, stream=True)
            except httpx.ConnectError as exc:  # the next address of the same host, if any
                last_error = exc
        assert last_error is not None
        raise last_error

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _local_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path)) if url.startswith("file:") else Path(url)


class HTTPFile(io.RawIOBase):
    """A response body read as a file by FFmpeg; seekable with range requests when the
    server takes them, so MP4 over HTTP with its index at the end still opens."""

    def __init__(self, opener: GuardedOpener, url: str) -> None:
        super().__init__()
        self._opener = opener
        self._url = url
        self._position = 0
        self._size: int | None = None
        self._ranges = False
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] = iter(())
        self._pending = b""
        self._request(0)

    def _request(self, start: int) -> None:
        self._drop_response()
        try:
            self._url, response = self._opener.get(self._url, start)
        except UnsafeURL as exc:
            self._opener.refuse(self._url, exc)
            raise
        except httpx.HTTPError as exc:
            raise OSError(f"{self._url}: {exc}") from exc
        if response.status_code >= 400 or (start and response.status_code != 206):
            response.close()
            raise OSError(f"{self._url} answered HTTP {response.status_code}")
        self._response = response
        self._chunks = response.iter_raw()  # as it arrives: a live stream must not wait
        self._pending = b""
        self._position = start
        length = response.headers.get("content-length")
        if start == 0:
            self._size = int(length) if length and length.isdigit() else None
            self._ranges = response.headers.get("accept-ranges", "").lower() == "bytes"

    def _drop_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._ranges and self._size is not None

    def read(self, size: int = -1) -> bytes:
        self._opener.ensure_allowed()
        if size < 0:
            size = READ_CHUNK
        if not self._pending:
            try:
                self._pending = next(self._chunks, b"")
            except httpx.HTTPError as exc:
                raise OSError(f"{self._url}: {exc}") from exc
        data, self._pending = self._pending[:size], self._pending[size:]
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence == io.SEEK_END:
            if self._size is None:
                raise OSError("the size of the response is unknown")
            offset += self._size
        if offset == self._position:
            return offset
        if not self.seekable():
            raise OSError("the server does not take range requests")
        if 0 < offset - self._position <= SKIP_FORWARD:
            while self._position < offset and self.read(offset - self._position):
                pass
            return self._position
        self._request(offset)
        return offset

    def close(self) -> None:
        self._drop_response()
        super().close()
