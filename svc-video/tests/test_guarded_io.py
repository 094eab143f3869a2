"""Every URL FFmpeg opens for a source meets the URL policy, not only the first one: HLS
segments and variant playlists on a refused host, and redirects a server sends after the
URL was checked, are refused before anything connects to them.

The servers run on loopback. The policy allows the name ``localhost`` and nothing else, so
the playlist server (reached as ``localhost``) is allowed and the same machine reached as
``127.0.0.1`` — the "internal" target — is not; a listening socket there counts whoever
connects."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from c4c.shared.urls import UnsafeURL, URLPolicy, check_url
from c4c.video.analysis.guarded_io import checked_addresses
from c4c.video.analysis.pipeline import AnalysisParams
from c4c.video.analysis.sources import (
    ClosedCapture,
    PyAVCapture,
    VideoUnreadable,
    analyse_file,
    open_capture,
)

ONLY_LOCALHOST_BY_NAME = URLPolicy(allowed_hosts=("localhost",))


def ts_segment(frames: int = 10) -> bytes:
    """A small MPEG-TS segment, as an HLS server sends them."""
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.full((48, 64, 3), i * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


SEGMENT = ts_segment()


class Internal:
    """A port on 127.0.0.1 that accepts and counts connections: what must stay untouched."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.socket.close()


Route = Callable[[BaseHTTPRequestHandler, int], None]
"""Answers one GET; the int is how many requests for that path came before it."""


class Site:
    """An allowed HTTP server, reached as ``localhost``, answering by path."""

    def __init__(self, routes: dict[str, Route]) -> None:
        counts: dict[str, int] = {}
        self.requests = counts

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen = counts.get(self.path, 0)
                counts[self.path] = seen + 1
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self, seen)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://localhost:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def body(content: bytes, content_type: str = "application/octet-stream") -> Route:
    def send(handler: BaseHTTPRequestHandler, _: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    return send


def redirect(location: str) -> Route:
    def send(handler: BaseHTTPRequestHandler, _: int) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return send


def playlist(*segments: str) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1"]
    for segment in segments:
        lines += ["#EXTINF:1.0,", segment]
    return ("\n".join([*lines, "#EXT-X-ENDLIST", ""])).encode()


M3U8 = "application/vnd.apple.mpegurl"


@pytest.fixture
def internal() -> Iterator[Internal]:
    target = Internal()
    yield target
    target.close()


@pytest.fixture
def site_factory() -> Iterator[Callable[[dict[str, Route]], Site]]:
    sites: list[Site] = []

    def make(routes: dict[str, Route]) -> Site:
        sites.append(Site(routes))
        return sites[-1]

    yield make
    for site in sites:
        site.close()


def frames_of(capture: PyAVCapture) -> int:
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def test_an_hls_stream_on_an_allowed_host_plays_through_the_guard(
    site_factory: Callable[[dict[str, Route]], Site],
) -> None:
    site = site_factory(
        {
            "/live.m3u8": body(playlist("seg0.ts", "seg1.ts", "seg2.ts"), M3U8),
            "/seg0.ts": body(SEGMENT),
            "/seg1.ts": body(SEGMENT),
            "/seg2.ts": body(SEGMENT),
        }
    )
    capture = open_capture(f"{site.url}/live.m3u8", 5.0, 5.0, ONLY_LOCALHOST_BY_NAME)
    assert isinstance(capture, PyAVCapture), capture.refusal
    assert frames_of(capture) == 30  # three segments: FFmpeg's keep-alive is not in the way
    assert capture.refusal is None
    assert {path: site.requests.get(path) for path in ("/seg0.ts", "/seg2.ts")} == {
        "/seg0.ts": 1,
        "/seg2.ts": 1,
    }


@pytest.mark.parametrize("where", ["first segment", "later segment", "variant playlist"])
def test_hls_parts_on_a_refused_host_are_never_connected_to(
    site_factory: Callable[[dict[str, Route]], Site], internal: Internal, where: str
) -> None:
    routes: dict[str, Route] = {"/seg0.ts": body(SEGMENT)}
    if where == "first segment":
        routes["/live.m3u8"] = body(playlist(f"{internal.url}/secret.ts"), M3U8)
    elif where == "later segment":
        refused = f"{internal.url}/secret.ts"
        routes["/live.m3u8"] = body(playlist("seg0.ts", refused, "seg0.ts"), M3U8)
    else:
        variant = f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\n{internal.url}/v.m3u8\n"
        routes["/live.m3u8"] = body(variant.encode(), M3U8)
    site = site_factory(routes)

    capture = open_capture(f"{site.url}/live.m3u8", 5.0, 5.0, ONLY_LOCALHOST_BY_NAME)
    if isinstance(capture, PyAVCapture):  # refused once decoding reached it
        frames_of(capture)
    assert not isinstance(capture, PyAVCapture) or not capture.grab()
    assert capture.refusal is not None
    assert f"{internal.url}/" in capture.refusal
    assert "127.0.0.1 is a loopback address" in capture.refusal
    assert "ALLOWED_HOSTS" in capture.refusal
    assert internal.connections == 0


async def test_a_redirect_sent_after_the_check_is_refused(
    site_factory: Callable[[dict[str, Route]], Site], internal: Internal
) -> None:
    def fine_then_redirect(handler: BaseHTTPRequestHandler, seen: int) -> None:
        if seen == 0:  # what the check sees
            body(SEGMENT, "video/mp2t")(handler, seen)
        else:  # what FFmpeg would have followed
            redirect(f"{internal.url}/latest/meta-data/")(handler, seen)

    site = site_factory({"/cam.ts": fine_then_redirect})
    url = f"{site.url}/cam.ts"
    assert await check_url(url, ONLY_LOCALHOST_BY_NAME) == url

    capture = open_capture(url, 5.0, 5.0, ONLY_LOCALHOST_BY_NAME)
    assert isinstance(capture, ClosedCapture)
    assert capture.refusal is not None
    assert "/latest/meta-data/" in capture.refusal
    assert "loopback" in capture.refusal
    assert site.requests["/cam.ts"] == 2
    assert internal.connections == 0


def test_redirects_to_allowed_hosts_are_followed(
    site_factory: Callable[[dict[str, Route]], Site],
) -> None:
    site = site_factory({"/seg.ts": body(SEGMENT, "video/mp2t")})
    hop = site_factory({"/cam.ts": redirect(f"{site.url}/seg.ts")})
    capture = open_capture(f"{hop.url}/cam.ts", 5.0, 5.0, ONLY_LOCALHOST_BY_NAME)
    assert isinstance(capture, PyAVCapture), capture.refusal
    assert frames_of(capture) == 10


def test_an_uploaded_playlist_cannot_reach_internal_addresses(
    tmp_path: Path, internal: Internal
) -> None:
    upload = tmp_path / "upload.m3u8"
    upload.write_bytes(playlist(f"{internal.url}/secret.ts"))
    with pytest.raises(VideoUnreadable, match=r"127\.0\.0\.1 is a loopback address"):
        analyse_file(upload, AnalysisParams(), sink=lambda _: None, clip_dir=None)
    assert internal.connections == 0


@pytest.mark.parametrize("host", ["a" * 64 + ".example.org", "127.0.0.1", "[::1"])
def test_what_ffmpeg_would_connect_to_is_refused_when_invalid_or_internal(host: str) -> None:
    with pytest.raises(UnsafeURL):
        checked_addresses(host, 80, URLPolicy())
