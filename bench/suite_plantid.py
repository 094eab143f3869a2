"""Plant identification: accuracy on the development photos and speed against raw
onnxruntime, measured in the same run.

Accuracy (``../shared/data/plants``, 17 taxa x 12 photos): leave-one-out — each photo is
identified by a gallery fitted on the 203 others (the photo is not in it; the classifier,
its temperature and the rejection threshold are all refitted without it). Baseline: class
prototypes (nearest class mean, cosine) on the same embeddings, the approach of the issue's
same-day check. Rejection: frames from ``../shared/data/video`` (20 per clip, evenly
spaced) against the gallery of all 204 photos; the threshold is the gallery's own 2 %
quantile of leave-one-out nearest-neighbour similarities — chosen from plant photos only,
no video frame is used to set it.

Speed: ``POST /v2/identify`` with one photo per request, in process (ASGI, no sockets),
against raw onnxruntime doing what a minimal script does with the same photos, the way the
service runs the model: the same session options (one intra-op thread, every graph
optimisation) and image operations (JPEG decoded at the scale that covers the input,
centre square, bicubic resize, normalise), then ``session.run``. With 1 worker, requests
one at a time (latency); with 2 workers, two requests in flight (throughput), against two
raw threads sharing one session. With 1 worker the CPU time of the process per request is
reported too (against raw's per image): on a machine others load, wall time mostly measures
the others; CPU time measures the service's own work.

The load generator is light, as wrk is over keep-alive connections (:class:`PreparedRequest`):
each request is built once beforehand by httpx (the very headers and multipart body chunks
its client sends), and sending it is one call of the ASGI app that replays those chunks
exactly as httpx's ASGITransport does, reads the whole response and checks its status. So
the service does the same work per request as under httpx's client; what is left out is the
client's own work (building the body, URL, header and response objects: about 0.6 ms of CPU
a request), which shared the same two cores with the service and the raw threads.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from bench._core import Context, Result, ServiceUnavailable

if TYPE_CHECKING:
    from c4c.plantid.engine.embedder import ModelSpec

SUITE = "plantid"
DATA = Path(
    os.environ.get("C4C_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
FRAMES_PER_CLIP = 20
TOP1_TARGET, TOP5_TARGET, REJECT_TARGET = 0.90, 0.99, 0.90
P50_TARGET_MS, OVERHEAD_TARGET = 30.0, 1.2
ROUND_IMAGES = 24  # per round of the 2-worker throughput, service and raw in turn


def _photos() -> tuple[list[Path], list[str]]:
    plants = DATA / "plants"
    if not (plants / "species.csv").is_file():
        raise ServiceUnavailable(f"plant photos missing at {plants} (set C4C_TEST_DATA)")
    with (plants / "species.csv").open(newline="") as file:
        names = {row["folder"]: row["scientificName"] for row in csv.DictReader(file)}
    paths = sorted(plants.glob("*/*.jpg"))
    return paths, [names[p.parent.name] for p in paths]


def _frames() -> dict[str, list[bytes]]:
    import cv2  # opencv-python-headless, a dependency of svc-video

    clips: dict[str, list[bytes]] = {}
    for clip in sorted((DATA / "video").glob("*.*")):
        if clip.suffix not in {".avi", ".mp4", ".mpg"}:
            continue
        capture = cv2.VideoCapture(str(clip))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
        picks = np.linspace(0, len(frames) - 1, FRAMES_PER_CLIP).astype(int)
        clips[clip.name] = [cv2.imencode(".jpg", frames[i])[1].tobytes() for i in picks]
    return clips


def _rank(names: Sequence[str], truth: str) -> int:
    return list(names).index(truth) if truth in names else len(names)


def accuracy(
    embeddings: np.ndarray, labels: list[str], frames: np.ndarray, clips: list[str]
) -> list[Result]:
    from c4c.plantid.engine.gallery import Gallery

    n = len(labels)
    ranks, proto_ranks, accepted = [], [], 0
    for i in range(n):
        keep = np.arange(n) != i
        train = [labels[j] for j in range(n) if j != i]
        gallery = Gallery.fit(
            "loo", embeddings[keep], train, ["flower"] * (n - 1), [str(j) for j in range(n - 1)]
        )
        found = gallery.identify(embeddings[i : i + 1], ["flower"])
        ranks.append(_rank([c.species for c in found.candidates], labels[i]))
        accepted += not found.rejected
        species = sorted(set(train))
        prototypes = np.stack(
            [embeddings[keep][np.array(train) == s].mean(axis=0) for s in species]
        )
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
        order = np.argsort(-(prototypes @ embeddings[i]))
        proto_ranks.append(_rank([species[k] for k in order], labels[i]))
    ranks_a, proto_a = np.array(ranks), np.array(proto_ranks)
    top1, top5 = float((ranks_a == 0).mean()), float((ranks_a < 5).mean())
    p_top1, p_top5 = float((proto_a == 0).mean()), float((proto_a < 5).mean())

    full = Gallery.fit("all", embeddings, labels, ["flower"] * n, [str(j) for j in range(n)])
    rejected = np.array(
        [full.identify(frames[k : k + 1], ["auto"]).rejected for k in range(len(frames))]
    )
    by_clip = {c: float(rejected[np.array(clips) == c].mean()) for c in sorted(set(clips))}
    detail = (
        f"{n} photos, {len(set(labels))} taxa; leave-one-out (query excluded, gallery refitted). "
        "Hyper-parameters (ridge 0.1, centre square, head + block-14 features) were chosen on "
        "this same development set: no held-out set was available here, so expect a few "
        "points less on new photos."
    )
    return [
        Result(
            SUITE,
            "leave-one-out top-1",
            top1,
            "accuracy",
            p_top1,
            f">= {TOP1_TARGET}",
            top1 >= TOP1_TARGET,
            detail + f" Baseline: class prototypes on the same embeddings (top-5 {p_top5:.3f}).",
        ),
        Result(
            SUITE,
            "leave-one-out top-5",
            top5,
            "accuracy",
            p_top5,
            f">= {TOP5_TARGET}",
            top5 >= TOP5_TARGET,
        ),
        Result(
            SUITE,
            "non-plant frames rejected",
            float(rejected.mean()),
            "share",
            None,
            f">= {REJECT_TARGET}",
            float(rejected.mean()) >= REJECT_TARGET,
            f"{len(frames)} video frames; threshold {full.threshold:.3f} = 2 % quantile of the "
            f"gallery's leave-one-out nearest-neighbour similarity (plants only). Per clip: "
            + ", ".join(f"{c} {v:.2f}" for c, v in by_clip.items())
            + " (tree.avi and realshort.mp4 show plants outside the flora).",
        ),
        Result(
            SUITE,
            "known-species photos accepted",
            accepted / n,
            "share",
            None,
            None,
            None,
            "Leave-one-out photos of enrolled taxa not rejected as 'nothing close'.",
        ),
    ]


class RawPipeline:
    """What a minimal onnxruntime script does with a photo, run the way the service runs the
    model (the same session options, the same image operations: JPEG decoded at the smallest
    scale that covers the input, centre square, bicubic, normalised), without anything else:
    no checks, no HTTP, no database, no gallery. So the ratio is the service's own cost."""

    def __init__(self, spec: ModelSpec) -> None:
        import onnxruntime as ort

        from c4c.plantid.engine.embedder import session_options

        self.session = ort.InferenceSession(
            str(spec.path), session_options(), providers=["CPUExecutionProvider"]
        )
        self.size = spec.input_size
        self.mean = np.array(spec.mean, dtype=np.float32)
        self.std = np.array(spec.std, dtype=np.float32)

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (self.size, self.size))
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.resize(
            (self.size, self.size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
        x = ((np.asarray(image, dtype=np.float32) - self.mean) / self.std).transpose(2, 0, 1)
        return self.session.run(["embedding"], {"image": np.ascontiguousarray(x)[None]})[0]


class PreparedRequest:
    """One request to the app in process, built once by httpx and sent as often as needed:
    the ASGI scope, receive and send of httpx's ``ASGITransport`` (the same scope, the body
    in the same chunks, a disconnect once the response is complete), without rebuilding the
    request or a response object each time."""

    def __init__(self, app: Callable[..., Awaitable[None]], request: httpx.Request) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        assert isinstance(request.stream, Iterable)
        self.messages = [
            {"type": "http.request", "body": bytes(chunk), "more_body": True}
            for chunk in request.stream
        ] + [{"type": "http.request", "body": b"", "more_body": False}]

    async def send(self) -> bytes:
        """The response's body; an error unless its status is 200."""
        messages = iter(self.messages)
        complete = asyncio.Event()
        status: int | None = None
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is None:
                await complete.wait()
                return {"type": "http.disconnect"}
            return dict(message)

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    complete.set()

        scope = dict(self.scope, headers=list(self.scope["headers"]))
        await self.app(scope, receive, send)
        if status != 200 or not complete.is_set():
            raise RuntimeError(f"identify answered {status}: {b''.join(body)[:300]!r}")
        return b"".join(body)


async def _identify(prepared: Mapping[bytes, PreparedRequest], photo: bytes) -> float:
    """Seconds to identify ``photo`` with its prepared request."""
    started = time.perf_counter()
    await prepared[photo].send()
    return time.perf_counter() - started


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


async def _two_in_flight(
    identify: Callable[[bytes], Awaitable[float]], raw: RawPipeline, queries: list[bytes]
) -> tuple[float, float]:
    """Images/s with two requests in flight, and with two raw threads on one session, in
    alternating rounds of ``ROUND_IMAGES`` photos (which goes first alternates too): on a
    machine others load, one run of each after the other measures mostly whoever else ran
    meanwhile (repeated so on a shared 2-core machine, the ratio ranged 0.56-1.20)."""

    async def service_round(batch: list[bytes]) -> float:
        pending = iter(batch)

        async def client_loop() -> None:
            for data in pending:
                await identify(data)

        started = time.perf_counter()
        await asyncio.gather(client_loop(), client_loop())
        return time.perf_counter() - started

    def raw_round(batch: list[bytes]) -> float:
        items = iter(batch)
        lock = threading.Lock()

        def raw_loop() -> None:
            while True:
                with lock:
                    data = next(items, None)
                if data is None:
                    return
                raw(data)

        started = time.perf_counter()
        threads = [threading.Thread(target=raw_loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    service_s = raw_s = 0.0
    for k, start in enumerate(range(0, len(queries), ROUND_IMAGES)):
        batch = queries[start : start + ROUND_IMAGES]
        if k % 2:
            raw_s += raw_round(batch)
            service_s += await service_round(batch)
        else:
            service_s += await service_round(batch)
            raw_s += raw_round(batch)
    return len(queries) / service_s, len(queries) / raw_s


async def speed(
    ctx: Context, photos: list[Path], labels: list[str], cache: Path, tmp: Path
) -> list[Result]:
    from c4c.plantid.app import create_app
    from c4c.plantid.engine.embedder import default_model
    from c4c.plantid.settings import PlantidSettings

    model = default_model(cache)
    raw = RawPipeline(model)
    queries = [p.read_bytes() for p in (photos[::4] if ctx.quick else photos)]
    results: list[Result] = []
    for workers in (1, 2):
        settings = PlantidSettings(
            data_dir=tmp / f"w{workers}",
            model_cache=cache,
            workers=workers,
            daily_quota=10**9,
            log_level="WARNING",
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://bench", timeout=120
            ) as client:
                await client.post("/plantid/v1/projects", json={"id": "bench", "title": "Bench"})
                by_species: dict[str, list[Path]] = {}
                for path, label in zip(photos, labels, strict=True):
                    by_species.setdefault(label, []).append(path)
                for label, paths in by_species.items():
                    response = await client.post(
                        "/plantid/v1/projects/bench/references",
                        data={"species": label},
                        files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
                    )
                    response.raise_for_status()

                prepared = {
                    data: PreparedRequest(
                        app,
                        client.build_request(
                            "POST",
                            "/v2/identify/bench?no-reject=true",
                            files=[
                                ("images", ("q.jpg", data, "image/jpeg")),
                                ("organs", (None, "flower")),
                            ],
                        ),
                    )
                    for data in queries
                }
                identify = functools.partial(_identify, prepared)

                for data in queries[:5]:  # warm-up: gallery fit, caches
                    await identify(data)
                    raw(data)
                if workers == 1:
                    service_t, raw_t, service_cpu, raw_cpu = [], [], [], []
                    for data in queries:  # interleaved: the same noise for both
                        cpu = time.process_time()
                        service_t.append(await identify(data))
                        service_cpu.append(time.process_time() - cpu)
                        started, cpu = time.perf_counter(), time.process_time()
                        raw(data)
                        raw_t.append(time.perf_counter() - started)
                        raw_cpu.append(time.process_time() - cpu)
                    s50, r50 = _pct(service_t, 50), _pct(raw_t, 50)
                    s99, r99 = _pct(service_t, 99), _pct(raw_t, 99)
                    results += [
                        Result(
                            SUITE,
                            "raw onnxruntime p50 per image (1 thread)",
                            r50,
                            "ms",
                            None,
                            f"<= {P50_TARGET_MS:g} ms",
                            r50 <= P50_TARGET_MS,
                            f"{len(queries)} photos; decode + resize + session.run",
                        ),
                        Result(
                            SUITE,
                            "service p50 per image (1 worker)",
                            s50,
                            "ms",
                            r50,
                            f"<= {P50_TARGET_MS:g} ms and <= {OVERHEAD_TARGET} x raw",
                            s50 <= P50_TARGET_MS and s50 <= OVERHEAD_TARGET * r50,
                            "POST /v2/identify, one photo, in process (no sockets), from "
                            "requests httpx built beforehand",
                        ),
                        Result(
                            SUITE,
                            "service p99 per image (1 worker)",
                            s99,
                            "ms",
                            r99,
                            f"<= {OVERHEAD_TARGET} x raw",
                            s99 <= OVERHEAD_TARGET * r99,
                        ),
                        Result(
                            SUITE,
                            "service CPU per image (1 worker)",
                            _pct(service_cpu, 50),
                            "ms",
                            _pct(raw_cpu, 50),
                            f"<= {OVERHEAD_TARGET} x raw",
                            _pct(service_cpu, 50) <= OVERHEAD_TARGET * _pct(raw_cpu, 50),
                            "median CPU time of the whole process (every thread) per request, "
                            "against raw per image: what the service adds to inference, "
                            "steadier than wall time on a loaded machine",
                        ),
                        Result(
                            SUITE,
                            "service images/s (1 worker)",
                            len(queries) / sum(service_t),
                            "images/s",
                            len(queries) / sum(raw_t),
                            f">= {1 / OVERHEAD_TARGET:.3f} x raw",
                            sum(raw_t) / sum(service_t) >= 1 / OVERHEAD_TARGET,
                        ),
                    ]
                else:
                    service_rate, raw_rate = await _two_in_flight(identify, raw, queries)
                    results.append(
                        Result(
                            SUITE,
                            "service images/s (2 workers)",
                            service_rate,
                            "images/s",
                            raw_rate,
                            f">= {1 / OVERHEAD_TARGET:.3f} x raw",
                            service_rate >= raw_rate / OVERHEAD_TARGET,
                            "two requests in flight vs two raw threads on one session, "
                            f"in alternating rounds of {ROUND_IMAGES} photos",
                        )
                    )
    return results


async def run(ctx: Context) -> list[Result]:
    try:
        from c4c.plantid.engine.embedder import Embedder, default_model
        from c4c.plantid.service import embed_photos
    except ImportError as exc:
        raise ServiceUnavailable(f"c4c-plantid not installed ({exc})") from exc
    photos, labels = _photos()
    with tempfile.TemporaryDirectory(prefix="c4c-bench-plantid-") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "models"
        embedder = Embedder(default_model(cache))
        try:

            def embed_all(blobs: Sequence[bytes]) -> np.ndarray:
                # As the service embeds references and queries alike.
                return np.concatenate(
                    [
                        embed_photos(embedder, blobs[i : i + 16], 50_000_000)
                        for i in range(0, len(blobs), 16)
                    ]
                )

            embeddings = await asyncio.to_thread(embed_all, [p.read_bytes() for p in photos])
            clips = await asyncio.to_thread(_frames)
            frame_clips = [c for c, frames in clips.items() for _ in frames]
            frame_embeddings = await asyncio.to_thread(
                embed_all, [f for frames in clips.values() for f in frames]
            )
        finally:
            embedder.close()
        results = await asyncio.to_thread(
            accuracy, embeddings, labels, frame_embeddings, frame_clips
        )
        results += await speed(ctx, photos, labels, cache, tmp)
    return results
