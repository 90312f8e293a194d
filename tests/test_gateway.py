"""Gateway unit and integration tests: schemas, auth, audit, metrics, reload, faults.

Pure request-handling logic runs against ``DeterministicBackendDouble`` (a test double that
answers without a model). Fault tests run the real ``OpenAICompatBackend`` against real
loopback HTTP peers that misbehave on purpose (``LoopbackUpstream`` fault modes). The real
model runs in tests/test_gateway_openai.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from safetygame.agent import Status
from safetygame.backends.base import Backend, Completion, LogLik, Message, SamplingConfig, YesNo
from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.bench.gateway import LoopbackUpstream, upstream_in_thread
from safetygame.errors import BackendError, ConfigError
from safetygame.gateway.app import GatewaySettings, create_app
from safetygame.gateway.audit import SQLiteAuditStore, export_records, open_store
from safetygame.gateway.auth import KeyRing, TenantsConfig, bearer_token, hash_key, load_tenants
from safetygame.gateway.metrics import GatewayMetrics
from safetygame.gateway.schemas import FAILURE_REASONS
from safetygame.policy import load_policy, policy_yaml

SECRET = "my-secret-prompt-7f3a"


class DeterministicBackendDouble(Backend):
    """Test double: fixed candidate texts, P(yes) from a hash of the probe prompt."""

    model_id = "double@0"
    max_concurrency = 64

    def __init__(self, fail_sample: bool = False) -> None:
        self.fail_sample = fail_sample

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        if self.fail_sample:
            raise BackendError("double: sampling failed on purpose")
        return [Completion(f"Candidate answer {i}.", completion_tokens=3) for i in range(n)]

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        text = messages[-1].content
        return YesNo(0.05 + 0.9 * (zlib.crc32(text.encode()) % 1000) / 1000, "logprobs", 1.0)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        return LogLik(-1.0, 1)


def chat_body(content: str = "How do I descale a kettle?", **extra: Any) -> dict[str, Any]:
    return {"model": "safetygame", "messages": [{"role": "user", "content": content}], **extra}


def write_policy(path: Path, version: str, budget: float = 0.1, n: int = 2) -> Path:
    data = load_policy().model_dump(mode="json")
    data["version"] = version
    data["game"]["budget"] = budget
    data["sampling"]["n"] = n
    path.write_text(yaml.safe_dump(data))
    return path


class Client:
    """An app, its lifespan and an httpx client over ASGI."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://gateway",
        )

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway


async def _client(app: Any) -> AsyncIterator[Client]:
    async with app.router.lifespan_context(app):
        c = Client(app)
        try:
            yield c
        finally:
            await c.http.aclose()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    app = create_app(
        DeterministicBackendDouble(),
        GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}", reload_interval=0.1),
    )
    async for c in _client(app):
        yield c


# -- responses ---------------------------------------------------------------------------------


async def test_chat_completion_shape_and_durable_audit(client: Client, tmp_path: Path) -> None:
    r = await client.http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and body["choices"][0]["finish_reason"] == "stop"
    sg = body["safetygame"]
    assert sg["status"] == "ok" and sg["policy_id"] == "default"
    assert len(sg["strategy"]) == 5 and abs(sum(sg["strategy"]) - 1) < 1e-6
    assert sg["budget"]["harm"] == pytest.approx(0.1)
    assert r.headers["x-safetygame-status"] == "ok"
    assert "upstream;dur=" in r.headers["server-timing"]
    # The record is committed before the response: a fresh connection already sees it.
    db = sqlite3.connect(tmp_path / "audit.db")
    (raw,) = db.execute(
        "SELECT record FROM decisions WHERE request_id = ?", (r.headers["x-request-id"],)
    ).fetchone()
    rec = json.loads(raw)
    assert rec["chosen_text"] == msg["content"]
    assert rec["policy_digest"] == load_policy().digest
    assert rec["tenant"] == "default" and len(rec["candidates"]) == 5
    assert rec["candidates"][sg["chosen_index"]]["text"] == msg["content"]


