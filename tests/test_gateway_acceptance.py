"""The gateway's acceptance, as a real process in front of real upstream processes on
loopback: 200 MB streamed each way in little memory, a killed upstream opening the breaker
(503 + Retry-After) and closing it once back, POSTs never sent twice by retries, keys
made and revoked with the CLI, and several worker processes sharing the port and (with the
database backend) one quota.

Run as a script, this file is the upstream: ``python test_gateway_acceptance.py PORT LOG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from c4c.shared.testing import free_ports

HERE = Path(__file__).resolve()
MB = 1024 * 1024
BIG = 200 * MB
CHUNK = bytes(range(256)) * 4096  # 1 MiB
START_TIMEOUT = 30.0

pytestmark = pytest.mark.slow


# --- the upstream (this file run as a script) ------------------------------------------------


def upstream_app(log_path: str) -> Callable[..., Any]:
    async def read_body(receive: Any) -> tuple[int, str]:
        digest, length = hashlib.sha256(), 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            length += len(body)
            if not message.get("more_body"):
                return length, digest.hexdigest()

    async def respond(send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, headers = scope["path"], dict(scope["headers"])
        if path == "/up/download":
            size = int(scope["query_string"].decode().removeprefix("size="))
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            for offset in range(0, size, len(CHUNK)):
                body = CHUNK[: min(len(CHUNK), size - offset)]
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        length, digest = await read_body(receive)
        if path == "/up/peer":  # the port the gateway's connection came from
            await respond(send, 200, json.dumps({"port": scope["client"][1]}).encode())
            return
        if path in ("/up/record", "/up/crash"):
            line = f"{headers.get(b'x-marker', b'-').decode()} {os.getpid()}\n"
            with Path(log_path).open("a") as log:  # noqa: ASYNC230  (one short line, flushed)
                log.write(line)
        if path == "/up/crash":
            os._exit(1)  # dies holding the request: the gateway gets no answer
        await respond(send, 200, json.dumps({"length": length, "sha256": digest}).encode())

    return app


def run_upstream(port: int, log_path: str) -> None:
    import uvicorn

    # proxy_headers off: the client is the gateway's connection, not what X-Forwarded-For says.
    uvicorn.run(
        upstream_app(log_path),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        proxy_headers=False,
    )


# --- processes -------------------------------------------------------------------------------


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Upstream:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, str(HERE), str(self.port), str(self.log)]
        self.process = subprocess.Popen(command)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


class Gateway:
    def __init__(self, tmp_path: Path, upstreams: list[Upstream], **settings: str) -> None:
        self.port = free_ports(1)[0]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")} | {
            "C4C_DATA_DIR": str(tmp_path / "gateway"),
            "C4C_GATEWAY_PORT": str(self.port),
            "C4C_GATEWAY_UPSTREAMS": json.dumps({"/up": [u.url for u in upstreams]}),
            "C4C_GATEWAY_ROUTES": json.dumps({"/up": {"max_body_bytes": BIG + MB}}),
            "C4C_GATEWAY_RATE_LIMIT_PER_SECOND": "0",
            "C4C_LOG_FORMAT": "text",
            "C4C_LOG_LEVEL": "WARNING",
        }
        self.env |= {f"C4C_GATEWAY_{name.upper()}": value for name, value in settings.items()}
        self.cwd = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        """``python -m c4c.gateway ARGS`` on the gateway's database; its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "c4c.gateway", *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def start(self) -> None:
        command = [sys.executable, "-m", "c4c.gateway"]
        self.process = subprocess.Popen(command, env=self.env, cwd=self.cwd)

    def memory(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the gateway process, in bytes."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def workers(self) -> list[int]:
        """The worker processes' ids (``C4C_GATEWAY_WORKERS`` > 1): the children spawned by
        multiprocessing (not its resource tracker)."""
        assert self.process is not None
        pid = self.process.pid
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Callable[[int], list[Upstream]]]:
    started: list[Upstream] = []

    def start(count: int) -> list[Upstream]:
        log = tmp_path / "received.log"
        for _ in range(count):
            started.append(Upstream(free_ports(1)[0], log))
            started[-1].start()
        return started[-count:]

    yield start
    for upstream in started:
        upstream.kill()


