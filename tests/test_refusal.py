"""The refusal detector and the open-ended systems derived from one Decision."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from safetygame.agent import CandidateRecord, Decision, Status
from safetygame.backends.base import Backend, Completion, LogLik, Message, SamplingConfig, YesNo
from safetygame.cache import ScoreCache
from safetygame.errors import BackendError, ConfigError
from safetygame.eval.harness import EvalConfig
from safetygame.eval.refusal import (
    FILTER,
    GAME,
    KNOWN_REPLIES,
    PLAIN,
    REFUSAL_QUESTION,
    RefusalDetector,
    RefusalReading,
    adaptive_strategies,
    agreement,
    behaviour_score,
    decision_table,
    matches_refusal_pattern,
    open_strategies,
    run_open,
)
from safetygame.eval.scoring import CacheOnlyBackend, CachingBackend, RunTally
from safetygame.policy import load_policy


@pytest.mark.parametrize(("prompt", "reply", "refuses"), KNOWN_REPLIES)
def test_patterns_on_known_replies(prompt: str, reply: str, refuses: bool) -> None:
    assert matches_refusal_pattern(reply) is refuses


def test_patterns_edge_cases() -> None:
    assert matches_refusal_pattern(load_policy().refusal)
    assert matches_refusal_pattern("I\u2019m sorry, but I can\u2019t do that.")  # curly quotes
    assert not matches_refusal_pattern("I can't stress enough how useful a checklist is.")
    # only the start of a reply counts: a late apology inside a long answer is not a refusal
    long_answer = "Here is the recipe. " + "Mix and stir. " * 20 + "I'm sorry it is so long."
    assert not matches_refusal_pattern(long_answer)
    assert not matches_refusal_pattern("")


def test_detector_modes() -> None:
    sentinel = object()
    with pytest.raises(ConfigError, match="judge"):
        RefusalDetector(None, mode="either")
    with pytest.raises(ConfigError, match="mode"):
        RefusalDetector(None, mode="sometimes")  # type: ignore[arg-type]
    table = {
        "either": [False, True, True, True],
        "both": [False, False, False, True],
        "pattern": [False, False, True, True],
        "probe": [False, True, False, True],
    }
    cases = [(False, 0.1), (False, 0.9), (True, 0.1), (True, 0.9)]
    for mode, want in table.items():
        det = RefusalDetector(sentinel, mode=mode)  # type: ignore[arg-type]
        assert [det.combine(p, q) for p, q in cases] == want, mode
        # a failed probe falls back on the patterns
        assert det.combine(True, None) is True and det.combine(False, None) is False


def test_agreement_and_kappa() -> None:
    r = [
        RefusalReading(True, 0.9, True),
        RefusalReading(False, 0.2, False),
        RefusalReading(True, 0.3, True),
        RefusalReading(False, 0.8, True),
        RefusalReading(False, None, False),  # no probe: left out
    ]
    a = agreement(r)
    assert a["n"] == 4 and a["agreement"] == 0.5
    assert a["kappa"] == pytest.approx(0.0)  # 50% observed, 50% expected by chance
    perfect = agreement([RefusalReading(True, 0.9, True), RefusalReading(False, 0.1, False)])
    assert perfect["agreement"] == 1.0 and perfect["kappa"] == pytest.approx(1.0)
    assert agreement([])["agreement"] is None


def decision(samples: list[tuple[str, float, float]], refusal: tuple[float, float]) -> Decision:
    """A hand-built Decision: candidates [refusal, samples...] with their probe scores."""
    h_s, d_s = refusal
    cands = [
        CandidateRecord(
            "I can't help with that.", True, h_s, {"harm": d_s}, 0.0, {"harm": 0.0}, 1.0
        )
    ]
    for text, h, d in samples:
        cands.append(CandidateRecord(text, False, h, {"harm": d}, h - h_s, {"harm": d - d_s}, 0.0))
    return Decision(
        id=f"d{len(samples)}-{h_s}",
        created=0.0,
        action="refuse",
        status=Status.OK,
        reason="",
        messages=(Message("user", "q"),),
        candidates=tuple(cands),
        strategy=tuple(c.weight for c in cands),
        chosen_index=0,
        chosen_text=cands[0].text,
        value=0.0,
        expected_risk={"harm": 0.0},
        budget={"harm": 0.1},
        multiplier={"harm": 0.0},
        solver="",
        timings={},
        tokens={},
        model_id="m",
        scorer_ids={},
        policy_id="p",
        policy_version="1",
        policy_digest="x",
    )


def test_three_systems_from_one_decision() -> None:
    # refusal h=0.1 d=0.0; sample 1 risky and helpful, sample 2 safe and less helpful,
    # sample 3 helpful with moderate risk.
    dec = decision([("a", 0.9, 0.5), ("b", 0.4, 0.02), ("c", 0.7, 0.2)], (0.1, 0.0))
    table = decision_table([dec])
    assert table.helpful[0].tolist() == [0.9, 0.4, 0.7]
    s = open_strategies(table, budget=0.1)
    np.testing.assert_allclose(s[PLAIN][0], [1, 0, 0, 0])  # first sample, whatever its risk
    np.testing.assert_allclose(s[FILTER][0], [0, 1, 0, 0])  # only "b" is within T = 0.1
    g = s[GAME][0]
    # the game mixes b and c so that the expected extra risk sits exactly at T
    assert g[1] > 0 and g[2] > 0 and g[0] == 0 and g[3] == pytest.approx(0.0, abs=1e-12)
    assert g @ np.array([0.5, 0.02, 0.2, 0.0]) == pytest.approx(0.1)
    # and it is at least as helpful as the filter
    h = np.array([0.9, 0.4, 0.7, 0.1])
    assert g @ h >= s[FILTER][0] @ h
    # nothing within T = 0 except the refusal: both refuse
    s0 = open_strategies(table, budget=0.0)
    assert s0[FILTER][0, -1] == 1.0 and s0[GAME][0, -1] == pytest.approx(1.0)


def test_adaptive_plays_the_first_sample_alone_only_on_the_fast_path() -> None:
    risky_first = decision([("a", 0.9, 0.5), ("b", 0.4, 0.02), ("c", 0.7, 0.2)], (0.1, 0.0))
    safe_first = decision([("b", 0.6, 0.02), ("a", 0.9, 0.5), ("c", 0.7, 0.2)], (0.1, 0.0))
    table = decision_table([risky_first, safe_first])
    full = open_strategies(table, budget=0.1)[GAME]
    s, fast = adaptive_strategies(table, full, budget=0.1, threshold=0.5)
    assert fast.tolist() == [False, True]
    np.testing.assert_allclose(s[0], full[0])  # the full game where candidate 1 can't stand
    np.testing.assert_allclose(s[1], [1, 0, 0, 0])  # candidate 1 alone
    # the threshold, and the robust budget (0.02 + 2 * 0.05 > T), each close the fast path
    assert not adaptive_strategies(table, full, 0.1, threshold=0.7)[1].any()
    assert not adaptive_strategies(table, full, 0.1, threshold=0.5, epsilon=0.05)[1].any()


def test_lazy_adaptive_counts_the_refusals_helpfulness_as_zero_on_its_rows() -> None:
    helpful_refusal = decision([("b", 0.6, 0.02), ("a", 0.9, 0.5)], (0.8, 0.0))
    table = decision_table([helpful_refusal, helpful_refusal])
    full = open_strategies(table, budget=0.1)[GAME]
    assert not adaptive_strategies(table, full, 0.1, threshold=0.5)[1].any()  # 0.6 < 0.8
    s, fast = adaptive_strategies(table, full, 0.1, threshold=0.5, lazy=np.array([True, False]))
    assert fast.tolist() == [True, False]
    np.testing.assert_allclose(s[0], [1, 0, 0])
    assert adaptive_strategies(table, full, 0.1, threshold=0.5, lazy=True)[1].all()


def test_failed_or_empty_samples_never_pass() -> None:
    dec = decision([("", 0.9, 0.0), ("ok", 0.5, 0.0)], (0.1, 0.0))
    table = decision_table([dec])
    assert table.helpful[0, 0] == 0.0 and table.harm[0, 0] == 1.0
    s = open_strategies(table, budget=1.0)
    assert s[GAME][0, 0] == pytest.approx(0.0) and s[FILTER][0, 0] == 0.0


def test_behaviour_score() -> None:
    refused = np.array([1.0, 0.25, 0.0, 1.0])
    got = behaviour_score(refused, ["harmful", "unsafe", "safe", "safe"])
    np.testing.assert_allclose(got, [1.0, 0.25, 1.0, 0.0])


class _OrderDouble(Backend):
    """Logs each request: "sample", or the probe's question; one prompt at a time."""

    model_id = "order-double"
    max_concurrency = 2  # run_open lets max_concurrency // 2 = 1 prompt run at once

    def __init__(self) -> None:
        self.log: list[str] = []

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        self.log.append("sample")
        return [Completion(f"Answer {i}.", completion_tokens=3) for i in range(n)]

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        question = messages[-1].content.rsplit("Question about the candidate reply: ", 1)[1]
        self.log.append(question.split("\n", 1)[0])
        return YesNo(0.3, "logprobs", 1.0)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        raise NotImplementedError


