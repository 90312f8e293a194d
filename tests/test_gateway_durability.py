"""Durable on ack: kill -9 the gateway under load, restart it, and find every acknowledged
request in the audit log. The gateway is a real ``safetygame serve`` subprocess; its
upstream is the fixed-latency loopback server (a real HTTP peer)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import httpx

from safetygame.bench.gateway import start_server_process, stop_server_process, upstream_in_thread
from safetygame.gateway.audit import export_records

SERVE = [sys.executable, "-c", "from safetygame.cli import main; main()", "serve"]


def serve_cmd(upstream: str, audit: str) -> list[str]:
    return [
        *SERVE,
        "--upstream",
        upstream,
        "--port",
        "0",
        "--audit",
        audit,
        "--upstream-concurrency",
        "16",
        "--log-level",
        "warning",
    ]


def load_until_failure(url: str, acked: list[str], stop: threading.Event, workers: int) -> None:
    """Concurrent chats from this thread; records the request id of every 200 received."""

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body = {
                "model": "safetygame",
                "messages": [{"role": "user", "content": f"question {w}-{i}"}],
            }
            try:
                r = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return  # the server is gone
            if r.status_code == 200:
                acked.append(r.headers["x-request-id"])

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await asyncio.gather(*(worker(client, w) for w in range(workers)))

    asyncio.run(main())


def test_kill_9_under_load_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    audit = f"sqlite:///{db}"
    acked: list[str] = []
    stop = threading.Event()
    with upstream_in_thread(latency=0.01) as up:
        proc, url = start_server_process(serve_cmd(up.url, audit), tmp_path / "gw1.log")
        try:
            client = threading.Thread(target=load_until_failure, args=(url, acked, stop, 16))
            client.start()
            deadline = time.monotonic() + 60
            while len(acked) < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # mid-flight: requests are in every stage
            proc.wait(10)
            stop.set()
            client.join(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert len(acked) >= 60, "the load never got going"
        # The restarted gateway opens the crashed database and serves.
        proc, url = start_server_process(serve_cmd(up.url, audit), tmp_path / "gw2.log")
        try:
            r = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=30,
                json={"model": "safetygame", "messages": [{"role": "user", "content": "after"}]},
            )
            assert r.status_code == 200
        finally:
            stop_server_process(proc)
    stored = [rec["request_id"] for rec in export_records(audit)]
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged decisions lost"
    assert len(stored) == len(set(stored))  # no duplicates
    assert r.headers["x-request-id"] in stored
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
