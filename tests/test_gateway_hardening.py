"""Issue 21 (security and reliability): what clients see of internals, the audit write under
the request deadline, inputs that used to give 500, and a property-based fuzz test of the
chat endpoint. Helpers come from tests/test_gateway.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from safetygame.agent import SafetyGame
from safetygame.backends.base import Backend
from safetygame.backends.openai_compat import OpenAICompatBackend, RetryPolicy
from safetygame.errors import ConfigError
from safetygame.gateway.app import GatewaySettings, create_app
from safetygame.gateway.auth import MIN_KEY_LENGTH, KeyRing, hash_key, load_tenants
from safetygame.policy import Policy, load_policy
from test_gateway import (
    Client,
    DeterministicBackendDouble,
    _client,
    chat_body,
    parse_prometheus,
    wait_for,
    write_policy,
    write_tenants,
)

INTERNAL = "llm-7.internal.corp"


def settings_for(tmp_path: Path, **kw: Any) -> GatewaySettings:
    return GatewaySettings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}", **kw)


def upstream_double(
    top: dict[str, float] | None = None, status: int = 200, error: str = ""
) -> httpx.MockTransport:
    """An OpenAI-compatible upstream: chat replies, yes/no log-probabilities (``top``), or an
    error ``status`` whose body names an internal host."""

    def handle(request: httpx.Request) -> httpx.Response:
        if status != 200:
            return httpx.Response(status, json={"error": {"message": error}})
        payload = json.loads(request.content)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "Use vinegar."},
            "finish_reason": "stop",
        }
        if payload.get("logprobs") and top is not None:
            entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
            choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
        body = json.dumps({"choices": [choice]}).encode()  # NaN / Infinity allowed
        return httpx.Response(200, content=body)

    return httpx.MockTransport(handle)


def backend_for(transport: httpx.MockTransport) -> OpenAICompatBackend:
    return OpenAICompatBackend(
        f"http://{INTERNAL}:8080/v1",
        transport=transport,
        retry=RetryPolicy(max_retries=0),
    )


def audited(db: Path, request_id: str) -> bool:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT 1 FROM decisions WHERE request_id = ?", (request_id,))
        return row.fetchone() is not None
    finally:
        conn.close()


# -- 2. internal details ------------------------------------------------------------------------


async def test_upstream_400_body_is_not_relayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="safetygame.gateway")
    error = f"prompt too long for {INTERNAL}:9000 (slot 3)"
    backend = backend_for(upstream_double(status=400, error=error))
    async for client in _client(create_app(backend, settings_for(tmp_path))):
        r = await client.http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "upstream_rejected_request" and err["type"] == "invalid_request_error"
        assert INTERNAL not in r.text and "slot 3" not in r.text
        assert INTERNAL in caplog.text  # the detail is in the server log


async def test_healthz_does_not_show_the_upstream(tmp_path: Path) -> None:
    backend = backend_for(upstream_double())
    async for client in _client(create_app(backend, settings_for(tmp_path))):
        r = await client.http.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert INTERNAL not in r.text and "8080" not in r.text
        assert r.json()["audit"] == "sqlite" and r.json()["audit_state"] == "ok"


# -- 3. the audit write under the request deadline -----------------------------------------------


async def test_locked_audit_store_gives_503_by_the_deadline(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, decision_timeout=1.0)  # audit reserve 0.5 s
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        gw = client.gateway
        lock = sqlite3.connect(tmp_path / "audit.db", isolation_level=None, timeout=1)
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (45 s in #21)
        try:
            t = time.monotonic()
            task = asyncio.create_task(client.http.post("/v1/chat/completions", json=chat_body()))
            await asyncio.sleep(0.75)  # decided at once; the write waits for the lock
            assert gw.metrics.in_flight.get() == 1  # the audit wait counts as in flight
            h = await client.http.get("/healthz")
            assert h.status_code == 503 and h.json()["status"] == "degraded"
            assert h.json()["audit_state"] == "stalled" and h.json()["audit_pending"] >= 1
            r = await task
            elapsed = time.monotonic() - t
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert "choices" not in r.json()  # nothing acknowledged
            assert elapsed < 2.0, elapsed  # --timeout 1 s bounds the whole request
            assert gw.metrics.in_flight.get() == 0
            m = parse_prometheus((await client.http.get("/metrics")).text)
            assert m["safetygame_audit_errors_total"] == 1
            assert m['safetygame_requests_total{tenant="default",code="503"}'] == 1
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await wait_for(lambda gw=gw: gw.audit.health(0.5)["state"] == "ok")
        assert (await client.http.get("/healthz")).status_code == 200


async def test_failing_audit_store_shows_in_healthz(tmp_path: Path) -> None:
    from test_gateway import FailingAuditStoreDouble

    store = FailingAuditStoreDouble(tmp_path / "a.db")
    app = create_app(DeterministicBackendDouble(), GatewaySettings(), audit=store)
    async for client in _client(app):
        assert (await client.http.get("/healthz")).json()["audit_state"] == "ok"
        r = await client.http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 503
        h = await client.http.get("/healthz")
        assert h.status_code == 503 and h.json()["audit_state"] == "failing"
        assert "disk full" not in h.text  # the class name at most, never the message


async def test_slow_body_is_408_within_the_deadline(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, decision_timeout=1.0)
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):

        async def slow() -> AsyncIterator[bytes]:
            yield b'{"model": "safetygame", '
            await asyncio.sleep(3)
            yield b"}"

        t = time.monotonic()
        r = await client.http.post("/v1/chat/completions", content=slow())
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t < 2.0


# -- 4. inputs that gave 500 -----------------------------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async for c in _client(create_app(DeterministicBackendDouble(), settings_for(tmp_path))):
        yield c


async def assert_counted(client: Client, code: int) -> None:
    m = parse_prometheus((await client.http.get("/metrics")).text)
    assert m[f'safetygame_requests_total{{tenant="default",code="{code}"}}'] >= 1


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
async def test_any_openai_seed_is_answered_and_audited(
    client: Client, tmp_path: Path, seed: int
) -> None:
    for body in (chat_body(seed=seed), chat_body(safetygame={"seed": seed})):
        r = await client.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert audited(tmp_path / "audit.db", r.headers["x-request-id"])


async def test_deeply_nested_json_is_400(client: Client) -> None:
    for depth in (100_000, 900):
        body = b'{"model": "safetygame", "x": ' + b"[" * depth + b"]" * depth + b"}"
        r = await client.http.post("/v1/chat/completions", content=body)
        assert r.status_code == 400, (depth, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error"
    await assert_counted(client, 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            b'{"model": "safetygame", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages[0].content",
        ),
        (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            b'{"model": "safetygame", "messages": [{"role": "user", "content": "x"}], '
            b'"\\ud83d": 1}',
            "<root>",
        ),
        # raw surrogate bytes (CESU-8), which json.loads(bytes) would let through
        (
            b'{"model": "safetygame", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
            None,
        ),
    ],
)
async def test_lone_surrogates_are_400(client: Client, body: bytes, param: str | None) -> None:
    r = await client.http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    # A valid surrogate pair (an emoji) is fine.
    ok = b'{"model": "safetygame", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert (await client.http.post("/v1/chat/completions", content=ok)).status_code == 200


async def test_huge_integer_literal_is_400(client: Client) -> None:
    body = b'{"model": "safetygame", "seed": ' + b"9" * 5000 + b"}"
    r = await client.http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("logprob", [1000.0, 0.5, float("inf"), float("nan")])
async def test_impossible_upstream_logprob_is_a_fail_safe_refusal(
    tmp_path: Path, logprob: float
) -> None:
    backend = backend_for(upstream_double(top={"Yes": -0.1, "No": logprob}))
    async for client in _client(create_app(backend, settings_for(tmp_path))):
        r = await client.http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 200, r.text
        sg = r.json()["safetygame"]
        assert sg["status"] == "scoring_failed" and sg["action"] == "refuse"
        assert r.json()["choices"][0]["message"]["content"] == load_policy().refusal
        assert audited(tmp_path / "audit.db", r.headers["x-request-id"])


async def test_tenant_removed_while_its_body_uploads_is_401(tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "p.yml", "1")
    tenants, keys = write_tenants(tmp_path, {"acme": pol, "globex": pol})
    settings = settings_for(tmp_path, tenants_file=tenants, reload_interval=3600)
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        gw = client.gateway
        body = json.dumps(chat_body()).encode()

        async def upload(gw: Any = gw, body: bytes = body) -> AsyncIterator[bytes]:
            yield body[:10]
            # acme leaves the tenants file mid-upload (a hot reload)
            data = yaml.safe_load(tenants.read_text())
            del data["tenants"]["acme"]
            tenants.write_text(yaml.safe_dump(data))
            gw.tenants.check()  # sees the change
            gw.tenants.check()  # the file has settled: reloaded
            assert "acme" not in gw.tenants.runtimes
            yield body[10:]

        r = await client.http.post(
            "/v1/chat/completions",
            content=upload(),
            headers={"authorization": f"Bearer {keys['acme']}"},
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


class CrashingAgent(SafetyGame):
    async def arespond(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"bug that quotes the prompt: {args[0]}")


async def test_500_is_counted_and_logged_without_the_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def factory(backend: Backend, policy: Policy) -> SafetyGame:
        return CrashingAgent(backend, policy)

    app = create_app(DeterministicBackendDouble(), settings_for(tmp_path), agent_factory=factory)
    async for client in _client(app):
        r = await client.http.post("/v1/chat/completions", json=chat_body("secret-prompt-42"))
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "Internal error.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
        assert r.headers["x-request-id"]
        m = parse_prometheus((await client.http.get("/metrics")).text)
        assert m['safetygame_requests_total{tenant="default",code="500"}'] == 1
        assert m["safetygame_requests_in_flight"] == 0
        assert "RuntimeError" in caplog.text and "secret-prompt-42" not in caplog.text


# -- 4. property-based fuzzing of the request schema ----------------------------------------------

JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=()), max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates included
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | JUNK,
        "content": TEXT | st.lists(PART, max_size=2) | JUNK,
    },
    optional={"name": TEXT | JUNK, "extra": JUNK},
)
USER = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT})
VALID_USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)})
NUMBER = st.integers() | st.floats(allow_nan=True, allow_infinity=True)
REQUEST = st.fixed_dictionaries(
    {
        "model": st.just("safetygame") | TEXT,
        "messages": st.builds(lambda a, b: a + b, st.lists(MESSAGE, max_size=2), st.lists(USER)),
    },
    optional={
        "stream": st.booleans() | JUNK,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JUNK,
        "seed": st.integers() | JUNK,
        "n": st.integers(-1, 3),
        "temperature": NUMBER,
        "top_p": NUMBER,
        "max_tokens": NUMBER,
        "user": TEXT | JUNK,
        "tools": JUNK,
        "safetygame": st.fixed_dictionaries({}, optional={"budget": NUMBER, "seed": NUMBER}) | JUNK,
        "unknown": JUNK,
    },
)


PLAIN = st.text(max_size=20)  # no surrogates
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": PLAIN})
VALID_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": PLAIN | st.lists(TEXT_PART),
    }
)
VALID = st.fixed_dictionaries(
    {
        "model": st.just("safetygame"),
        "messages": st.builds(
            lambda a, b: [*a, b], st.lists(VALID_MESSAGE, max_size=2), USER | VALID_USER
        ),
    },
    optional={
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "seed": st.integers(),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "max_tokens": st.integers(1, 10**6),
        "user": PLAIN,
        "safetygame": st.fixed_dictionaries(
            {}, optional={"budget": st.floats(0, 0.1), "seed": st.integers()}
        ),
    },
)


def encode(body: Any, ascii_only: bool) -> bytes:
    text = json.dumps(body, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def test_fuzzed_requests_never_give_5xx_and_every_200_is_audited(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    app = create_app(DeterministicBackendDouble(), settings_for(tmp_path))
    with TestClient(app, raise_server_exceptions=False) as http:
        statuses: dict[int, int] = {}

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(body=VALID | REQUEST | JUNK, ascii_only=st.booleans())
        def check(body: Any, ascii_only: bool) -> None:
            r = http.post(
                "/v1/chat/completions",
                content=encode(body, ascii_only),
                headers={"content-type": "application/json"},
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.status_code, r.text)
            if r.status_code == 200:
                assert audited(db, r.headers["x-request-id"])
            else:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        check()
        assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 10, statuses
        m = parse_prometheus(http.get("/metrics").text)
        assert not any('code="5' in k for k in m), m


# -- 6. smaller items ------------------------------------------------------------------------


async def test_decisions_page_is_capped_in_bytes(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_body_bytes=10_000, max_decisions_bytes=20_000)
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        for i in range(12):
            r = await client.http.post("/v1/chat/completions", json=chat_body(f"{i} " + "x" * 3000))
            assert r.status_code == 200
        r = await client.http.get("/v1/safetygame/decisions?limit=50")
        body = r.json()
        assert body["truncated"] is True and 0 < len(body["data"]) < 12
        assert len(json.dumps(body["data"], ensure_ascii=False).encode()) <= 20_000
        r = await client.http.get("/v1/safetygame/decisions?limit=2")
        assert r.json()["truncated"] is False and len(r.json()["data"]) == 2
    with pytest.raises(ConfigError, match="max_decisions_bytes"):
        GatewaySettings(max_decisions_bytes=100)


async def test_non_utf8_policy_is_a_rejected_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pol = write_policy(tmp_path / "policy.yml", "v1")
    settings = settings_for(tmp_path, policy=str(pol), reload_interval=0.05)
    async for client in _client(create_app(DeterministicBackendDouble(), settings)):
        caplog.set_level(logging.WARNING, logger="safetygame.gateway")
        pol.write_bytes(b"id: caf\xe9\nversion: '2'\n")  # Latin-1, not UTF-8
        await wait_for(lambda: "policy change rejected" in caplog.text)
        assert "not UTF-8" in caplog.text and "unexpected error" not in caplog.text
        m = parse_prometheus((await client.http.get("/metrics")).text)
        assert m['safetygame_policy_reloads_total{tenant="default",result="rejected"}'] == 1
        r = await client.http.post("/v1/chat/completions", json=chat_body())
        assert r.json()["safetygame"]["policy_version"] == "v1"
    bad = tmp_path / "tenants.yml"
    bad.write_bytes(b"tenants:\n  caf\xe9: {}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_tenants(bad)


def test_short_keys_are_refused(tmp_path: Path) -> None:
    from safetygame.cli import main

    short = "k" * (MIN_KEY_LENGTH - 1)
    res = CliRunner().invoke(main, ["hash-key", short])
    assert res.exit_code == 2 and str(MIN_KEY_LENGTH) in res.output
    res = CliRunner().invoke(main, ["hash-key", "k" * MIN_KEY_LENGTH, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["hash"] == hash_key("k" * MIN_KEY_LENGTH)
    # A short key whose hash sits in a tenants file never authenticates.
    path = tmp_path / "tenants.yml"
    path.write_text(yaml.safe_dump({"tenants": {"a": {"keys": [hash_key(short)]}}}))
    assert KeyRing(load_tenants(path)).tenant_for(short) is None


async def test_dashboard_cannot_be_framed(client: Client) -> None:
    csp = (await client.http.get("/")).headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