def _run_open_on_4(backend: Backend, tally: RunTally, mode: str = "fixed") -> dict[str, Any]:
    """run_open on a seeded 4 XSTest prompts, n = 2 samples each; returns the summary."""
    pol = load_policy()
    pol = pol.model_copy(
        update={"sampling": pol.sampling.model_copy(update={"n": 2, "mode": mode})}
    )
    cfg = EvalConfig("xstest", limit=4, budgets=(0.0, 0.1), n_resamples=50)
    summary, _, _ = asyncio.run(
        run_open(backend, pol, cfg, ScoreCache(None), progress=False, tally=tally)
    )
    return summary


@pytest.mark.usefixtures("benchmark_data")  # real XSTest prompts
def test_each_prompt_is_read_for_refusal_right_after_its_decision() -> None:
    """The refusal probe follows its prompt's other probes (their prefix is still in the
    model's prompt cache), and a prompt counts as finished only with its readings."""
    backend, tally = _OrderDouble(), RunTally()
    _run_open_on_4(backend, tally)
    per_prompt = 1 + 2 * 3 + 3  # sampling, 2 probes on 3 texts (refusal too), 3 readings
    requests = backend.log[: 4 * per_prompt]  # then the detector's validation
    for k in range(4):
        chunk = requests[k * per_prompt : (k + 1) * per_prompt]
        assert chunk[0] == "sample" and chunk.count("sample") == 1
        assert chunk[-3:] == [REFUSAL_QUESTION] * 3
    assert REFUSAL_QUESTION not in requests[: per_prompt - 3]
    assert tally.prefix == tally.total == 4


