"""Gateway overhead: small GETs through the gateway (API key checked, rate limited, principal
signed, metrics) against the same requests straight to the upstream, through nginx
proxying the same upstream, and through a minimal Python proxy (the same server and client
as the gateway doing nothing else: the ceiling of any Python gateway on this machine), all
in one run, with each proxy's CPU time per request.

The upstream is a minimal uvicorn app (one process); the gateway runs as ``python -m
c4c.gateway``, once with one process (like for like with nginx's one worker: the target)
and once with ``WORKERS`` processes; nginx with keep-alive upstream connections. The
load comes from wrk: throughput with ``CONNECTIONS`` connections, latency (p50, p99) with one
connection, so that it is the path's own delay, not queueing. nginx and wrk come from
Debian's packages, installed here with apt-get when missing. Rounds alternate the order of
the variants; each figure is the median over the rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from bench._core import Context, Result, ServiceUnavailable, median
from c4c.shared.testing import free_ports

SUITE = "gateway"
CONNECTIONS = 32
SECONDS, ROUNDS = 8, 3
QUICK_SECONDS, QUICK_ROUNDS = 2, 1
TARGET_RATIO = 0.7  # of nginx's throughput
TARGET_ADDED_P99_MS = 3.0
PATH = "/bench/item"
WORKERS = os.cpu_count() or 1
DIRECT, NGINX, GATEWAY = "direct", "nginx", "gateway"
GATEWAY_N = f"gateway {WORKERS} workers"
MINIMAL = "minimal Python proxy"

log = logging.getLogger("bench.gateway")

UPSTREAM = """
import sys, uvicorn
BODY = b'{"id":"obs-000001","taxon":"Quercus ilex","score":0.87}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, lifespan="off")
"""

# The ceiling of any gateway written in Python here: the same server (uvicorn: httptools,
# uvloop) and client (aiohttp, keep-alive pool) as the gateway, doing only what a proxy must
# (forward method, path, query, headers less hop-by-hop ones, body; relay status, headers and
# body) with no identity, limits, metrics, logs or middleware. Not a product feature: a
# yardstick, one process like nginx's one worker.
MINIMAL_PROXY = """
import sys, aiohttp, uvicorn
from yarl import URL
BASE = sys.argv[2]
HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                 b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"date", b"server"})
session = None
async def app(scope, receive, send):
    global session
    if scope["type"] != "http":
        return
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"))
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    target = scope["raw_path"].decode("latin-1")
    if scope["query_string"]:
        target += "?" + scope["query_string"].decode("latin-1")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
               if k not in HOP]
    async with session.request(scope["method"], URL(BASE + target, encoded=True),
                               headers=headers, data=body or None,
                               allow_redirects=False) as response:
        content = await response.read()
        kept = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP]
    await send({"type": "http.response.start", "status": response.status, "headers": kept})
    await send({"type": "http.response.body", "body": content})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, lifespan="off")