async def test_stream_sends_the_decided_answer_as_sse(client: Client) -> None:
    r = await client.http.post(
        "/v1/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}, seed=3),
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["safetygame"]["status"] == "ok"
    assert chunks[-1]["usage"]["completion_tokens"] >= 0
    rec = (await client.http.get("/v1/safetygame/decisions?limit=1")).json()["data"][0]
    assert rec["request_id"] == r.headers["x-request-id"] and rec["stream"] is True
    assert text == rec["chosen_text"]


async def test_request_may_lower_budget_never_raise(client: Client) -> None:
    r = await client.http.post("/v1/chat/completions", json=chat_body(safetygame={"budget": 0.02}))
    assert r.status_code == 200
    assert r.json()["safetygame"]["budget"]["harm"] == pytest.approx(0.02)
    assert r.json()["safetygame"]["expected_risk"]["harm"] <= 0.02 + 1e-9
    r = await client.http.post("/v1/chat/completions", json=chat_body(safetygame={"budget": 0.5}))
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "safetygame.budget" and "never raise" in err["message"]


# -- bad input ---------------------------------------------------------------------------------


async def test_malformed_json_is_400(client: Client) -> None:
    r = await client.http.post(
        "/v1/chat/completions",
        content=b'{"model": "safetygame", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_validation_errors_name_fields_never_the_prompt(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = {
        "model": "safetygame",
        "messages": [{"role": "user", "content": SECRET}, {"role": "wizard", "content": SECRET}],
        "safetygame": {"budget": "lots", "note": SECRET},
    }
    r = await client.http.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[1].role"
    assert "safetygame.budget" in err["message"] and "safetygame.note" in err["message"]
    assert SECRET not in r.text
    assert SECRET not in caplog.text
    # A good request's prompt does not reach the logs either.
    ok = await client.http.post("/v1/chat/completions", json=chat_body(SECRET))
    assert ok.status_code == 200 and SECRET not in caplog.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(n=2), "n"),
        (chat_body(tools=[{"type": "function"}]), "tools"),
        ({"model": "safetygame", "messages": []}, "messages"),
        ({"model": "safetygame", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
async def test_unsupported_or_missing_fields_are_400(
    client: Client, body: dict[str, Any], param: str
) -> None:
    r = await client.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


async def test_unknown_model_is_404(client: Client) -> None:
    r = await client.http.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_request_size_limit_is_413(client: Client) -> None:
    big = chat_body("x" * 1_100_000)
    r = await client.http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(200):
            yield b" " * 10_000

    r = await client.http.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413


async def test_models_health_and_unknown_route(client: Client) -> None:
    models = (await client.http.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["safetygame"]
    assert (await client.http.get("/healthz")).json()["status"] == "ok"
    r = await client.http.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


# -- metrics -----------------------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_metrics_count_requests_refusals_latency(client: Client) -> None:
    for _ in range(3):
        await client.http.post("/v1/chat/completions", json=chat_body())
    await client.http.post("/v1/chat/completions", json=chat_body(safetygame={"budget": 0.0}))
    await client.http.post("/v1/chat/completions", content=b"{")
    r = await client.http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(r.text)
    assert m['safetygame_requests_total{tenant="default",code="200"}'] == 4
    assert m['safetygame_requests_total{tenant="default",code="400"}'] == 1
    assert m['safetygame_decision_latency_seconds_count{tenant="default"}'] == 4
    assert m['safetygame_decision_latency_seconds_bucket{tenant="default",le="+Inf"}'] == 4
    decided = sum(v for k, v in m.items() if k.startswith("safetygame_decisions_total"))
    assert decided == 4
    refusals = sum(v for k, v in m.items() if k.startswith("safetygame_refusals_total"))
    answers = sum(
        v for k, v in m.items() if k.startswith("safetygame_decisions_total") and "answer" in k
    )
    assert refusals + answers == 4
    # Default policy: 4 samples + the refusal, each probed for helpfulness and harm.
    assert m['safetygame_upstream_calls_total{operation="sample"}'] == 4
    assert m['safetygame_upstream_calls_total{operation="yes_no"}'] == 4 * 5 * 2


def test_histogram_buckets_are_cumulative() -> None:
    m = GatewayMetrics()
    for v in (0.004, 0.5, 0.5, 100.0):
        m.latency.observe(v, tenant="t")
    lines = m.render().splitlines()
    name = "safetygame_decision_latency_seconds"
    assert f'{name}_bucket{{tenant="t",le="0.005"}} 1' in lines
    assert f'{name}_bucket{{tenant="t",le="0.5"}} 3' in lines
    assert f'{name}_bucket{{tenant="t",le="1"}} 3' in lines
    assert f'{name}_bucket{{tenant="t",le="+Inf"}} 4' in lines
    assert f'{name}_count{{tenant="t"}} 4' in lines and f'{name}_sum{{tenant="t"}} 101.004' in lines
    assert "safetygame_requests_in_flight 0" in lines and "_created" not in m.render()


# -- auth and tenants --------------------------------------------------------------------------


def write_tenants(tmp_path: Path, policies: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    keys = {name: f"sg-test-key-{name}-{'x' * 32}" for name in policies}
    data = {
        "tenants": {
            name: {"policy": str(pol.name), "keys": [hash_key(keys[name])]}
            for name, pol in policies.items()
        }
    }
    path = tmp_path / "tenants.yml"
    path.write_text(yaml.safe_dump(data))
    return path, keys


@pytest.fixture
async def tenant_client(tmp_path: Path) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    pa = write_policy(tmp_path / "acme.yml", "acme-1", budget=0.2)
    pb = write_policy(tmp_path / "globex.yml", "globex-1", budget=0.05)
    tenants, keys = write_tenants(tmp_path, {"acme": pa, "globex": pb})
    settings = GatewaySettings(
        tenants_file=tenants, audit_url=f"sqlite:///{tmp_path / 'audit.db'}", reload_interval=0.1
    )
    async for c in _client(create_app(DeterministicBackendDouble(), settings)):
        yield c, keys


async def test_auth_required_when_keys_configured(
    tenant_client: tuple[Client, dict[str, str]],
) -> None:
    client, keys = tenant_client
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": keys["acme"]}):
        r = await client.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert (await client.http.get("/v1/models")).status_code == 401
    assert (await client.http.get("/v1/safetygame/decisions")).status_code == 401
    ok = await client.http.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={"authorization": f"Bearer {keys['acme']}"},
    )
    assert ok.status_code == 200
    assert ok.json()["safetygame"]["policy_version"] == "acme-1"


async def test_tenant_policies_and_scoped_audit(
    tenant_client: tuple[Client, dict[str, str]],
) -> None:
    client, keys = tenant_client
    auth = {t: {"authorization": f"Bearer {k}"} for t, k in keys.items()}
    ids: dict[str, set[str]] = {"acme": set(), "globex": set()}
    for tenant in ("acme", "globex", "acme"):
        r = await client.http.post("/v1/chat/completions", json=chat_body(), headers=auth[tenant])
        assert r.status_code == 200
        assert r.json()["safetygame"]["policy_version"] == f"{tenant}-1"
        ids[tenant].add(r.headers["x-request-id"])
    for tenant in ids:
        r = await client.http.get("/v1/safetygame/decisions?limit=50", headers=auth[tenant])
        recs = r.json()["data"]
        assert {rec["request_id"] for rec in recs} == ids[tenant]
        assert {rec["tenant"] for rec in recs} == {tenant}
    r = await client.http.get("/v1/safetygame/decisions?limit=0", headers=auth["acme"])
    assert r.status_code == 400


def test_keyring_and_tenants_file_validation(tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "p.yml", "1")
    path, keys = write_tenants(tmp_path, {"a": pol, "b": pol})
    config = load_tenants(path)
    ring = KeyRing(config)
    assert ring.tenant_for(keys["a"]) == "a" and ring.tenant_for(keys["b"]) == "b"
    assert ring.tenant_for("nope") is None and ring.tenant_for(None) is None
    assert KeyRing(TenantsConfig.single("default")).tenant_for(None) == "default"
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Basic abc") is None
    assert "sg-test-key" not in path.read_text()  # only hashes are stored
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"tenants": {"a": {"policy": "p.yml", "keys": ["plaintext"]}}}))
    with pytest.raises(ConfigError, match=r"tenants\.a\.keys\[0\]"):
        load_tenants(bad)
    dup_hash = hash_key("same")
    bad.write_text(
        yaml.safe_dump({"tenants": {"a": {"keys": [dup_hash]}, "b": {"keys": [dup_hash]}}})
    )
    with pytest.raises(ConfigError, match="also a key of tenant"):
        load_tenants(bad)
    # a tenant written twice: YAML would keep the second silently, and the first's keys die
    bad.write_text(f"tenants:\n  a:\n    keys: ['{dup_hash}']\n  a:\n    keys: []\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'a' \(first at line 2\)"):
        load_tenants(bad)