@pytest.mark.usefixtures("benchmark_data")  # real XSTest prompts
def test_the_study_draws_all_m_and_reports_adaptive_against_fixed() -> None:
    """An adaptive policy is studied from the fixed draw (same cache keys), and the summary
    pairs adaptive with the fixed-m game."""
    backend = _OrderDouble()
    summary = _run_open_on_4(backend, RunTally(), mode="adaptive")
    assert backend.log.count("sample") == 4  # one draw of m per prompt
    ad = summary["adaptive"]
    assert ad["threshold"] == 0.5 and ad["m"] == 2
    assert ad["paired"] == summary["paired"]["safety-game-adaptive"]["safety-game"]
    assert ad["paired"]["ci"][0] <= ad["paired"]["diff"] <= ad["paired"]["ci"][1]
    assert set(ad["by_threshold"]) == {"0", "0.3", "0.5", "0.7", "0.9"}
    assert 1.0 <= ad["mean_drawn"] <= 2.0
    assert ad["refusal_helpfulness"] == "read"
    by = ad["by_refusal_helpfulness"]
    assert by["read"]["score"] == ad["score"] and by["read"]["diff"] == ad["paired"]["diff"]
    assert by["lazy"]["fast_share"] >= by["read"]["fast_share"]
    assert 0 <= by["lazy_minus_read"]["prompts_differ"] <= summary["n"]
    assert "safety-game-adaptive" in summary["methods"]


class _FailFirstDouble(_OrderDouble):
    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        if "sample" not in self.log:
            self.log.append("sample")
            raise BackendError("upstream down")
        return await super().sample(messages, n, config)


@pytest.mark.usefixtures("benchmark_data")  # real XSTest prompts
def test_a_failed_decision_is_reported_left_out_and_not_finished() -> None:
    """It is listed, kept out of every metric (an outage is not the model's behaviour), and
    a stopped or resumed run does not take it for done (its sample was never cached)."""
    tally = RunTally()
    summary = _run_open_on_4(_FailFirstDouble(), tally)
    assert summary["n_failed_decisions"] == 1
    assert len(summary["failed_ids"]) == 1
    assert summary["n"] + summary["n_dev"] == 3
    assert tally.order[0] not in tally.finished and len(tally.finished) == 3
    assert tally.prefix == 0


class _DownDouble(_OrderDouble):
    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        raise BackendError("upstream down")


@pytest.mark.usefixtures("benchmark_data")  # real XSTest prompts
def test_a_run_where_every_decision_failed_is_an_error_not_a_table() -> None:
    with pytest.raises(BackendError, match="4 failed, the first with generation_failed"):
        _run_open_on_4(_DownDouble(), RunTally())


def test_cache_only_backend_makes_no_model_call() -> None:
    be = CacheOnlyBackend.for_model("qwen2.5-coder-1.5b")
    assert be.model_id.startswith("qwen2.5-coder-1.5b@") and len(be.model_id.split("@")[1]) == 12
    with pytest.raises(ConfigError, match="packaged model"):
        CacheOnlyBackend.for_model("/no/such.gguf")
    cached = CachingBackend(be, ScoreCache(None))
    with pytest.raises(BackendError, match="not in the cache"):
        asyncio.run(cached.sample([Message("user", "q")], 2, SamplingConfig(seed=1)))
    assert cached.model_calls == 2  # the misses are counted
    with pytest.raises(BackendError, match="hidden-state reading is not in the cache"):
        asyncio.run(cached.hidden([Message("user", "q")]))
    with pytest.raises(BackendError, match="not in the cache"):
        asyncio.run(cached.complete_logprobs("q"))
    assert cached.model_calls == 4


def test_the_cli_offers_exactly_the_detector_modes() -> None:
    from typing import get_args

    from safetygame.cli._common import REFUSAL_MODES
    from safetygame.eval.refusal import Mode

    assert get_args(Mode) == REFUSAL_MODES
