"""Benchmark of the gateway's own overhead, and the loopback upstream it runs against.

``LoopbackUpstream`` is a tiny OpenAI-compatible HTTP server (asyncio streams, HTTP/1.1
keep-alive) that answers chat requests and yes/no log-probability requests after a fixed
sleep. It is a real HTTP peer, not a mock: the gateway reaches it over loopback through its
ordinary backend. Its ``fault`` modes make it misbehave on purpose for fault-injection tests
(``garbage``: 200 with a non-JSON body; ``http500``; ``wrong_shape``: JSON without choices;
``hang``: never answers).

``run_gateway_bench`` starts the upstream and a gateway (``safetygame serve``, optionally
with ``--workers N``) as subprocesses, sends ``requests`` chats at ``concurrency`` from this
process, and reads each response's ``Server-Timing`` header. Overhead definitions (docs/gateway.md):

- ``overhead`` (the headline p50/p99): gateway wall time (request received -> decision
  audited and response ready) minus the time during which at least one upstream call of the
  request was in flight, as measured by the gateway around its backend calls. This is the
  time the request spent outside awaiting the upstream: parsing, policy lookup, the LP,
  the audit commit, and event-loop queueing behind other requests.
- ``no_audit``: the same minus the wait for the audit commit (``synchronous=FULL``: one
  fsync per group commit), to show what durability costs on the machine's disk.
- ``overhead_vs_ideal``: gateway wall time minus the ideal upstream critical path
  (``rounds * latency``: one round of sampling, one round of probes). It also charges the
  gateway's HTTP client work and any queueing inside upstream calls to the gateway, so it is
  the stricter figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import numpy as np

from safetygame.backends.transport import KeepAliveTransport, TransportKind

Fault = Literal["garbage", "http500", "wrong_shape", "hang"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


def _p_yes(text: str) -> float:
    """A deterministic, varied P(yes) per prompt, so the game has something to decide."""
    return 0.05 + 0.9 * (zlib.crc32(text.encode("utf-8")) % 1000) / 1000.0


class LoopbackUpstream:
    """A fixed-latency OpenAI-compatible server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        latency: float = 0.05,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: Fault | None = None,
    ) -> None:
        self.latency = latency
        self.host, self.port = host, port
        self.fault = fault
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                self.requests += 1
                status, payload = await self._respond(method, path, body)
                reason = _REASONS.get(status, "OK")
                ctype = "application/json" if self.fault != "garbage" else "text/html"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\n"
                    f"content-length: {len(payload)}\r\nconnection: keep-alive\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "GET" and path == "/stats":  # for the bench: HTTP requests served
            return 200, json.dumps({"requests": self.requests}).encode()
        if method == "GET" and path in ("/health", "/v1/models"):
            return 200, b'{"status":"ok","object":"list","data":[{"id":"loopback"}]}'
        if method != "POST" or path != "/v1/chat/completions":
            return 404, b'{"error":{"message":"not found"}}'
        if self.fault == "hang":
            await asyncio.sleep(3600)
        await asyncio.sleep(self.latency)
        if self.fault == "http500":
            return 500, b'{"error":{"message":"upstream exploded (fault injection)"}}'
        if self.fault == "garbage":
            return 200, b"<html>\x00\xff not json"
        if self.fault == "wrong_shape":
            return 200, b'{"object":"chat.completion","choices":"nope"}'
        req = json.loads(body)
        text = json.dumps(req.get("messages", []))
        if req.get("logprobs"):
            p = _p_yes(text)
            lp_yes, lp_no = float(np.log(p)), float(np.log(1 - p))
            top = [{"token": "Yes", "logprob": lp_yes}, {"token": "No", "logprob": lp_no}]
            first = top[0] if p >= 0.5 else top[1]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": first["token"]},
                "logprobs": {"content": [{**first, "top_logprobs": top}]},
                "finish_reason": "length",
            }
            usage = {"prompt_tokens": len(text) // 4, "completion_tokens": 1}
        else:
            seed = req.get("seed")
            reply = f"Loopback reply {seed if seed is not None else random.randrange(1000)}."
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
            usage = {"prompt_tokens": len(text) // 4, "completion_tokens": 4}
        out = {
            "id": "loopback",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "loopback",
            "choices": [choice],
            "usage": usage,
        }
        return 200, json.dumps(out).encode()


@contextlib.contextmanager
def upstream_in_thread(
    latency: float = 0.05, fault: Fault | None = None
) -> Iterator[LoopbackUpstream]:
    """A ``LoopbackUpstream`` on its own event loop in a daemon thread (for tests)."""
    up = LoopbackUpstream(latency, fault=fault)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(up.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="loopback-upstream", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("loopback upstream did not start")
    try:
        yield up
    finally:
        asyncio.run_coroutine_threadsafe(up.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


# -- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayBenchResult:
    """Overheads in milliseconds (see the module docstring for the definitions)."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    no_audit_p50_ms: float
    no_audit_p99_ms: float
    audit_p50_ms: float
    vs_ideal_p50_ms: float
    vs_ideal_p99_ms: float
    client_p50_ms: float
    client_p99_ms: float
    gateway_p50_ms: float
    upstream_p50_ms: float
    requests: int
    ok: int
    concurrency: int
    upstream_latency_ms: float
    upstream_rounds: int
    upstream_http_per_request: float  # HTTP requests the upstream served per decision
    gateway_cpu_ms_per_request: float  # gateway processes' CPU (user + system) per decision
    upstream_cpu_ms_per_request: float
    throughput_rps: float
    wall_s: float
    workers: int
    statuses: dict[str, int] = field(default_factory=dict)
    transport: TransportKind = "hand"  # the gateway's upstream HTTP client


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:]) / 1000.0
    return out


def _src_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def start_server_process(cmd: list[str], log: Path) -> tuple[subprocess.Popen[str], str]:
    """Start a server subprocess that prints its URL as the first stdout line."""
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_src_env())
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {' '.join(cmd[:4])}: {log.read_text()[-1500:]}")
    return proc, url


def stop_server_process(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _load(
    url: str, requests: int, concurrency: int
) -> tuple[list[dict[str, float]], list[int], float]:
    timings: list[dict[str, float]] = []
    codes: list[int] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # The backend's lean keep-alive transport: the load generator shares the machine with
    # the gateway, so its own CPU per request is kept small.
    transport = KeepAliveTransport(concurrency, concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, transport=transport
    ) as client:

        async def worker() -> None:
            for i in counter:
                body = {
                    "model": "safetygame",
                    "messages": [{"role": "user", "content": f"Benchmark question {i}?"}],
                }
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                client_s = time.perf_counter() - t
                codes.append(r.status_code)
                if r.status_code == 200:
                    st = _server_timing(r.headers.get("server-timing", ""))
                    timings.append(
                        {
                            **st,
                            "client": client_s,
                            "status_ok": float(r.json()["safetygame"]["status"] == "ok"),
                        }
                    )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return timings, codes, wall


def upstream_rounds(policy: str) -> int:
    """Upstream calls on a decision's critical path: one round of sampling, then one round of
    probes: every candidate's reads (helpfulness, harm, each category) go out at once
    (``SafetyGame._score_all``), as far as the backend's ``max_concurrency`` lets them; a
    policy's categories add reads to that round, not rounds."""
    from safetygame.policy import load_policy

    load_policy(policy)  # a bad policy name fails here, before any server starts
    return 1 + 1


def run_gateway_bench(
    *,
    requests: int = 2000,
    concurrency: int = 32,
    latency: float = 0.05,
    warmup: int = 64,
    policy: str = "default",
    upstream_concurrency: int = 16,
    workers: int = 1,
    transport: TransportKind = "hand",
) -> GatewayBenchResult:
    """Start upstream + gateway subprocesses on loopback and measure (see module docstring).
    ``transport``: the gateway's upstream HTTP client (``serve --upstream-transport``)."""
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        tmpdir = Path(tmp)
        up_cmd = [
            sys.executable,
            "-m",
            "safetygame.bench.gateway",
            "upstream",
            "--latency",
            str(latency),
        ]
        up, up_url = start_server_process(up_cmd, tmpdir / "upstream.log")
        try:
            gw_cmd = [
                sys.executable,
                "-m",
                "safetygame.cli",
                "serve",
                "--upstream",
                up_url,
                "--port",
                "0",
                "--policy",
                policy,
                "--audit",
                f"sqlite:///{tmpdir / 'audit.sqlite3'}",
                "--upstream-concurrency",
                str(upstream_concurrency),
                "--workers",
                str(workers),
                "--upstream-transport",
                transport,
                "--log-level",
                "warning",
            ]
            gw, gw_url = start_server_process(gw_cmd, tmpdir / "gateway.log")
            try:
                asyncio.run(_load(gw_url, warmup, concurrency))
                http_before = httpx.get(f"{up_url}/stats").json()["requests"]
                cpu_before = (_tree_cpu_s(gw.pid), _cpu_s(up.pid))
                timings, codes, wall = asyncio.run(_load(gw_url, requests, concurrency))
                cpu_after = (_tree_cpu_s(gw.pid), _cpu_s(up.pid))
                http_after = httpx.get(f"{up_url}/stats").json()["requests"]
            finally:
                stop_server_process(gw)
        finally:
            stop_server_process(up)
    rounds = upstream_rounds(policy)
    if not timings:
        raise RuntimeError(f"no successful requests (status codes {sorted(set(codes))})")
    total = np.array([t["total"] for t in timings])
    upstream = np.array([t["upstream"] for t in timings])
    overhead = np.array([t["gateway"] for t in timings])
    audit = np.array([t["audit"] for t in timings])
    vs_ideal = total - rounds * latency
    client = np.array([t["client"] for t in timings])
    statuses: dict[str, int] = {}
    for c in codes:
        statuses[str(c)] = statuses.get(str(c), 0) + 1
    ms = 1000.0
    return GatewayBenchResult(
        p50_ms=float(np.percentile(overhead, 50) * ms),
        p99_ms=float(np.percentile(overhead, 99) * ms),
        mean_ms=float(overhead.mean() * ms),
        no_audit_p50_ms=float(np.percentile(overhead - audit, 50) * ms),
        no_audit_p99_ms=float(np.percentile(overhead - audit, 99) * ms),
        audit_p50_ms=float(np.percentile(audit, 50) * ms),
        vs_ideal_p50_ms=float(np.percentile(vs_ideal, 50) * ms),
        vs_ideal_p99_ms=float(np.percentile(vs_ideal, 99) * ms),
        client_p50_ms=float(np.percentile(client, 50) * ms),
        client_p99_ms=float(np.percentile(client, 99) * ms),
        gateway_p50_ms=float(np.percentile(total, 50) * ms),
        upstream_p50_ms=float(np.percentile(upstream, 50) * ms),
        requests=requests,
        ok=len(timings),
        concurrency=concurrency,
        upstream_latency_ms=latency * ms,
        upstream_rounds=rounds,
        upstream_http_per_request=(http_after - http_before) / max(len(codes), 1),
        gateway_cpu_ms_per_request=(cpu_after[0] - cpu_before[0]) / max(len(codes), 1) * ms,
        upstream_cpu_ms_per_request=(cpu_after[1] - cpu_before[1]) / max(len(codes), 1) * ms,
        throughput_rps=len(codes) / wall,
        wall_s=wall,
        workers=workers,
        statuses=statuses,
        transport=transport,
    )


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields after the command name of a /proc/PID/stat file, or None if it is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc), else NaN."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and fields[1] == str(pid):
            out.add(int(stat.parent.name))
    return out


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its child processes (the workers of ``serve --workers``)."""
    return _cpu_s(pid) + sum(_cpu_s(child) for child in child_pids(pid))


# -- ``python -m safetygame.bench.gateway upstream``: the upstream as a subprocess ----------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safetygame.bench.gateway")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upstream", help="serve the fixed-latency loopback upstream")
    u.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    u.add_argument("--port", type=int, default=0)
    u.add_argument("--fault", choices=["garbage", "http500", "wrong_shape", "hang"])
    args = ap.parse_args(argv)

    async def serve() -> None:
        up = LoopbackUpstream(args.latency, port=args.port, fault=args.fault)
        await up.start()
        print(up.url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await up.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
