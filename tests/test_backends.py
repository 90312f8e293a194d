"""Backends: a contract run against real llama.cpp, plus unit tests of the HTTP logic.

The contract (``BackendContractTests``) runs on SmolLM2-135M twice: embedded in-process, and
through ``OpenAICompatBackend`` against a llama.cpp server subprocess on loopback. Unit tests
of retries and error mapping use ``httpx.MockTransport`` with scripted test doubles.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from safetygame.backends.base import Backend, Message, SamplingConfig, yes_no_from_top_logprobs
from safetygame.backends.llamacpp import EmbeddedLlamaBackend
from safetygame.backends.llamacpp import main as llamacpp_main
from safetygame.backends.openai_compat import OpenAICompatBackend, RetryPolicy, parse_retry_after
from safetygame.errors import (
    BackendError,
    BackendProtocolError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnsupported,
    ConfigError,
)

YES_NO_QUESTION = [Message("user", "Is Paris the capital of France? Answer Yes or No.")]
PREFILL = [
    Message("user", "Complete the sentence: The capital of France is"),
    Message("assistant", "The capital of France is"),
]


# -- the contract, on real llama.cpp -------------------------------------------------------


class BackendContractTests:
    """What every Backend must do. Subclasses provide the ``backend`` fixture."""

    async def test_sample_returns_n_texts_within_max_tokens(self, backend: Backend) -> None:
        config = SamplingConfig(temperature=0.8, max_tokens=8, seed=7)
        out = await backend.sample([Message("user", "Name a fruit.")], 3, config)
        assert len(out) == 3
        for c in out:
            assert c.text.strip()
            assert 1 <= c.completion_tokens <= 8
            assert c.prompt_tokens > 0
            assert c.finish_reason in ("stop", "length")

    async def test_max_tokens_cuts_long_answers(self, backend: Backend) -> None:
        config = SamplingConfig(temperature=0.0, max_tokens=3)
        (c,) = await backend.sample([Message("user", "Write a long story about a dog.")], 1, config)
        assert c.completion_tokens == 3
        assert c.finish_reason == "length"

    async def test_seeded_sampling_is_reproducible(self, backend: Backend) -> None:
        # One request at a time: concurrent requests share llama.cpp batches, whose numerics
        # depend on what else is in the batch (documented in openai_compat).
        config = SamplingConfig(temperature=1.0, max_tokens=12, seed=1234)
        chat = [Message("user", "Tell me something surprising.")]
        first = [c.text for c in await backend.sample(chat, 1, config)]
        second = [c.text for c in await backend.sample(chat, 1, config)]
        assert first == second

    async def test_yes_no_reads_logprobs(self, backend: Backend) -> None:
        r = await backend.yes_no(YES_NO_QUESTION)
        assert r.method == "logprobs"
        assert 0.0 <= r.p_yes <= 1.0
        assert 0.0 < r.mass <= 1.0 + 1e-9
        assert r.calls == 1

    async def test_loglik_orders_likely_above_unlikely(self, backend: Backend) -> None:
        paris = await backend.loglik(PREFILL, " Paris.")
        berlin = await backend.loglik(PREFILL, " Berlin.")
        assert paris.n_tokens == berlin.n_tokens == 2
        assert paris.logprob < 0 and berlin.logprob < 0
        assert paris.logprob > berlin.logprob

    async def test_loglik_of_a_new_assistant_turn(self, backend: Backend) -> None:
        chat = [Message("user", "What is the capital of France?")]
        right = await backend.loglik(chat, "The capital of France is Paris.")
        wrong = await backend.loglik(chat, "The capital of France is Berlin.")
        assert right.n_tokens == wrong.n_tokens > 1
        assert right.logprob > wrong.logprob

    async def test_loglik_of_characters_split_over_tokens(self, backend: Backend) -> None:
        # Both tokenizers split these characters into byte pieces, which llama.cpp can neither
        # force by grammar nor list in its probabilities (SafetyBench items failed on them).
        chat = [Message("user", "Repeat exactly: 改变认知评价")]
        copy = await backend.loglik(chat, "改变认知评价")
        other = await backend.loglik(chat, "苹果香蕉葡萄")
        assert copy.n_tokens > 1 and other.n_tokens > 1
        assert other.logprob < copy.logprob < 0

    async def test_loglik_rejects_empty_continuation(self, backend: Backend) -> None:
        with pytest.raises(ConfigError):
            await backend.loglik(PREFILL, "")

    async def test_concurrent_yes_no_calls(self, backend: Backend) -> None:
        results = await asyncio.gather(*(backend.yes_no(YES_NO_QUESTION) for _ in range(8)))
        assert len(results) == 8
        # temperature 0, same prompt: every reading agrees up to batching noise
        assert max(r.p_yes for r in results) - min(r.p_yes for r in results) < 0.05


@pytest.mark.model
class TestEmbeddedLlama(BackendContractTests):
    @pytest.fixture
    def backend(self, smollm2_backend: EmbeddedLlamaBackend) -> Backend:
        return smollm2_backend

    def test_model_id_is_stable(self, smollm2_backend: EmbeddedLlamaBackend) -> None:
        assert smollm2_backend.model_id == "smollm2-135m@b179c9523d0e"

    async def test_prompt_cache_in_ram_can_be_turned_off(self) -> None:
        backend = EmbeddedLlamaBackend("smollm2-135m", n_parallel=1, n_ctx=1024, cache_ram_mib=0)
        try:
            assert 0.0 <= (await backend.yes_no(YES_NO_QUESTION)).p_yes <= 1.0
        finally:
            await backend.aclose()

    def test_negative_prompt_cache_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert llamacpp_main(["--model", "smollm2-135m", "--cache-ram", "-1"]) == 2
        assert "cache_ram_mib must be >= 0" in capsys.readouterr().err

    async def test_aclose_stops_the_server(self) -> None:
        backend = EmbeddedLlamaBackend("smollm2-135m", n_parallel=1, n_ctx=1024)
        url = backend.address
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        await backend.aclose()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)


@pytest.fixture(scope="module")
def default_model_backend() -> Iterator[EmbeddedLlamaBackend]:
    b = EmbeddedLlamaBackend("qwen2.5-coder-1.5b", n_parallel=4, n_ctx=2048)
    yield b
    asyncio.run(b.aclose())


@pytest.mark.slow
class TestEmbeddedDefaultModel(BackendContractTests):
    """The same contract on the default 1.5B model (slow: ~1 min on 2 cores)."""

    @pytest.fixture
    def backend(self, default_model_backend: EmbeddedLlamaBackend) -> Backend:
        return default_model_backend

    async def test_yes_no_is_confident_on_an_easy_fact(self, backend: Backend) -> None:
        r = await backend.yes_no(YES_NO_QUESTION)
        assert r.p_yes > 0.5
        assert r.mass > 0.5


@pytest.mark.model
class TestOpenAICompatOnLlamaServer(BackendContractTests):
    @pytest.fixture
    async def backend(self, llama_server_url: str) -> AsyncIterator[Backend]:
        b = OpenAICompatBackend(llama_server_url + "/v1", model_id="smollm2-test")
        yield b
        await b.aclose()

    async def test_candidate_read_equals_forced_read(self, backend: Backend) -> None:
        # The split-token route reads a token's log-probability from the candidates listed
        # beside a forced ASCII reply: they must be the model's distribution before the grammar.
        assert isinstance(backend, OpenAICompatBackend)
        prompt = "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
        (paris,) = (await backend._post("/tokenize", {"content": " Paris"}))["tokens"]
        forced = await backend._forced_logprob(prompt, [paris], 0)
        read = await backend._candidate_logprob(prompt, paris, 0)
        assert read == pytest.approx(forced, abs=1e-3)

    async def test_sample_records_usage(self, backend: Backend) -> None:
        assert isinstance(backend, OpenAICompatBackend)
        before = backend.stats.completion_tokens
        await backend.sample([Message("user", "Hi")], 2, SamplingConfig(max_tokens=4))
        assert backend.stats.completion_tokens - before >= 2


# -- unit tests of the HTTP logic, with scripted test doubles ------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


class ScriptedServerDouble:
    """Test double: answers each request with the next scripted response; records requests."""

    def __init__(self, *responses: httpx.Response | Exception | Handler) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        if callable(item) and not isinstance(item, httpx.Response):
            return item(request)
        return item

    def backend(self, **kwargs: Any) -> OpenAICompatBackend:
        kwargs.setdefault("retry", RetryPolicy(max_retries=2, backoff_base=0.0))
        return OpenAICompatBackend(
            "http://double.invalid", transport=httpx.MockTransport(self), **kwargs
        )

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


def chat_response(text: str, top: dict[str, float] | None = None) -> httpx.Response:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    choice["finish_reason"] = "stop"
    if top is not None:
        entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
        choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
    usage = {"prompt_tokens": 5, "completion_tokens": 1}
    return httpx.Response(200, json={"choices": [choice], "usage": usage})


CHAT = [Message("user", "hi")]


async def test_retries_5xx_then_succeeds() -> None:
    double = ScriptedServerDouble(httpx.Response(503), httpx.Response(502), chat_response("ok"))
    async with double.backend() as b:
        (c,) = await b.sample(CHAT, 1, SamplingConfig())
    assert c.text == "ok"
    assert len(double.requests) == 3


async def test_persistent_429_raises_rate_limited_after_bounded_retries() -> None:
    double = ScriptedServerDouble(httpx.Response(429, json={"error": {"message": "slow down"}}))
    b = double.backend()
    with pytest.raises(BackendRateLimited, match="slow down") as info:
        await b.yes_no(CHAT)
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)
    assert len(double.requests) == 3  # 1 + max_retries
    assert b.stats.errors == 1


async def test_retry_after_header_is_honoured() -> None:
    double = ScriptedServerDouble(
        httpx.Response(429, headers={"Retry-After": "0.3"}), chat_response("ok")
    )
    b = double.backend(retry=RetryPolicy(max_retries=1, backoff_base=0.0))
    t0 = time.monotonic()
    await b.sample(CHAT, 1, SamplingConfig())
    assert time.monotonic() - t0 >= 0.29


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, ConfigError), (404, BackendUnsupported), (401, BackendError), (500, BackendError)],
)
async def test_status_codes_map_to_errors(status: int, error: type[Exception]) -> None:
    double = ScriptedServerDouble(httpx.Response(status, json={"error": "nope"}))
    with pytest.raises(error) as info:
        await double.backend().sample(CHAT, 1, SamplingConfig())
    assert info.value.__cause__ is not None
    retried = status >= 500
    assert len(double.requests) == (3 if retried else 1)


async def test_timeout_maps_to_backend_timeout() -> None:
    double = ScriptedServerDouble(httpx.ReadTimeout("slow"))
    with pytest.raises(BackendTimeout) as info:
        await double.backend().yes_no(CHAT)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert len(double.requests) == 3


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"{not json"),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json=[1, 2]),
        httpx.Response(200, json={"choices": [{"message": {"content": 3}}]}),
    ],
)
async def test_malformed_upstream_is_a_protocol_error(response: httpx.Response) -> None:
    double = ScriptedServerDouble(response)
    with pytest.raises(BackendProtocolError):
        await double.backend().sample(CHAT, 1, SamplingConfig())


async def test_sample_sends_distinct_seeds_and_concurrent_requests() -> None:
    double = ScriptedServerDouble(chat_response("a"))
    async with double.backend() as b:
        out = await b.sample(CHAT, 4, SamplingConfig(seed=10, max_tokens=5))
    assert len(out) == 4
    assert isinstance(b, OpenAICompatBackend)
    # GET /props first (not llama.cpp here), then n=4 once: one choice came back, so the
    # other three are drawn one request each, and the upstream is remembered as such
    posts = double.payloads()
    assert sorted(p["seed"] for p in posts) == [10, 11, 12, 13]
    assert [p.get("n") for p in posts] == [4, None, None, None]
    assert all(p["max_tokens"] == 5 for p in posts) and b.sample_via == "each"
    assert b.stats.prompt_tokens == 20


async def test_stats_count_cached_and_computed_tokens() -> None:
    def reply(usage: Any) -> httpx.Response:
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})

    cached = {
        "prompt_tokens": 40,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 30},
    }
    malformed = {
        "prompt_tokens": 7,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": "x"},
    }
    double = ScriptedServerDouble(reply(cached), reply(malformed), reply(None))
    async with double.backend() as b:
        for _ in range(3):
            await b.sample(CHAT, 1, SamplingConfig())
    assert b.stats is not None
    assert (b.stats.prompt_tokens, b.stats.cached_prompt_tokens) == (47, 30)
    assert b.stats.computed_tokens == 47 - 30 + 3  # a bad count is informational: 0, no error


async def test_yes_no_pools_variants_from_logprobs() -> None:
    top = {"Yes": -0.5, " yes": -2.0, "No": -1.5, "Maybe": -3.0}
    double = ScriptedServerDouble(chat_response("Yes", top))
    r = await double.backend().yes_no(CHAT)
    import math

    p_yes, p_no = math.exp(-0.5) + math.exp(-2.0), math.exp(-1.5)
    assert r.method == "logprobs"
    assert r.p_yes == pytest.approx(p_yes / (p_yes + p_no))
    assert r.mass == pytest.approx(p_yes + p_no)
    (payload,) = double.payloads()
    assert payload["max_tokens"] == 1 and payload["temperature"] == 0 and payload["logprobs"]


async def test_yes_no_falls_back_to_sampling_without_logprobs() -> None:
    answers = iter(["No", "Yes.", "yes, sure", "No", "Yes", "hmm", "Yes", "YES"])
    double = ScriptedServerDouble(
        chat_response("Yes"),  # first call: no logprobs in the answer
        lambda _req: chat_response(next(answers)),
    )
    r = await double.backend(yes_no_samples=8).yes_no(CHAT)
    assert r.method == "sampled"
    assert r.calls == 9
    assert r.p_yes == pytest.approx(5 / 7)
    assert r.mass == pytest.approx(7 / 8)
    assert all(p["temperature"] == 1.0 for p in double.payloads()[1:])


async def test_yes_no_falls_back_when_logprobs_are_refused() -> None:
    double = ScriptedServerDouble(
        httpx.Response(400, json={"error": {"message": "logprobs not supported"}}),
        chat_response("No"),
    )
    r = await double.backend(yes_no_samples=4).yes_no(CHAT)
    assert (r.method, r.p_yes, r.mass, r.calls) == ("sampled", 0.0, 1.0, 5)


async def test_yes_no_without_any_yes_or_no_is_a_protocol_error() -> None:
    double = ScriptedServerDouble(
        chat_response("Paris", {"Paris": -0.1, "The": -2.0}), chat_response("Paris")
    )
    with pytest.raises(BackendProtocolError, match="neither Yes nor No"):
        await double.backend(yes_no_samples=3).yes_no(CHAT)
    assert len(double.requests) == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5, 1000.0])
@pytest.mark.parametrize("where", ["Yes", "No", "Maybe"])
async def test_yes_no_rejects_impossible_logprobs(bad: float, where: str) -> None:
    # NaN, +inf or > 0 anywhere in the table is a broken upstream, not a certain answer.
    top = {"Yes": -0.7, "No": -0.7, "Maybe": -5.0, where: bad}
    entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
    choice = {"index": 0, "message": {"role": "assistant", "content": "No"}}
    choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
    body = json.dumps({"choices": [choice]}).encode()  # NaN and Infinity as JS literals
    double = ScriptedServerDouble(httpx.Response(200, content=body))
    with pytest.raises(BackendProtocolError, match="invalid top logprob"):
        await double.backend().yes_no(CHAT)
    assert len(double.requests) == 1  # not retried, not read by sampling instead


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5, 1000.0])
def test_yes_no_from_top_logprobs_rejects_impossible_values(bad: float) -> None:
    with pytest.raises(BackendProtocolError, match="invalid log-probability"):
        yes_no_from_top_logprobs({"Yes": bad, "No": -0.1})
    assert yes_no_from_top_logprobs({"Yes": float("-inf"), "No": 0.0}) == (0.0, 1.0)


async def test_loglik_on_a_server_without_llamacpp_endpoints_is_unsupported() -> None:
    double = ScriptedServerDouble(httpx.Response(404, json={"error": "not found"}))
    with pytest.raises(BackendUnsupported, match=r"llama\.cpp"):
        await double.backend().loglik(CHAT, " Paris")


async def test_loglik_rejects_probabilities_of_other_tokens() -> None:
    def route(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/apply-template":
            return httpx.Response(200, json={"prompt": "P"})
        if req.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [5, 6]})
        probs = [{"id": 5, "logprob": -1.0}, {"id": 9, "logprob": -0.1}]
        return httpx.Response(200, json={"completion_probabilities": probs})

    double = ScriptedServerDouble(route)
    with pytest.raises(BackendProtocolError, match="forced token 1"):
        await double.backend().loglik(CHAT, " Paris")
    completion = double.payloads()[-1]
    assert completion["grammar"] == "root ::= <[5]> <[6]>"
    assert completion["n_predict"] == 2


def split_token_server(candidates: Callable[[int], list[dict[str, Any]]]) -> ScriptedServerDouble:
    """Tokens 5 (whole), 6 (a byte piece), 7 (whole); /completion answers by its grammar."""

    def route(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/apply-template":
            return httpx.Response(200, json={"prompt": "P"})
        if req.url.path == "/tokenize":
            pieces = [{"id": 5, "piece": " a"}, {"id": 6, "piece": [229]}, {"id": 7, "piece": "b"}]
            return httpx.Response(200, json={"tokens": pieces})
        body = json.loads(req.content)
        if body["grammar"] == "root ::= [ -~]":
            top = candidates(body["n_probs"])
            entry = {"id": 32, "logprob": -9.0, "top_logprobs": top}
            return httpx.Response(200, json={"completion_probabilities": [entry]})
        forced = [int(t) for t in re.findall(r"<\[(\d+)\]>", body["grammar"])]
        probs = [{"id": t, "logprob": -float(t)} for t in forced]
        return httpx.Response(200, json={"completion_probabilities": probs})

    return ScriptedServerDouble(route)


async def test_loglik_reads_split_tokens_from_the_candidates() -> None:
    vocab = [{"id": t, "logprob": -0.5 * t} for t in range(2000)]
    double = split_token_server(lambda n: vocab[1000:] if n == 1000 else vocab)
    r = await double.backend().loglik(CHAT, " ab")
    assert (r.logprob, r.n_tokens) == (-5.0 - 3.0 - 7.0, 3)
    completions = [p for p in double.payloads() if "grammar" in p]
    assert [(p["prompt"], p["grammar"], p["n_probs"]) for p in completions] == [
        ("P", "root ::= <[5]>", 1),
        (["P", 5], "root ::= [ -~]", 1000),  # token 6 is not among the first 1000 listed...
        (["P", 5], "root ::= [ -~]", 1 << 20),  # ...so the whole vocabulary is asked for
        (["P", 5, 6], "root ::= <[7]>", 1),
    ]


async def test_loglik_of_a_token_outside_the_vocabulary_is_a_protocol_error() -> None:
    double = split_token_server(lambda n: [{"id": t, "logprob": -1.0} for t in (1, 2, 3)])
    with pytest.raises(BackendProtocolError, match=r"token 1 \(id 6\) is not among"):
        await double.backend().loglik(CHAT, " ab")


async def test_unreachable_url_fails_fast_with_backend_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAICompatBackend(
        f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=2, backoff_base=0.05)
    )
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach") as info:
        await b.sample(CHAT, 1, SamplingConfig())
    assert time.monotonic() - t0 < 3.0
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert b.stats.calls == 3
    await b.aclose()


async def test_backend_is_usable_across_event_loops() -> None:
    double = ScriptedServerDouble(chat_response("ok"))
    b = double.backend()

    def run_in_new_loop() -> str:
        return asyncio.run(b.sample(CHAT, 1, SamplingConfig()))[0].text

    assert await asyncio.to_thread(run_in_new_loop) == "ok"
    assert (await b.sample(CHAT, 1, SamplingConfig()))[0].text == "ok"


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://x"])
def test_bad_base_url_is_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        OpenAICompatBackend(url)


def test_base_url_accepts_root_or_v1() -> None:
    assert OpenAICompatBackend("http://h:1/v1/").root_url == "http://h:1"
    assert OpenAICompatBackend("http://h:1").root_url == "http://h:1"


@given(
    attempt=st.integers(0, 20),
    base=st.floats(0, 5),
    cap=st.floats(0, 60),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_bounded_and_jittered(attempt: int, base: float, cap: float, seed: int) -> None:
    policy = RetryPolicy(backoff_base=base, backoff_cap=cap)
    d = policy.delay(attempt, None, random.Random(seed))
    assert 0.0 <= d <= min(cap, base * 2.0**attempt) + 1e-12


@given(st.floats(-10, 1000))
def test_retry_after_is_capped(seconds: float) -> None:
    d = RetryPolicy(retry_after_cap=30).delay(0, seconds, random.Random(0))
    assert 0.0 <= d <= 30.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=12), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(12.0)


# -- the keep-alive transport, against a real socket peer -------------------------------------


class RawHTTPPeer:
    """A real TCP server on loopback that reads each HTTP/1.1 request and writes the raw bytes
    a script returns (None: close the connection without answering; "hang": never answer;
    ``close_after_reply``: close after every reply). Records the requests and how many
    connections were opened."""

    def __init__(
        self,
        script: Callable[[int, bytes, bytes], bytes | str | None],
        *,
        close_after_reply: bool = False,
    ) -> None:
        self.script = script
        self.close_after_reply = close_after_reply
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                reply = self.script(len(self.requests) - 1, head, body)
                if reply == "hang":
                    await asyncio.sleep(3600)
                if not isinstance(reply, bytes):
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after_reply:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _chat_json(text: str) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {}}
    ).encode()


def _content_length(text: str) -> bytes:
    body = _chat_json(text)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def test_keepalive_transport_reuses_one_connection() -> None:
    peer = RawHTTPPeer(lambda i, head, body: _content_length(f"reply {i}"))
    async with peer as url:
        b = OpenAICompatBackend(url, max_retries=0)
        texts = [(await b.sample(CHAT, 1, SamplingConfig()))[0].text for _ in range(5)]
        await b.aclose()
    assert texts == [f"reply {i}" for i in range(5)]
    assert peer.connections == 1
    head, body = peer.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert json.loads(body)["messages"] == [{"role": "user", "content": "hi"}]


async def test_keepalive_transport_bounds_connections_by_max_concurrency() -> None:
    peer = RawHTTPPeer(lambda i, head, body: _content_length("ok"))
    async with peer as url:
        b = OpenAICompatBackend(url, max_retries=0, max_concurrency=3)
        out = await b.sample(CHAT, 12, SamplingConfig(seed=1))
        await b.aclose()
    assert [c.text for c in out] == ["ok"] * 12
    assert 1 <= peer.connections <= 3
    seeds = sorted(json.loads(body)["seed"] for head, body in peer.requests if body)
    assert seeds == list(range(1, 13))


async def test_keepalive_transport_reads_chunked_bodies_with_trailers() -> None:
    def chunked(i: int, head: bytes, body: bytes) -> bytes:
        data = _chat_json(f"chunked {i}")
        parts = [data[:7], data[7:20], data[20:]]
        out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        for p in parts:
            out += b"%x;ext=1\r\n" % len(p) + p + b"\r\n"
        return out + b"0\r\nx-trailer: yes\r\n\r\n"

    peer = RawHTTPPeer(chunked)
    async with peer as url:
        b = OpenAICompatBackend(url, max_retries=0)
        texts = [(await b.sample(CHAT, 1, SamplingConfig()))[0].text for _ in range(3)]
        await b.aclose()
    assert texts == ["chunked 0", "chunked 1", "chunked 2"]
    assert peer.connections == 1  # the connection stayed usable after each chunked body


async def test_keepalive_transport_handles_close_delimited_and_interim_responses() -> None:
    def script(i: int, head: bytes, body: bytes) -> bytes:
        if i == 0:  # 1xx first, then a body without framing: it runs until the peer closes
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" + _chat_json("eof")
        ok = b"HTTP/1.1 200 OK\r\n"
        return _content_length(f"closing {i}").replace(ok, ok + b"connection: close\r\n")

    peer = RawHTTPPeer(script, close_after_reply=True)
    async with peer as url:
        b = OpenAICompatBackend(url, max_retries=0)
        texts = [(await b.sample(CHAT, 1, SamplingConfig()))[0].text for _ in range(3)]
        await b.aclose()
    assert texts == ["eof", "closing 1", "closing 2"]
    assert peer.connections == 3  # neither kind of connection is reused


async def test_direct_path_sends_well_formed_requests() -> None:
    peer = RawHTTPPeer(lambda i, head, body: _content_length(f"r{i}"))
    async with peer as url:
        # slots=0: no GET /props first (every request here is a POST of the chat)
        b = OpenAICompatBackend(url + "/v1", model="m", api_key="sk-test", max_retries=0, slots=0)
        texts = [c.text for c in await b.sample(CHAT, 2, SamplingConfig(seed=1))]
        await b.aclose()
    assert sorted(texts) == ["r0", "r1"]
    port = url.rsplit(":", 1)[1]
    for head, body in peer.requests:
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
        fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        assert fields["host"] == f"127.0.0.1:{port}"
        assert fields["authorization"] == "Bearer sk-test"
        assert fields["content-type"] == "application/json"
        payload = json.loads(body)
        assert payload["model"] == "m" and payload["messages"][0]["content"] == CHAT[0].content
    assert sorted(json.loads(body)["seed"] for _, body in peer.requests) == [1, 2]


def test_api_key_cannot_inject_headers() -> None:
    with pytest.raises(ConfigError, match="api_key"):
        OpenAICompatBackend("http://127.0.0.1:9", api_key="k\r\nX-Evil: 1")


async def test_keepalive_transport_decodes_gzip() -> None:
    import gzip

    def gz(i: int, head: bytes, body: bytes) -> bytes:
        data = gzip.compress(_chat_json("zipped"))
        return (
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(data)
            + data
        )

    async with RawHTTPPeer(gz) as url:
        b = OpenAICompatBackend(url, max_retries=0)
        (c,) = await b.sample(CHAT, 1, SamplingConfig())
        await b.aclose()
    assert c.text == "zipped"


async def test_keepalive_transport_read_timeout_maps_to_backend_timeout() -> None:
    async with RawHTTPPeer(lambda i, head, body: "hang") as url:
        b = OpenAICompatBackend(url, timeout=0.3, max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(BackendTimeout) as info:
            await b.sample(CHAT, 1, SamplingConfig())
        await b.aclose()
    assert time.monotonic() - t0 < 3.0
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


async def test_keepalive_transport_peer_closing_mid_response_is_retried_then_mapped() -> None:
    def script(i: int, head: bytes, body: bytes) -> bytes | None:
        if i == 0:
            return None  # close without answering
        return _content_length("after retry")

    peer = RawHTTPPeer(script)
    async with peer as url:
        b = OpenAICompatBackend(url, retry=RetryPolicy(max_retries=1, backoff_base=0.0))
        (c,) = await b.sample(CHAT, 1, SamplingConfig())
        b2 = OpenAICompatBackend(url, max_retries=0)
        peer.script = lambda i, head, body: None
        with pytest.raises(BackendError, match="cannot reach") as info:
            await b2.sample(CHAT, 1, SamplingConfig())
        await b.aclose()
        await b2.aclose()
    assert c.text == "after retry"
    assert peer.connections == 3  # the closed connection was not reused
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
