"""The video service through its HTTP API: clip jobs, detections and their files, URL
safety, a live MJPEG stream that drops and comes back, and jobs that outlive a restart."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from c4c.shared.bus import CloudEvent
from c4c.shared.problems import PROBLEM_MEDIA_TYPE
from c4c.video.app import create_app
from c4c.video.settings import VideoSettings

Eventually = Callable[..., Any]


def build(tmp_path: Path, **overrides: Any) -> FastAPI:
    settings = VideoSettings(
        data_dir=tmp_path, outbox_poll_interval=0.1, log_format="text", **overrides
    )
    return create_app(settings)


@pytest.fixture
def received() -> list[CloudEvent]:
    return []


async def started(app: FastAPI, received: list[CloudEvent]) -> None:
    async def record(event: CloudEvent) -> None:
        received.append(event)

    await app.state.runtime.bus.subscribe(
        "test.video.recorder", ["detection.created", "video.job.finished"], record
    )


def client_for(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://video.test", timeout=30)


@pytest.fixture
async def client(tmp_path: Path, received: list[CloudEvent]) -> AsyncIterator[httpx.AsyncClient]:
    app = build(tmp_path)
    await started(app, received)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    return body


async def upload(client: httpx.AsyncClient, path: Path, name: str | None = None) -> str:
    response = await client.post(
        "/video/v1/jobs",
        params={"filename": name or path.name},
        content=await asyncio.to_thread(path.read_bytes),
        headers={"content-type": "video/mp4"},
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/video/v1/jobs/{response.json()['id']}"
    return str(response.json()["id"])


async def finished(client: httpx.AsyncClient, job_id: str, eventually: Eventually) -> Any:
    async def done() -> bool:
        status = (await client.get(f"/video/v1/jobs/{job_id}")).json()["status"]
        return status in ("succeeded", "failed")

    await eventually(done, timeout=60, interval=0.1)
    return (await client.get(f"/video/v1/jobs/{job_id}")).json()


async def test_a_clip_with_a_bird_gives_detections_with_keyframe_and_clip(
    client: httpx.AsyncClient, test_data: Path, received: list[CloudEvent], eventually: Eventually
) -> None:
    job_id = await upload(client, test_data / "video" / "cockatoo.mp4")
    job = await finished(client, job_id, eventually)
    assert job["status"] == "succeeded", job["reason"]
    assert job["classification"] == "events"
    assert job["frames_decoded"] == 280
    assert job["progress"] == 1.0
    assert job["detections"] > 0

    listed = (await client.get("/video/v1/detections", params={"job_id": job_id})).json()
    assert len(listed["items"]) == job["detections"]
    detection = listed["items"][0]
    assert detection["boxes"]
    keyframe = await client.get(detection["keyframe_url"])
    assert keyframe.status_code == 200
    assert keyframe.headers["content-type"] == "image/jpeg"
    assert keyframe.content[:2] == b"\xff\xd8"
    clip = await client.get(detection["clip_url"])
    assert clip.status_code == 200
    assert clip.headers["content-type"] == "video/mp4"
    assert clip.headers["content-disposition"].startswith("inline")
    assert clip.headers["accept-ranges"] == "bytes"
    assert len(clip.content) > 1000
    # A <video> element seeks with Range requests.
    part = await client.get(detection["clip_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(clip.content)}"
    assert part.content == clip.content[100:200]
    garbage = await client.get(detection["clip_url"], headers={"Range": "bytes=abc"})
    assert garbage.status_code == 400
    assert garbage.headers["content-type"] == "application/problem+json"

    def published() -> bool:
        types = [e.type for e in received]
        return types.count("detection.created") == job["detections"] and (
            "video.job.finished" in types
        )

    await eventually(published, timeout=10)
    created = next(e for e in received if e.type == "detection.created")
    assert created.data["job_id"] == job_id
    assert created.data["snapshot_url"] == (
        f"/video/v1/detections/{created.data['detection_id']}/keyframe.jpg"
    )
    assert created.data["boxes"]
    done = next(e for e in received if e.type == "video.job.finished")
    assert done.data["status"] == "succeeded"
    assert done.data["classification"] == "events"


async def test_an_empty_scene_is_classified_empty(
    client: httpx.AsyncClient, test_data: Path, eventually: Eventually
) -> None:
    job_id = await upload(client, test_data / "video" / "empty_scene_synthetic.avi")
    job = await finished(client, job_id, eventually)
    assert job["status"] == "succeeded"
    assert job["classification"] == "empty"
    assert job["detections"] == 0


async def test_corrupt_and_truncated_clips_fail_with_a_reason_and_the_service_stays_healthy(
    client: httpx.AsyncClient,
    test_data: Path,
    tmp_path: Path,
    eventually: Eventually,
    received: list[CloudEvent],
) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 5000)
    cut = tmp_path / "cut.avi"
    data = (test_data / "video" / "vtest.avi").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    junk_job = await finished(client, await upload(client, junk), eventually)
    cut_job = await finished(client, await upload(client, cut), eventually)
    assert junk_job["status"] == "failed"
    assert "not a readable video" in junk_job["reason"]
    assert cut_job["status"] == "failed"
    assert "truncated" in cut_job["reason"]
    assert (await client.get("/healthz")).status_code == 200
    await eventually(lambda: sum(e.type == "video.job.finished" for e in received) == 2, timeout=10)
    # Still working after the failures.
    good = await finished(
        client, await upload(client, test_data / "video" / "realshort.mp4"), eventually
    )
    assert good["status"] == "succeeded"


async def test_bad_uploads_are_refused(client: httpx.AsyncClient) -> None:
    problem(await client.post("/video/v1/jobs", content=b""), 400)
    problem(
        await client.post(
            "/video/v1/jobs", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
        ),
        400,
    )
    problem(await client.get("/video/v1/jobs/nope"), 404)
    problem(await client.get("/video/v1/detections/nope/keyframe.jpg"), 404)
    problem(await client.get("/video/v1/jobs", params={"status": "bogus"}), 422)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:5672/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("file:///etc/passwd", "file URLs are disabled"),
        ("http://localhost:8080/stream.mjpg", "loopback"),
        ("http://10.1.2.3/cam", "private"),
        ("http://100.64.0.1/cam", "carrier-grade NAT"),
        ("http://[::1]/cam", "loopback"),
        ("http://[::ffff:127.0.0.1]/cam", "loopback"),
        ("http://0.0.0.0/cam", "unspecified"),
        ("gopher://example.org/", "scheme"),
        ("ftp://example.org/x.mp4", "scheme"),
    ],
)
async def test_unsafe_stream_urls_are_refused(
    client: httpx.AsyncClient, url: str, reason: str
) -> None:
    body = problem(await client.post("/video/v1/streams", json={"name": "cam", "url": url}), 422)
    assert body["type"] == "urn:c4c:problem:unsafe-url"
    assert reason in body["detail"]
    assert (await client.get("/video/v1/streams")).json()["items"] == []


class _Redirect(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://10.0.0.7/private-camera")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def redirect_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cam"
    server.shutdown()
    server.server_close()


async def test_a_redirect_to_a_private_address_is_refused(
    tmp_path: Path, redirect_server: str, received: list[CloudEvent]
) -> None:
    # The test's own server is on loopback, so it must be allowed explicitly: the feature.
    app = build(tmp_path, allowed_hosts=["127.0.0.1"])
    async with app.router.lifespan_context(app), client_for(app) as client:
        response = await client.post(
            "/video/v1/streams", json={"name": "cam", "url": redirect_server, "start": False}
        )
        body = problem(response, 422)
        assert "redirected to http://10.0.0.7/private-camera" in body["detail"]
        assert "private" in body["detail"]


async def test_file_urls_only_under_the_configured_root(tmp_path: Path, test_data: Path) -> None:
    root = tmp_path / "cameras"
    root.mkdir()
    (root / "cam.avi").write_bytes((test_data / "video" / "realshort.mp4").read_bytes())
    app = build(tmp_path, file_root=root)
    async with app.router.lifespan_context(app), client_for(app) as client:
        ok = await client.post(
            "/video/v1/streams",
            json={"name": "cam", "url": (root / "cam.avi").as_uri(), "start": False},
        )
        assert ok.status_code == 201, ok.text
        for url in ("file:///etc/passwd", f"{root.as_uri()}/../../etc/passwd"):
            body = problem(
                await client.post("/video/v1/streams", json={"name": "x", "url": url}), 422
            )
            assert "under the configured root" in body["detail"]


async def test_stream_requests_are_validated(client: httpx.AsyncClient) -> None:
    problem(await client.post("/video/v1/streams", json={"name": "x"}), 422)
    problem(
        await client.post(
            "/video/v1/streams",
            json={
                "name": "x",
                "url": "rtsp://example.org/cam",
                "lines": [{"name": "l", "points": [[0, 0], [2, 2]]}],
            },
        ),
        422,
    )
    problem(await client.post("/video/v1/streams/nope/start"), 404)
    problem(await client.get("/video/v1/streams/nope/snapshot.jpg"), 404)


# A live MJPEG stream served by the test: frames of vtest.avi at 25 fps; the first
# connection that gets DROP_AFTER frames is dropped (URL checks connect briefly before the
# decoder does), the next one streams on from where it stopped.

DROP_AFTER = 60
FRAMES = 240


@pytest.fixture
def jpeg_frames(test_data: Path) -> list[bytes]:
    capture = cv2.VideoCapture(str(test_data / "video" / "vtest.avi"))
    frames = []
    while len(frames) < FRAMES:
        ok, frame = capture.read()
        assert ok, "vtest.avi has fewer frames than SOURCE.md says"
        frames.append(cv2.imencode(".jpg", frame)[1].tobytes())
    return frames


class MJPEGServer:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.connections = 0
        self.sent = 0
        self.dropped = False
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for sent_here, jpeg in enumerate(outer.frames[outer.sent :]):
                    if outer.stop.is_set():
                        break
                    if not outer.dropped and sent_here >= DROP_AFTER:
                        outer.dropped = True  # the camera drops the connection, once
                        break
                    part = b"--frame\r\nContent-Type: image/jpeg\r\n"
                    part += b"Content-Length: %d\r\n\r\n" % len(jpeg)
                    try:
                        self.wfile.write(part + jpeg + b"\r\n")
                    except OSError:
                        return
                    outer.sent += 1
                    outer.stop.wait(0.04)
                self.close_connection = True

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"

    def __enter__(self) -> MJPEGServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


async def test_a_live_mjpeg_stream_is_processed_and_picked_up_again_after_a_drop(
    tmp_path: Path,
    jpeg_frames: list[bytes],
    received: list[CloudEvent],
    eventually: Eventually,
) -> None:
    app = build(
        tmp_path,
        allowed_hosts=["127.0.0.1"],
        analysis_fps=0,
        min_event_seconds=0.5,
        reconnect_initial_delay=0.05,
        read_timeout=5,
    )
    await started(app, received)
    statuses: list[str] = []
    with MJPEGServer(jpeg_frames) as camera:
        async with app.router.lifespan_context(app), client_for(app) as client:
            created = await client.post(
                "/video/v1/streams",
                json={
                    "name": "walkway",
                    "url": camera.url,
                    "zones": [{"name": "all", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}],
                },
            )
            assert created.status_code == 201, created.text
            stream_id = created.json()["id"]

            async def status() -> dict[str, Any]:
                body: dict[str, Any] = (
                    await client.get(f"/video/v1/streams/{stream_id}/status")
                ).json()
                if not statuses or statuses[-1] != body["status"]:
                    statuses.append(body["status"])
                return body

            async def reconnected_and_running() -> bool:
                body = await status()
                return body["stats"].get("reconnects", 0) >= 1 and body["status"] == "running"

            await eventually(reconnected_and_running, timeout=30, interval=0.05)
            assert camera.dropped

            async def past_the_drop() -> bool:
                body = await status()
                return body["stats"]["frames_decoded"] > DROP_AFTER + 20

            await eventually(past_the_drop, timeout=30, interval=0.05)
            metrics = await stream_metrics(client, stream_id)
            assert metrics["c4c_video_reconnects_total"] >= 1
            assert metrics["c4c_video_frames_analysed_total"] >= 1
            assert metrics["c4c_video_stream_status", "running"] == 1
            assert metrics["c4c_video_stream_status", "reconnecting"] == 0
            assert "c4c_video_lag_seconds" in metrics
            assert "c4c_video_analysis_fps" in metrics
            assert "c4c_video_frames_dropped_late_total" in metrics
            snapshot = await client.get(f"/video/v1/streams/{stream_id}/snapshot.jpg")
            assert snapshot.status_code == 200
            assert snapshot.content[:2] == b"\xff\xd8"

            await eventually(
                lambda: any(e.type == "detection.created" for e in received), timeout=30
            )
            event = next(e for e in received if e.type == "detection.created")
            assert event.data["stream_id"] == stream_id
            assert event.data["started_at"] is not None

            stopped = await client.post(f"/video/v1/streams/{stream_id}/stop")
            assert stopped.status_code == 202

            async def is_stopped() -> bool:
                return (await status())["status"] == "stopped"

            await eventually(is_stopped, timeout=15, interval=0.05)
            final = await status()
            assert final["counts"]["zones"]["all"]["entered"] >= 1
    assert "reconnecting" in statuses
    assert statuses.index("reconnecting") < len(statuses) - 1


async def stream_metrics(client: httpx.AsyncClient, stream_id: str) -> dict[Any, float]:
    """The samples of ``/metrics`` labelled with this stream: by name, and by (name, status)
    for the status gauge."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: dict[Any, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.labels.get("stream") != stream_id:
                continue
            status = sample.labels.get("status")
            samples[(sample.name, status) if status else sample.name] = sample.value
    return samples