# -- hot reload --------------------------------------------------------------------------------


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_policy_hot_reload_and_bad_file_keeps_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pol = write_policy(tmp_path / "policy.yml", "v1")
    settings = GatewaySettings(
        policy=str(pol), audit_url=f"sqlite:///{tmp_path / 'a.db'}", reload_interval=0.05
    )
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        tenants = client.gateway.tenants

        async def version(client: Client = client) -> str:
            r = await client.http.post("/v1/chat/completions", json=chat_body())
            return str(r.json()["safetygame"]["policy_version"])

        assert await version() == "v1"
        write_policy(pol, "v2", budget=0.05)
        await wait_for(lambda t=tenants: t.runtimes["default"].policy.version == "v2")
        assert await version() == "v2"
        # An invalid file: rejected with the field named, the old policy keeps serving.
        caplog.set_level(logging.WARNING, logger="safetygame.gateway")
        data = yaml.safe_load(pol.read_text())
        data["game"]["budget"] = 7.0
        pol.write_text(yaml.safe_dump(data))
        await wait_for(lambda: "policy change rejected" in caplog.text)
        assert "game.budget" in caplog.text
        assert await version() == "v2"
        pol.write_text("id: [unclosed")
        await wait_for(lambda: "not valid YAML" in caplog.text)
        assert await version() == "v2"
        m = parse_prometheus((await client.http.get("/metrics")).text)
        assert m['safetygame_policy_reloads_total{tenant="default",result="rejected"}'] == 2
        assert m['safetygame_policy_reloads_total{tenant="default",result="ok"}'] == 1