"""

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream service {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def _ensure_tools() -> None:
    """nginx and wrk from Debian's packages, installed when missing."""
    missing = [name for name in ("nginx", "wrk") if not _which(name)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise ServiceUnavailable(f"{missing} missing and no apt-get to install them")
    log.info("installing %s with apt-get", missing)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceUnavailable(f"could not install {missing}: {done.stderr[-500:]}")
    still = [name for name in missing if not _which(name)]
    if still:
        raise ServiceUnavailable(f"{still} still missing after apt-get install")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Target(NamedTuple):
    url: str
    headers: dict[str, str]
    pid: int  # the serving process; its children (workers) count with it


def _cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of a process and its children, from /proc."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    ticks = 0
    for each in pids:
        with contextlib.suppress(OSError):
            # Fields after the command name (which may hold spaces): utime and stime are 14, 15.
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _servers(workdir: Path) -> Iterator[dict[str, Target]]:
    """The upstream, nginx, the minimal proxy and the gateway; variant → target."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], port: int, **kwargs: object) -> int:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs
        )
        processes.append(process)
        _wait_listening(port, process)
        return process.pid

    try:
        upstream, proxy, gateway, minimal, gateway_n = free_ports(5)
        upstream_pid = start([sys.executable, "-c", UPSTREAM, str(upstream)], upstream)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream, port=proxy))
        nginx = _which("nginx")
        assert nginx
        nginx_pid = start([nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"], proxy)
        minimal_pid = start(
            [sys.executable, "-c", MINIMAL_PROXY, str(minimal), f"http://127.0.0.1:{upstream}"],
            minimal,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")} | {
            "C4C_DATA_DIR": str(workdir / "gateway"),
            "C4C_GATEWAY_PORT": str(gateway),
            "C4C_GATEWAY_UPSTREAMS": json.dumps({"/bench": [f"http://127.0.0.1:{upstream}"]}),
            # Limited like production, but high enough never to refuse the benchmark.
            "C4C_GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
            "C4C_GATEWAY_RATE_LIMIT_BURST": "1000000",
        }
        create_key = ["keys", "create", "--name", "bench", "--scopes", "bench"]
        key = subprocess.run(
            [sys.executable, "-m", "c4c.gateway", *create_key],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        gateway_pid = start([sys.executable, "-m", "c4c.gateway"], gateway, env=env, cwd=workdir)
        env_n = env | {"C4C_GATEWAY_PORT": str(gateway_n), "C4C_GATEWAY_WORKERS": str(WORKERS)}
        gateway_n_pid = start(
            [sys.executable, "-m", "c4c.gateway"], gateway_n, env=env_n, cwd=workdir
        )
        with_key = {"X-API-Key": key}
        yield {
            DIRECT: Target(f"http://127.0.0.1:{upstream}{PATH}", {}, upstream_pid),
            NGINX: Target(f"http://127.0.0.1:{proxy}{PATH}", {}, nginx_pid),
            MINIMAL: Target(f"http://127.0.0.1:{minimal}{PATH}", {}, minimal_pid),
            GATEWAY: Target(f"http://127.0.0.1:{gateway}{PATH}", with_key, gateway_pid),
            GATEWAY_N: Target(f"http://127.0.0.1:{gateway_n}{PATH}", with_key, gateway_n_pid),
        }
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


class Sample(NamedTuple):
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the serving process's CPU time per request under load


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, headers: dict[str, str], connections: int, seconds: int) -> str:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    # wrk stops by itself after ``seconds``; a run far past that is a stall, not a figure.
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60)
    if "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk saw failures against {url}:\n{done.stdout}")
    return done.stdout


def _latency(output: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if not match:
        raise RuntimeError(f"no p{percentile} in wrk output:\n{output}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _measure(target: Target, seconds: int) -> Sample:
    cpu = _cpu_seconds(target.pid)
    loaded = _wrk(target.url, target.headers, CONNECTIONS, seconds)
    cpu = _cpu_seconds(target.pid) - cpu
    rate = re.search(r"Requests/sec:\s+([\d.]+)", loaded)
    count = re.search(r"^\s*(\d+) requests in", loaded, re.M)
    if not rate or not count:
        raise RuntimeError(f"no rate in wrk output:\n{loaded}")
    single = _wrk(target.url, target.headers, 1, seconds)
    return Sample(
        float(rate.group(1)),
        _latency(single, "50"),
        _latency(single, "99"),
        cpu / int(count.group(1)) * 1e6,
    )


def _run(ctx: Context) -> list[Result]:
    _ensure_tools()
    seconds, rounds = (QUICK_SECONDS, QUICK_ROUNDS) if ctx.quick else (SECONDS, ROUNDS)
    samples: dict[str, list[Sample]] = {
        name: [] for name in (DIRECT, NGINX, MINIMAL, GATEWAY, GATEWAY_N)
    }
    with (
        tempfile.TemporaryDirectory(prefix="c4c-bench-gateway-") as tmp,
        _servers(Path(tmp)) as targets,
    ):
        for each in targets.values():  # warm: connections, caches, imports
            _wrk(each.url, each.headers, CONNECTIONS, 1)
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                sample = _measure(targets[name], seconds)
                samples[name].append(sample)
                log.info(
                    "round %d %s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, %.0f µs CPU/request",
                    r + 1,
                    name,
                    *sample,
                )

    def mid(name: str, field: str) -> float:
        return median([getattr(s, field) for s in samples[name]])

    shape = (
        f"median of {rounds} round(s) of {seconds}s; wrk, {CONNECTIONS} connections for "
        "throughput, 1 for latency; small JSON GET"
    )
    rows = [
        Result(SUITE, f"{DIRECT} req/s", mid(DIRECT, "rps"), "req/s", detail=shape),
        Result.against(
            SUITE,
            f"{NGINX} req/s",
            mid(NGINX, "rps"),
            "req/s",
            baseline=mid(DIRECT, "rps"),
            baseline_name=DIRECT,
            detail=shape,
        ),
        Result.against(
            SUITE,
            f"{MINIMAL} req/s",
            mid(MINIMAL, "rps"),
            "req/s",
            baseline=mid(NGINX, "rps"),
            baseline_name=NGINX,
            detail=shape + "; the ceiling of a Python proxy here: uvicorn and aiohttp as the "
            "gateway, nothing else (no identity, limits, metrics or logs)",
        ),
        Result.against(
            SUITE,
            f"{GATEWAY} req/s",
            mid(GATEWAY, "rps"),
            "req/s",
            baseline=mid(NGINX, "rps"),
            baseline_name=NGINX,
            min_ratio=TARGET_RATIO,
            detail=shape + f"; vs direct: {mid(GATEWAY, 'rps') / mid(DIRECT, 'rps'):.2f}; "
            f"vs {MINIMAL}: {mid(GATEWAY, 'rps') / mid(MINIMAL, 'rps'):.2f}",
        ),
        Result.against(
            SUITE,
            f"{GATEWAY_N} req/s",
            mid(GATEWAY_N, "rps"),
            "req/s",
            baseline=mid(NGINX, "rps"),
            baseline_name=NGINX,
            detail=shape + "; nginx has 1 worker; rate limits and breakers are per worker",
        ),
    ]
    for percentile in ("p50", "p99"):
        field = f"{percentile}_ms"
        direct = mid(DIRECT, field)
        rows.append(Result(SUITE, f"{DIRECT} {percentile}", direct, "ms", detail=shape))
        for name in (NGINX, MINIMAL, GATEWAY, GATEWAY_N):
            added = mid(name, field) - direct
            target = met = None
            if name == GATEWAY and percentile == "p99":
                target, met = f"<= {TARGET_ADDED_P99_MS:g} ms", added <= TARGET_ADDED_P99_MS
            rows.append(
                Result(
                    SUITE,
                    f"{name} added {percentile}",
                    added,
                    "ms",
                    direct,
                    target,
                    met,
                    detail=f"{shape}; {name} {percentile} {mid(name, field):.2f} ms",
                )
            )
    # CPU per request is what a shared machine blurs least: the ceiling argument in numbers.
    for name in (DIRECT, NGINX, MINIMAL, GATEWAY, GATEWAY_N):
        rows.append(
            Result(
                SUITE,
                f"{name} CPU per request",
                mid(name, "cpu_us"),
                "µs",
                None if name in (DIRECT, NGINX) else mid(NGINX, "cpu_us"),
                detail=f"{shape}; user and system time of the serving process (and its "
                f"workers) over the throughput run, divided by the requests"
                + ("" if name in (DIRECT, NGINX) else "; baseline: nginx"),
            )
        )
    return rows


async def run(ctx: Context) -> list[Result]:
    # Processes and wrk are blocking work: keep them off the event loop.
    return await asyncio.to_thread(_run, ctx)
