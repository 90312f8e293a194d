"""Metrics that add up under ``safetygame serve --workers 2`` (issue 20, item 8).

A real supervisor with two real worker processes on one port, in front of the
fixed-latency loopback upstream (a real HTTP peer; the test is about the counters, not the
model). Which worker accepts a connection is steered with SIGSTOP: a stopped worker cannot
accept, so every new connection goes to the other one. That makes each worker serve a known
share of the requests and answer a known share of the scrapes, so a worker that reported
only its own share would fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from safetygame.bench.gateway import child_pids, upstream_in_thread
from safetygame.errors import ConfigError
from safetygame.gateway.metrics import GatewayMetrics, multiprocess_values
from safetygame.gateway.workers import run_workers
from test_gateway import parse_prometheus

SERVE = [sys.executable, "-c", "from safetygame.cli import main; main()", "serve"]
REQUESTS = "safetygame_requests_total"


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


@contextlib.contextmanager
def only(pool: list[int], worker: int) -> Iterator[None]:
    """Every other worker of ``pool`` stopped (SIGSTOP) while inside."""
    others = [p for p in pool if p != worker]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)


def kill_workers(pids: Iterable[int]) -> None:
    """SIGKILL every worker of ``pids`` still running: a failed test leaves none behind
    (a supervisor killed with -9 cannot stop its workers)."""
    for p in pids:
        with contextlib.suppress(OSError):
            if b"safetygame" in Path(f"/proc/{p}/cmdline").read_bytes():  # not a reused pid
                os.kill(p, signal.SIGKILL)


def chat(http: httpx.Client, i: int) -> None:
    body = {"model": "safetygame", "messages": [{"role": "user", "content": f"question {i}"}]}
    r = http.post("/v1/chat/completions", json=body, headers={"connection": "close"})
    assert r.status_code == 200, r.text


def scrape(http: httpx.Client) -> dict[str, float]:
    r = http.get("/metrics", headers={"connection": "close"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(r.text)


def test_two_workers_report_the_totals_whichever_answers(tmp_path: Path) -> None:
    with upstream_in_thread(latency=0.005) as up:
        cmd = [*SERVE, "--upstream", up.url, "--port", "0", "--workers", "2", "--json"]
        cmd += ["--audit", f"sqlite:///{tmp_path / 'audit.db'}", "--log-level", "warning"]
        with open(tmp_path / "gw.log", "w") as err:
            sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        pool: list[int] = []
        seen: set[int] = set()  # every worker pid, the replaced one included
        try:
            assert sup.stdout is not None
            info = json.loads(sup.stdout.readline())
            pool = info["workers"]
            seen.update(pool)
            a, b = pool
            env = Path(f"/proc/{a}/environ").read_bytes().split(b"\0")
            shared = Path(
                next(e for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
                .split(b"=", 1)[1]
                .decode()
            )
            assert shared.is_dir()
            with httpx.Client(base_url=info["url"], timeout=30) as http:
                with only(pool, a):
                    for i in range(3):
                        chat(http, i)
                with only(pool, b):
                    for i in range(5):
                        chat(http, 3 + i)
                for _ in range(2):
                    for w in (a, b):
                        with only(pool, w):
                            m = scrape(http)
                        assert m[f'{REQUESTS}{{tenant="default",code="200"}}'] == 8
                        assert total(m, "safetygame_decisions_total") == 8
                        assert m['safetygame_decision_latency_seconds_count{tenant="default"}'] == 8
                        assert m["safetygame_requests_in_flight"] == 0
                        calls = m['safetygame_upstream_calls_total{operation="sample"}']
                        assert calls == 8  # one sampling call per decision
                for _ in range(6):  # unsteered scrapes: the kernel picks, the totals hold
                    assert scrape(http)[f'{REQUESTS}{{tenant="default",code="200"}}'] == 8

                # A worker killed with -9 is replaced; what it counted still counts.
                os.kill(a, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    now = child_pids(sup.pid)
                    if len(now) == 2 and a not in now:
                        break
                    time.sleep(0.2)
                assert len(now) == 2 and a not in now
                pool = sorted(now)
                seen.update(pool)
                chat(http, 100)
                for w in pool:
                    with only(pool, w):
                        m = scrape(http)
                    assert m[f'{REQUESTS}{{tenant="default",code="200"}}'] == 9
                    assert m["safetygame_requests_in_flight"] == 0
            sup.send_signal(signal.SIGINT)
            assert sup.wait(30) == 0
            assert not shared.exists()  # the supervisor removed its metrics folder
        finally:
            for p in pool:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGCONT)
            if sup.poll() is None:
                sup.kill()
                sup.wait()
            kill_workers(seen)


def test_metrics_refuse_a_folder_set_after_prometheus_client_was_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test process imported prometheus_client without the variable: values in memory.
    if multiprocess_values():
        pytest.skip("this test process runs prometheus_client in multiprocess mode")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="set after prometheus_client was imported"):
        GatewayMetrics()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert GatewayMetrics().directory is None


def test_a_pool_that_cannot_be_built_leaves_no_metrics_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SharedMetricsDir goes
    with pytest.raises(ConfigError, match="--workers"):
        run_workers(["true"], "127.0.0.1", 0, 0, lambda url, pids: None)
    assert list(tmp_path.iterdir()) == []


def test_a_single_process_gateway_keeps_its_own_registry(tmp_path: Path) -> None:
    with upstream_in_thread(latency=0.005) as up:
        cmd = [*SERVE, "--upstream", up.url, "--port", "0", "--json", "--log-level", "warning"]
        cmd += ["--audit", f"sqlite:///{tmp_path / 'audit.db'}"]
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(tmp_path / "gw.log", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout is not None
            url = json.loads(proc.stdout.readline())["url"]
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in range(3):
                    chat(http, i)
                m = scrape(http)
            assert m[f'{REQUESTS}{{tenant="default",code="200"}}'] == 3
            assert m["safetygame_requests_in_flight"] == 0
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