async def test_a_slow_reload_does_not_block_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetygame.gateway.runtime as runtime_mod

    real = runtime_mod.load_policy
    started: list[float] = []
    gaps: list[float] = []

    def slow_load(ref: Any) -> Any:  # a reload that blocks for a second (a big model)
        started.append(time.monotonic())
        time.sleep(1.0)
        return real(ref)

    async def heartbeat() -> None:  # how long the loop goes without running us
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    pol = write_policy(tmp_path / "policy.yml", "v1")
    settings = GatewaySettings(
        policy=str(pol), audit_url=f"sqlite:///{tmp_path / 'a.db'}", reload_interval=0.05
    )
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        monkeypatch.setattr(runtime_mod, "load_policy", slow_load)
        beat = asyncio.create_task(heartbeat())
        write_policy(pol, "v2")
        tenants = client.gateway.tenants
        await wait_for(lambda t=tenants: t.runtimes["default"].policy.version == "v2")
        beat.cancel()
        assert started and max(gaps) < 0.5, max(gaps)
        assert (await client.http.get("/healthz")).status_code == 200


def test_bad_policy_at_startup_is_a_config_error(tmp_path: Path) -> None:
    pol = tmp_path / "p.yml"
    pol.write_text(policy_yaml(load_policy()).replace("budget: 0.1", "budget: -1"))
    with pytest.raises(ConfigError, match=r"game\.budget"):
        create_app(DeterministicBackendDouble(), GatewaySettings(policy=str(pol)))