@pytest.fixture
def gateway(
    tmp_path: Path, eventually: Callable[..., Any]
) -> Iterator[
    Callable[..., contextlib.AbstractAsyncContextManager[tuple[Gateway, httpx.AsyncClient]]]
]:
    started: list[Gateway] = []

    @contextlib.asynccontextmanager
    async def start(
        ups: list[Upstream], **settings: str
    ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
        gw = Gateway(tmp_path, ups, **settings)
        started.append(gw)
        key = gw.cli("keys", "create", "--name", "acceptance", "--scopes", "up").strip()
        gw.start()
        await eventually(
            lambda: all(listening(p) for p in [gw.port, *(u.port for u in ups)]),
            timeout=START_TIMEOUT,
            interval=0.1,
        )
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=gw.url, headers={"X-API-Key": key}, timeout=60, limits=limits
        ) as client:
            yield gw, client

    yield start
    for gw in started:
        gw.stop()


# --- acceptance ------------------------------------------------------------------------------


async def test_200_mb_up_and_down_stream_through_in_little_memory(
    upstreams: Callable[[int], list[Upstream]], gateway: Callable[..., Any]
) -> None:
    async with gateway(upstreams(1)) as (gw, client):
        for _ in range(3):  # warm: imports, pools, buffers
            assert (await client.post("/up/upload", content=CHUNK * 4)).status_code == 200
            assert (await client.get(f"/up/download?size={4 * MB}")).status_code == 200
        before = gw.memory("VmRSS")

        async def body() -> AsyncIterator[bytes]:
            for _ in range(BIG // len(CHUNK)):
                yield CHUNK

        upload = await client.post(
            "/up/upload", content=body(), headers={"Content-Length": str(BIG)}
        )
        assert upload.status_code == 200, upload.text
        expected = hashlib.sha256()
        for _ in range(BIG // len(CHUNK)):
            expected.update(CHUNK)
        assert upload.json() == {"length": BIG, "sha256": expected.hexdigest()}

        received = 0
        async with client.stream("GET", f"/up/download?size={BIG}") as download:
            assert download.status_code == 200
            async for chunk in download.aiter_raw():
                received += len(chunk)
        assert received == BIG
        growth = gw.memory("VmHWM") - before
    assert growth < 50 * MB, f"the gateway's peak memory grew by {growth / MB:.0f} MB"


async def test_a_killed_upstream_opens_the_breaker_and_it_closes_once_back(
    upstreams: Callable[[int], list[Upstream]],
    gateway: Callable[..., Any],
    eventually: Callable[..., Any],
) -> None:
    [upstream] = upstreams(1)
    settings = {"breaker_failures": "3", "breaker_open_seconds": "1"}
    async with gateway([upstream], **settings) as (_, client):
        seen: list[httpx.Response] = []
        broken = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal broken
            while not stop.is_set():
                try:
                    seen.append(await client.get("/up/ping"))
                except httpx.RemoteProtocolError:
                    broken += 1  # the upstream died while answering: the answer is cut off

        workers = [asyncio.create_task(load()) for _ in range(4)]
        try:
            await eventually(lambda: len(seen) > 20 and seen[-1].status_code == 200, timeout=20)
            upstream.kill()
            await eventually(lambda: seen[-1].status_code == 503, timeout=20)
            refused = seen[-1]
            upstream.start()
            await eventually(lambda: seen[-1].status_code == 200, timeout=20)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        metrics = (await client.get("/metrics")).text

    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:c4c:problem:upstream-unavailable"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    statuses = {r.status_code for r in seen}
    assert statuses <= {200, 502, 503}, statuses
    assert broken <= 4  # at most the requests in flight at the kill
    assert f'c4c_gateway_breaker_state{{upstream="{upstream.url}"}} 0.0' in metrics
    assert f'c4c_gateway_breaker_opened_total{{upstream="{upstream.url}"}}' in metrics


def local_ports(pid: int) -> set[int]:
    """The local ports of a process's TCP sockets (on IPv4), from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


async def test_workers_share_the_port_and_with_the_database_backend_one_quota(
    upstreams: Callable[[int], list[Upstream]],
    gateway: Callable[..., Any],
    eventually: Callable[..., Any],
) -> None:
    settings = {"workers": "2", "rate_limit_backend": "database"}
    async with gateway(upstreams(1), **settings) as (gw, client):
        await eventually(lambda: len(gw.workers()) == 2, timeout=START_TIMEOUT)
        served: set[int] = set()

        async def fresh_connection(path: str, headers: dict[str, str]) -> httpx.Response:
            # A connection of its own: the kernel hands each one to one of the workers.
            async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=60) as new:
                return await new.get(path)

        async def both_workers_answered() -> bool:
            answer = await fresh_connection("/up/peer", dict(client.headers))
            assert answer.status_code == 200, answer.text
            # The worker whose pooled connection to the upstream has that port answered.
            port = answer.json()["port"]
            served.update(pid for pid in gw.workers() if port in local_ports(pid))
            return len(served) == 2

        await eventually(both_workers_answered, timeout=START_TIMEOUT)

        quota = 6
        key = gw.cli("keys", "create", "--name", "q", "--scopes", "up", "--daily-quota", "6")
        answers = [
            await fresh_connection("/up/ping", {"X-API-Key": key.strip()}) for _ in range(10)
        ]
    assert [a.status_code for a in answers] == [200] * quota + [429] * (10 - quota)
    assert answers[-1].headers["ratelimit"].startswith('"daily";r=0;')


def received_markers(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


async def test_retries_never_send_a_post_twice(
    upstreams: Callable[[int], list[Upstream]], gateway: Callable[..., Any]
) -> None:
    ups = upstreams(2)
    async with gateway(ups, breaker_failures="100") as (_, client):
        # A replica dies holding the POST: it was received, so it is not sent again.
        crash = await client.post("/up/crash", content=b"x", headers={"X-Marker": "crash"})
        assert crash.status_code == 502
        markers = {f"plain-{uuid.uuid4().hex}": False for _ in range(20)}
        markers |= {f"keyed-{uuid.uuid4().hex}": True for _ in range(20)}

        async def post(marker: str, keyed: bool) -> tuple[str, int]:
            headers = {"X-Marker": marker} | ({"Idempotency-Key": marker} if keyed else {})
            answer = await client.post("/up/record", content=b"{}", headers=headers)
            return marker, answer.status_code

        # Half of them meet the dead replica (refused connections): only keyed ones retry.
        answers = dict(await asyncio.gather(*(post(m, k) for m, k in markers.items())))
        gets = await asyncio.gather(*(client.get("/up/ping") for _ in range(10)))

    received = received_markers(ups[0].log)
    assert received.count("crash") == 1
    for marker, keyed in markers.items():
        assert received.count(marker) == (1 if answers[marker] == 200 else 0), marker
        assert answers[marker] in ((200,) if keyed else (200, 502)), marker
    assert any(status == 502 for status in answers.values())  # plain POSTs were not retried
    assert [g.status_code for g in gets] == [200] * 10  # GETs were


async def test_keys_made_and_revoked_with_the_cli(
    upstreams: Callable[[int], list[Upstream]], gateway: Callable[..., Any]
) -> None:
    async with gateway(upstreams(1), api_key_cache_seconds="0") as (gw, client):
        assert (await client.get("/up/ping")).status_code == 200
        [listed] = [json.loads(line) for line in gw.cli("keys", "list", "--json").splitlines()]
        assert (listed["name"], listed["scopes"], listed["revoked_at"]) == (
            "acceptance",
            ["up"],
            None,
        )
        gw.cli("keys", "revoke", listed["id"])
        refused = await client.get("/up/ping")
        [revoked] = [json.loads(line) for line in gw.cli("keys", "list", "--json").splitlines()]
    assert refused.status_code == 401
    assert refused.json()["type"] == "urn:c4c:problem:unauthorized"
    assert revoked["revoked_at"] is not None


if __name__ == "__main__":
    run_upstream(int(sys.argv[1]), sys.argv[2])
