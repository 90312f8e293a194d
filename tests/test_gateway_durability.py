"""Durable on ack: kill -9 the gateway under load, restart it, and find every acknowledged
request in the audit log. The gateway is a real ``safetygame serve`` subprocess; its
upstream is the fixed-latency loopback server (a real HTTP peer)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from safetygame.bench.gateway import (
    child_pids,
    start_server_process,
    stop_server_process,
    upstream_in_thread,
)
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


def test_workers_share_one_port_and_store_and_survive_a_crash(tmp_path: Path) -> None:
    """``--workers 2``: one port, one SQLite audit file; a worker killed with -9 under load
    is replaced, no acknowledged decision is lost or duplicated, SIGINT stops them all."""
    db = tmp_path / "audit.sqlite3"
    audit = f"sqlite:///{db}"
    acked: list[str] = []
    stop = threading.Event()
    with upstream_in_thread(latency=0.01) as up:
        cmd = [*serve_cmd(up.url, audit), "--workers", "2", "--json"]
        log = tmp_path / "gw.log"
        with open(log, "w") as err:
            sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert sup.stdout is not None
            info = json.loads(sup.stdout.readline())
            first = set(info["workers"])
            assert len(first) == 2 and child_pids(sup.pid) == first
            client = threading.Thread(
                target=load_until_failure, args=(info["url"], acked, stop, 16)
            )
            client.start()
            deadline = time.monotonic() + 60
            while len(acked) < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            stop.set()
            client.join(60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now = child_pids(sup.pid)
                if len(now) == 2 and victim not in now:
                    break
                time.sleep(0.2)
            assert len(now) == 2 and victim not in now, log.read_text()[-2000:]
            with httpx.Client(base_url=info["url"], timeout=30) as http:
                after = []
                for i in range(8):  # new connections: both workers accept
                    r = http.post(
                        "/v1/chat/completions",
                        headers={"connection": "close"},
                        json={
                            "model": "safetygame",
                            "messages": [{"role": "user", "content": f"after {i}"}],
                        },
                    )
                    assert r.status_code == 200, r.text
                    after.append(r.headers["x-request-id"])
            sup.send_signal(signal.SIGINT)
            assert sup.wait(30) == 0
            assert not child_pids(sup.pid)
            assert not any(Path(f"/proc/{p}").exists() for p in now)
        finally:
            if sup.poll() is None:
                sup.kill()
                sup.wait()
    assert len(acked) >= 60, "the load never got going"
    stored = [rec["request_id"] for rec in export_records(audit)]
    assert not (set(acked) | set(after)) - set(stored)
    assert len(stored) == len(set(stored))
    assert "restarting it" in log.read_text()