# -- audit store -------------------------------------------------------------------------------


def _record(i: int, tenant: str = "t", created: float | None = None) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "decision_id": f"d{i}",
        "tenant": tenant,
        "created": created if created is not None else time.time(),
        "status": "ok",
        "action": "answer",
        "policy_version": "1",
        "policy_digest": "abc",
        "n": i,
    }


async def test_sqlite_group_commit_no_loss_no_duplicates(tmp_path: Path) -> None:
    store = SQLiteAuditStore(tmp_path / "a.db")
    await store.start()
    try:
        await asyncio.gather(*(store.write(_record(i, f"t{i % 2}")) for i in range(300)))
        await store.write(_record(5, "t1"))  # a retried write: ignored, not duplicated
        recent = await store.recent("t0", limit=1000)
        assert sorted(r["n"] for r in recent) == list(range(0, 300, 2))
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "a.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM decisions").fetchone() == (
        300,
        300,
    )


class FailingAuditStoreDouble(SQLiteAuditStore):
    """Test double: every commit fails (a full disk, a lost database)."""

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        raise OSError("disk full (test double)")


async def test_unrecorded_decision_is_never_sent(tmp_path: Path) -> None:
    store = FailingAuditStoreDouble(tmp_path / "a.db")
    app = create_app(DeterministicBackendDouble(), GatewaySettings(), audit=store)
    async for client in _client(app):
        r = await client.http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert "choices" not in r.json()