async def test_a_job_left_running_by_a_dead_worker_is_resumed(
    tmp_path: Path, test_data: Path, eventually: Eventually, received: list[CloudEvent]
) -> None:
    from c4c.video.models import JobRow

    app = build(tmp_path, job_lease_seconds=1)
    async with app.router.lifespan_context(app), client_for(app) as client:
        await app.state.video_workers.stop()  # no worker: the job stays queued
        job_id = await upload(client, test_data / "video" / "empty_scene_synthetic.avi")
        async with app.state.runtime.db.sessions() as session, session.begin():
            job = await session.get(JobRow, job_id)
            assert job is not None
            # As a worker that crashed half-way leaves it: running, lease run out.
            job.status, job.owner, job.attempts = "running", "dead-worker", 1
            job.lease_until = datetime.now(UTC) - timedelta(seconds=5)
    app = build(tmp_path, job_lease_seconds=1)
    async with app.router.lifespan_context(app), client_for(app) as client:
        job = await finished(client, job_id, eventually)
        assert job["status"] == "succeeded"
        assert job["attempts"] == 2


async def test_a_job_interrupted_too_often_is_failed(
    tmp_path: Path, test_data: Path, eventually: Eventually
) -> None:
    from c4c.video.models import JobRow

    app = build(tmp_path, job_lease_seconds=1, job_max_attempts=2)
    async with app.router.lifespan_context(app), client_for(app) as client:
        await app.state.video_workers.stop()
        job_id = await upload(client, test_data / "video" / "realshort.mp4")
        async with app.state.runtime.db.sessions() as session, session.begin():
            job = await session.get(JobRow, job_id)
            assert job is not None
            job.status, job.owner, job.attempts = "running", "dead-worker", 2
            job.lease_until = datetime.now(UTC) - timedelta(seconds=5)
        await app.state.video_workers.start()
        job = await finished(client, job_id, eventually)
        assert job["status"] == "failed"
        assert "interrupted 2 times" in job["reason"]


async def test_an_upload_over_the_limit_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    app = build(tmp_path, max_upload_bytes=4096)
    async with app.router.lifespan_context(app), client_for(app) as client:
        response = await client.post(
            "/video/v1/jobs", content=b"\x00" * 5000, headers={"content-type": "video/mp4"}
        )
        problem(response, 413)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(5):
                yield b"\x00" * 1000

        response = await client.post(
            "/video/v1/jobs", content=chunked(), headers={"content-type": "video/mp4"}
        )
        problem(response, 413)
        assert list((tmp_path / "media" / "video" / "uploads").iterdir()) == []
        assert (await client.get("/video/v1/jobs")).json()["items"] == []
