"""Learned heads on a real model: hidden states from the embedded llama.cpp and from an
OpenAI-compatible /v1/embeddings server, and `safetygame scorers train` end to end on a
seeded tiny slice with SmolLM2-135M (fits, reproduces, loads, scores, refuses a wrong model).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import llama_server
from safetygame.agent import SafetyGame, Status
from safetygame.backends.base import Message
from safetygame.backends.llamacpp import EmbeddedLlamaBackend
from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.cache import ScoreCache
from safetygame.cli import main
from safetygame.errors import BackendUnsupported, ConfigError
from safetygame.heads import load_head
from safetygame.policy import load_policy, policy_from_dict
from safetygame.scorers import HeadScorer, build_scorer

pytestmark = pytest.mark.model

SMALL = "smollm2-135m"
CHAT = [Message("user", "Is it safe to mix bleach and vinegar?")]


def test_embedded_backend_gives_both_poolings_from_one_pass(
    smollm2_backend: EmbeddedLlamaBackend,
) -> None:
    async def go() -> tuple[dict[str, np.ndarray], int, np.ndarray]:
        one = await smollm2_backend.hidden(CHAT)
        two = await smollm2_backend.hidden(CHAT)
        return dict(one.vectors), one.n_tokens, two.vectors["last"]

    vectors, n_tokens, again = asyncio.run(go())
    assert set(vectors) == {"last", "mean"} and n_tokens > 5
    assert vectors["last"].shape == (576,) and np.all(np.isfinite(vectors["mean"]))
    assert not np.allclose(vectors["last"], vectors["mean"])
    np.testing.assert_array_equal(vectors["last"], again)  # one slot: the same numbers


@pytest.fixture(scope="module")
def embeddings_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama.cpp server subprocess started with --embeddings --pooling last."""
    args = ["--n-parallel", "1", "--ctx", "1024", "--embeddings", "--pooling", "last"]
    with llama_server(args, tmp_path_factory.mktemp("emb_server")) as url:
        yield url


def test_openai_compat_reads_v1_embeddings(embeddings_server_url: str) -> None:
    async def go() -> tuple[dict[str, np.ndarray], str]:
        b = OpenAICompatBackend(f"{embeddings_server_url}/v1", model_id="smollm")
        try:
            h = await b.hidden(CHAT)
            rendered = await b.render(CHAT)
        finally:
            await b.aclose()
        return dict(h.vectors), rendered

    vectors, rendered = asyncio.run(go())
    assert set(vectors) == {"last"} and vectors["last"].shape == (576,)
    assert "<|im_start|>user" in rendered  # the server's own chat template


def test_a_server_without_embeddings_is_a_clear_error(llama_server_url: str) -> None:
    async def go() -> None:
        b = OpenAICompatBackend(llama_server_url, model_id="smollm")
        try:
            await b.hidden(CHAT)
        finally:
            await b.aclose()

    with pytest.raises(
        BackendUnsupported, match=rf"{llama_server_url}/v1/embeddings.*--embeddings"
    ):
        asyncio.run(go())


@pytest.mark.usefixtures("benchmark_data")  # hh-rlhf, moderation and XSTest texts
def test_scorers_train_tiny_reproduces_loads_scores_and_refuses_a_wrong_model(
    tmp_path: Path, smollm2_backend: EmbeddedLlamaBackend
) -> None:
    runner = CliRunner()
    cache, out = tmp_path / "cache.sqlite", tmp_path / "heads"
    args = ["scorers", "train", "--model", SMALL, "--recipe", "tiny", "--cache", str(cache)]
    args += ["--out", str(out), "--no-progress", "--json"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert {h["objective"] for h in summary["heads"]} == {"logistic", "bradley_terry", "gated"}
    # the same seed and data, read from an empty cache, give the same bytes
    again = runner.invoke(main, [*args[:-4], "--cache", str(tmp_path / "fresh.sqlite"),
                                 "--out", str(out), "--check", "--no-progress"])  # fmt: skip
    assert again.exit_code == 0 and "identical" in again.output, again.output

    bt = load_head(out / "smollm2-135m-harm-bt.json")
    assert bt.features.model_id == smollm2_backend.model_id
    assert bt.training["recipe"]["hh_train"] == 6 and bt.training["pairs"] > 0
    scorer = HeadScorer(smollm2_backend, bt, ScoreCache(None))
    s = asyncio.run(scorer.score_against(CHAT, "Sure, mix them.", "I can't help.", "q"))
    assert s.value is not None and 0.0 < s.value < 1.0
    gated = load_head(out / "smollm2-135m-harm-gated.json")
    assert len(gated.params.gate_w) == gated.features.dim
    g = asyncio.run(HeadScorer(smollm2_backend, gated).score(CHAT, "Sure, mix them.", "q"))
    assert g.value is not None and 0.0 < g.value < 1.0 and g.method == "head"

    class OtherModel(OpenAICompatBackend):
        pass

    other = OtherModel("http://127.0.0.1:9", model_id="qwen2.5-coder-1.5b@cc324af070c2")
    with pytest.raises(ConfigError, match=r"fitted on smollm2-135m@.*judge is qwen2\.5"):
        HeadScorer(other, bt)

    # a policy that names the artefact plays the game on its readings
    data = load_policy().model_dump()
    data["scorers"]["harm"] = f"head:{out / 'smollm2-135m-harm-bt.json'}"
    data["sampling"]["n"] = 2
    data["sampling"]["max_tokens"] = 24
    policy = policy_from_dict(data)
    agent = SafetyGame(smollm2_backend, policy, cache=ScoreCache(None))
    d = agent.respond("How do I descale a kettle?", seed=1)
    assert d.status == Status.OK, d.reason
    assert d.candidates[0].harm["harm"] == 0.5 and d.candidates[0].extra_risk["harm"] == 0.0
    assert isinstance(build_scorer(policy.scorers.harm, smollm2_backend, policy), HeadScorer)


@pytest.mark.slow
@pytest.mark.usefixtures("benchmark_data")
def test_the_shipped_quality_report_replays_from_resume_and_times_each_scorer(
    tmp_path: Path,
) -> None:
    """`scorers evaluate` on the default model, from the committed caches: the shipped report's
    numbers again with no quality read missing, and a fresh ms per read for head and design."""
    from safetygame.heads import HEADS_DIR

    runner = CliRunner()
    cache = tmp_path / "scores.sqlite"
    resume = Path(__file__).resolve().parents[1] / "resume"
    for export in ("heads", "xstest"):
        done = runner.invoke(main, ["cache", "import", str(resume / f"{export}.jsonl.gz"),
                                    "--cache", str(cache)])  # fmt: skip
        assert done.exit_code == 0, done.output
    head = "qwen2.5-coder-1.5b-harm-gated"
    res = runner.invoke(main, ["scorers", "evaluate", "--head", head, "--design", "self",
                               "--timing", "2", "--cache", str(cache), "--no-progress",
                               "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    shipped = json.loads((HEADS_DIR / "quality.json").read_text(encoding="utf-8"))
    assert report["cache_misses"] == 0  # the timing reads bypass the cache
    assert report["heads"][head] == shipped["heads"][head]
    self_design = dict(report["designs"]["self"])
    assert self_design.pop("ms_per_read") > 0
    assert {k: v for k, v in shipped["designs"]["self"].items() if k != "ms_per_read"} == (
        self_design
    )
    assert report["ms_per_read"][report["model_id"]] > 0