def test_audit_export_cli(tmp_path: Path) -> None:
    from safetygame.cli import main

    async def fill() -> None:
        store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
        await store.start()
        for i, created in enumerate([1_700_000_000.0, 1_800_000_000.0, 1_800_000_100.0]):
            await store.write(_record(i, created=created))
        await store.close()

    asyncio.run(fill())
    url = f"sqlite:///{tmp_path / 'a.db'}"
    runner = CliRunner()
    res = runner.invoke(main, ["audit", "export", "--db", url, "--since", "2027-01-01T00:00:00"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert [r["request_id"] for r in lines] == ["r1", "r2"]
    res = runner.invoke(main, ["audit", "export", "--db", url, "--since", "1800000050", "--json"])
    assert [r["request_id"] for r in json.loads(res.output)] == ["r2"]
    res = runner.invoke(main, ["audit", "export", "--db", url, "--since", "yesterday"])
    assert res.exit_code == 2 and "--since" in res.output
    assert list(export_records(url)) and len(list(export_records(url))) == 3


# -- faults: real HTTP peers that misbehave -----------------------------------------------------


@pytest.mark.parametrize("fault", ["http500", "garbage", "wrong_shape"])
async def test_misbehaving_upstream_fails_safe(tmp_path: Path, fault: str) -> None:
    with upstream_in_thread(latency=0.0, fault=fault) as up:  # type: ignore[arg-type]
        await _expect_fail_safe(tmp_path, up.url, {"generation_failed", "scoring_failed"})


async def test_upstream_down_fails_safe(tmp_path: Path) -> None:
    up = LoopbackUpstream()
    await up.start()
    url = up.url
    await up.stop()  # nothing listens there any more
    await _expect_fail_safe(tmp_path, url, {"generation_failed"})


async def test_slow_upstream_times_out_safe(tmp_path: Path) -> None:
    with upstream_in_thread(latency=0.0, fault="hang") as up:
        t = time.monotonic()
        await _expect_fail_safe(tmp_path, up.url, {"timeout"}, decision_timeout=0.5)
        assert time.monotonic() - t < 5


async def _expect_fail_safe(
    tmp_path: Path, url: str, statuses: set[str], decision_timeout: float = 10.0
) -> None:
    backend = OpenAICompatBackend(url, max_retries=0, timeout=5)
    settings = GatewaySettings(
        audit_url=f"sqlite:///{tmp_path / 'a.db'}", decision_timeout=decision_timeout
    )
    try:
        async for client in _client(create_app(backend, settings)):
            r = await client.http.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 200
            sg = r.json()["safetygame"]
            assert sg["status"] in statuses and sg["action"] == "refuse"
            assert r.headers["x-safetygame-status"] == sg["status"]
            assert r.json()["choices"][0]["message"]["content"] == load_policy().refusal
            # The client gets a stable code and a generic message: no upstream URL or text.
            code, message = FAILURE_REASONS[Status(sg["status"])]
            assert sg["reason_code"] == code and sg["reason"] == message
            host_port = url.removeprefix("http://").split("/")[0]
            assert host_port not in r.text and "127.0.0.1" not in r.text
            # Recorded like any decision, with the full reason.
            rec = (await client.http.get("/v1/safetygame/decisions")).json()["data"][0]
            assert rec["status"] == sg["status"] and rec["reason_code"] == code
            assert rec["reason"] and rec["reason"] != message
            m = parse_prometheus((await client.http.get("/metrics")).text)
            refusals = f'safetygame_refusals_total{{tenant="default",status="{sg["status"]}"}}'
            assert m[refusals] == 1
            if sg["status"] != "timeout":
                errors = sum(
                    v for k, v in m.items() if k.startswith("safetygame_upstream_errors_total")
                )
                assert errors >= 1
    finally:
        await backend.aclose()


def test_hash_key_cli_makes_a_key_that_authenticates(tmp_path: Path) -> None:
    from safetygame.cli import main

    res = CliRunner().invoke(main, ["hash-key", "--json"])
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert out["key"].startswith("sg-") and out["hash"] == hash_key(out["key"])
    pol = write_policy(tmp_path / "p.yml", "1")
    path = tmp_path / "tenants.yml"
    path.write_text(yaml.safe_dump({"tenants": {"a": {"policy": pol.name, "keys": [out["hash"]]}}}))
    assert KeyRing(load_tenants(path)).tenant_for(out["key"]) == "a"


@pytest.mark.parametrize("workers", [1, 2])
def test_bench_gateway_cli(workers: int) -> None:
    from safetygame.cli import main

    res = CliRunner().invoke(
        main,
        ["bench", "gateway", "--requests", "60", "--concurrency", "4", "--latency-ms", "1",
         "--workers", str(workers), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ok"] == 60 and out["statuses"] == {"200": 60} and out["workers"] == workers
    assert 0 <= out["no_audit_p50_ms"] <= out["p99_ms"] + out["audit_p50_ms"]
    assert out["upstream_http_per_request"] >= out["upstream_rounds"]
    assert out["gateway_cpu_ms_per_request"] > 0


def test_workers_need_a_url_upstream() -> None:
    from safetygame.cli import main

    res = CliRunner().invoke(main, ["serve", "--upstream", "embedded", "--workers", "2"])
    assert res.exit_code == 2 and "needs a URL upstream" in res.output


def test_workers_that_cannot_start_give_a_one_line_error(tmp_path: Path) -> None:
    # The audit file's folder cannot be created (a regular file stands in the way).
    blocker = tmp_path / "file"
    blocker.write_text("")
    cmd = [
        sys.executable, "-m", "safetygame.cli", "serve", "--upstream", "http://127.0.0.1:9/v1",
        "--port", "0", "--workers", "2", "--audit", f"sqlite:///{blocker / 'a.db'}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: gateway worker did not start")
    assert "_spawn" not in out.stderr  # no traceback from the supervisor itself


# -- streaming a long decision, and the candidates' length limits ------------------------------


class SlowBackendDouble(DeterministicBackendDouble):
    """Test double: sampling takes ``delay`` seconds (a decision longer than the keep-alive
    interval); records the sampling configs it was given."""

    def __init__(self, delay: float, fail_sample: bool = False) -> None:
        super().__init__(fail_sample)
        self.delay = delay
        self.configs: list[SamplingConfig] = []

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        self.configs.append(config)
        await asyncio.sleep(self.delay)
        return await super().sample(messages, n, config)


async def test_long_decision_streams_keepalives_then_the_recorded_answer(tmp_path: Path) -> None:
    app = create_app(
        SlowBackendDouble(delay=0.8),  # long enough to look inside a running late stream
        GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}", stream_keepalive=0.05),
    )
    async for c in _client(app):
        metrics = c.gateway.metrics
        post = asyncio.ensure_future(
            c.http.post("/v1/chat/completions", json=chat_body(stream=True, seed=3))
        )
        await asyncio.sleep(0.2)  # headers sent, keep-alives flowing, decision still running
        assert not post.done() and metrics.in_flight.get() == 1
        assert metrics.requests.get(tenant="default", code="200") == 0
        r = await post
        assert r.status_code == 200 and r.headers["x-safetygame-stream"] == "keepalive"
        assert metrics.in_flight.get() == 0  # out of flight once the last event went
        assert metrics.requests.get(tenant="default", code="200") == 1
        lines = [ln for ln in r.text.splitlines() if ln]
        first_data = next(i for i, ln in enumerate(lines) if ln.startswith("data: "))
        assert first_data >= 2 and set(lines[:first_data]) == {": keep-alive"}
        events = [ln[6:] for ln in lines[first_data:]]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        sg = chunks[-1]["safetygame"]
        rec = (await c.http.get("/v1/safetygame/decisions?limit=1")).json()["data"][0]
        assert rec["decision_id"] == sg["decision_id"] and text == rec["chosen_text"]

        # a mistake found after the headers went out: the OpenAI error envelope as an event
        r = await c.http.post(
            "/v1/chat/completions", json=chat_body(stream=True, safetygame={"budget": 0.9})
        )
        assert r.status_code == 400  # found before any waiting: a plain 400 still
        c.gateway.audit.write = _failing_write
        r = await c.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert r.status_code == 200 and ": keep-alive" in r.text
        err = json.loads(next(ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")))
        assert err["error"]["code"] == "audit_unavailable" and "choices" not in err
        # counted with the status its error event carried, not the 200 of its headers
        assert metrics.requests.get(tenant="default", code="503") == 1
        assert metrics.requests.get(tenant="default", code="200") == 1
        assert metrics.in_flight.get() == 0


async def _failing_write(record: dict[str, Any]) -> None:
    raise OSError("disk full (on purpose)")


async def test_request_length_limits_reach_every_candidate(tmp_path: Path) -> None:
    backend = SlowBackendDouble(delay=0.0)
    app = create_app(backend, GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}"))
    async for c in _client(app):
        body = chat_body(max_tokens=12, stop=["\n\n", "END"])
        assert (await c.http.post("/v1/chat/completions", json=body)).status_code == 200
        body = chat_body(max_completion_tokens=5, max_tokens=99, stop="END")
        assert (await c.http.post("/v1/chat/completions", json=body)).status_code == 200
        too_many = chat_body(stop=["a", "b", "c", "d", "e"])
        r = await c.http.post("/v1/chat/completions", json=too_many)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert [(cfg.max_tokens, cfg.stop) for cfg in backend.configs] == [
        (12, ("\n\n", "END")),
        (5, ("END",)),
    ]
