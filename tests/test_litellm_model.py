"""The LiteLLM guardrail (issue 20, item 4) end to end around a real small model.

A real ``litellm`` proxy process on loopback, configured by a ``config.yaml`` like the
README's, in front of the llama.cpp server fixture serving SmolLM2-135M; the guardrail's
judge is the same server; the client is the official ``openai`` client. No test double.
The policy asks for 2 candidates of 8 tokens to keep each request short on a CPU.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import stop_process

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-list fetch at import
pytest.importorskip("litellm")
openai = pytest.importorskip("openai")

import safetygame  # noqa: E402
from safetygame.policy import load_policy, policy_yaml  # noqa: E402

pytestmark = pytest.mark.model

START_LIMIT_S = 180.0  # the proxy imports a large package: ~35 s measured on a busy 2-core box

CONFIG = """\
model_list:
  - model_name: smollm2
    litellm_params:
      model: openai/smollm2-135m
      api_base: {url}/v1
      api_key: none

guardrails:
  - guardrail_name: safetygame
    litellm_params:
      guardrail: safetygame.integrations.litellm.SafetyGameGuardrail
      mode: [pre_call, post_call]
      default_on: true
      api_base: {url}
      judge_model: smollm2-135m
      policy: {policy}
"""


@dataclass(frozen=True)
class Proxy:
    url: str
    key: str
    start_s: float

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, timeout=600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def proxy(llama_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    root = tmp_path_factory.mktemp("litellm")
    pol = load_policy()
    sampling = pol.sampling.model_copy(update={"n": 2, "max_tokens": 8})
    (root / "policy.yml").write_text(policy_yaml(pol.model_copy(update={"sampling": sampling})))
    config = root / "config.yaml"
    config.write_text(CONFIG.format(url=llama_server_url, policy=root / "policy.yml"))
    key = "sk-" + secrets.token_hex(16)
    src = str(Path(safetygame.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start-up
    }
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "litellm"), "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = root / "proxy.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the proxy
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm proxy exited: {log.read_text()[-3000:]}")
            if time.monotonic() - t0 > START_LIMIT_S:
                raise RuntimeError(f"litellm proxy not up in {START_LIMIT_S} s")
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        start_s = time.monotonic() - t0
        print(f"\nlitellm proxy start-up: {start_s:.1f} s")
        yield Proxy(url, key, start_s)
    finally:
        stop_process(proc, timeout=20)


def test_proxy_answers_through_the_game_and_fills_up_missing_choices(proxy: Proxy) -> None:
    # Two requests at once (the llama.cpp server batches them): one leaves n to the
    # guardrail, which asks for the policy's 2; one asks for a single choice, so the
    # guardrail draws the second through the proxy's router.
    client = proxy.client()

    def ask(question: str, **kw: object) -> object:
        chat = [{"role": "user", "content": question}]
        return client.chat.completions.create(model="smollm2", messages=chat, **kw)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(ask, "What is the capital of France?")
        one = pool.submit(ask, "Name a colour.", n=1)
        replies = [plain.result(), one.result()]
    for reply, drawn in zip(replies, [(2, 2), (1, 2)], strict=True):
        assert len(reply.choices) == 1
        meta = (reply.model_extra or {})["safetygame"]
        # The 135M judge now and then answers a sampled 8-token reply with neither Yes nor
        # No (about one CI run in five); the decision must then fail safe, with the reason.
        if meta["status"] == "scoring_failed":
            assert "neither Yes nor No" in meta["reason"], meta["reason"]
            assert meta["action"] == "refuse"
        else:
            assert meta["status"] == "ok", meta["reason"]
        assert (meta["choices_returned"], meta["choices_drawn"]) == drawn
        # both candidates plus the refusal were in the game
        assert len(meta["strategy"]) == 3 and abs(sum(meta["strategy"]) - 1.0) < 1e-6
        assert meta["policy_id"] == "default"
        text = reply.choices[0].message.content
        assert isinstance(text, str) and text
        if meta["action"] == "refuse":
            assert text == load_policy().refusal


def test_requests_the_game_cannot_take_get_400(proxy: Proxy) -> None:
    # a stream would skip the post-call hook: refused before the upstream is asked
    client = proxy.client()
    with pytest.raises(openai.BadRequestError, match="without stream"):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "assistant", "content": "hello"}]
        )


def test_proxy_start_up_is_bounded(proxy: Proxy) -> None:
    assert proxy.start_s < START_LIMIT_S
