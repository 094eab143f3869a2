"""A new user's first minute: ``make run`` in a clean clone serves every service's health
through the gateway within 30 s, every service is ready within a minute and a half (quality
loads its taxonomy first), and Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from c4c.shared.testing import free_ports

ROOT = Path(__file__).resolve().parents[1]
SERVICE_PREFIXES = ["/ingest", "/quality", "/video", "/plantid", "/mobis"]
READY_WITHIN = 90.0


@pytest.mark.slow
def test_make_run_from_a_clean_clone_serves_every_service(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("C4C_")}
    env["C4C_GATEWAY_PORT"] = str(port)
    venv = ROOT / ".venv"
    # Reuse this checkout's environment (installing is what `make test` just did); the
    # clone brings everything else: Makefile, settings defaults, an empty ./data.
    command = ["make", "run", f"VENV={venv}", "-o", f"{venv}/.installed"]
    log = (tmp_path / "run.log").open("w+")
    process = subprocess.Popen(
        command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    started = time.monotonic()
    healthy: dict[str, str] = {}
    try:
        while len(healthy) < len(SERVICE_PREFIXES) and time.monotonic() - started < 30:
            assert process.poll() is None, "make run exited early"
            for prefix in SERVICE_PREFIXES:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}{prefix}/healthz", timeout=2)
                except httpx.TransportError:
                    break
                if answer.status_code == 200:
                    healthy[prefix] = answer.json()["service"]
            else:
                continue
            time.sleep(0.2)  # the server is not listening yet; poll again shortly
        elapsed = time.monotonic() - started
        assert healthy == {p: p.strip("/") for p in SERVICE_PREFIXES}, f"after {elapsed:.1f}s"
        assert (clone / "data" / "ingest.db").exists()
        # Every service ready too: quality once its taxonomy is loaded, seconds later.
        while time.monotonic() - started < READY_WITHIN:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            if health.status_code == 200:
                break
            time.sleep(0.5)
        assert health.status_code == 200, health.text
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("make run did not stop within 30 s of Ctrl-C")
    log.seek(0)
    output = log.read()
    assert "Application shutdown complete" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
